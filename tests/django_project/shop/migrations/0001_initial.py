# ruff: noqa: RUF012 - a Django migration, as makemigrations writes it
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list = []
    operations = [
        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("email", models.CharField(max_length=200)),
                ("receipt_sent", models.BooleanField(default=False)),
            ],
        ),
    ]
