"""The shop's tasks: found by ``app.autodiscover_tasks()``, shared (``@shared_task``), retried by rare_celery."""

from celery import shared_task
from django.db import transaction

from rare_celery import Bug, RareTask

from .models import Order


@shared_task(base=RareTask, bind=True, max_attempts=3, backoff=0.5)
def send_receipt(self, order_id: int) -> str:
    order = Order.objects.get(pk=order_id)
    if "@" not in order.email:
        raise Bug(f"order {order_id} has no e-mail address")
    if order.email.endswith("@busy.example") and self.attempt == 1:
        raise ConnectionError("the mail server is busy")
    Order.objects.filter(pk=order_id).update(receipt_sent=True)
    return order.email


def receipt_id(order_id: int) -> str:
    """One receipt per order: its task id says which."""
    return f"receipt-{order_id}"


def place_order(email: str) -> Order:
    """The view's work: the order is saved, and its receipt is sent once the transaction commits."""
    with transaction.atomic():
        order = Order.objects.create(email=email)
        transaction.on_commit(lambda: send_receipt.apply_async((order.id,), task_id=receipt_id(order.id)))
    return order
