"""A minimal Django project with rare_celery (issue 27): ``@shared_task(base=RareTask)`` found by Celery's
autodiscovery, published with ``transaction.on_commit``, results in ``django-celery-results``. Used by
tests/integration/test_django.py; the README's *Django* section shows the same files."""
