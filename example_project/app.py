"""The Celery app and its queues."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from . import settings

QUEUES = ["notify.sms", "notify.email", "notify.push", "translate", "billing", "billing.sender"]

app = Celery("example_project", broker=settings.BROKER_URL,
             include=["example_project.notify", "example_project.translate", "example_project.billing",
                      "example_project.timeline"])
app.conf.update(
    task_queues=[Queue(name) for name in QUEUES],
    task_default_queue="notify.sms",
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
)
