"""The Celery app the CLI tests point ``rare-celery -A`` at; each test has its own queues here.

Runs of ``cli.record`` and ``cli.broken`` are appended to ``$RARE_TEST_DIR/cli-events.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

from celery import Celery
from kombu import Queue

from rare_celery import Bug, RareTask, backoff

DIR = os.environ["RARE_TEST_DIR"]
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)
EVENTS = os.path.join(DIR, "cli-events.jsonl")

app = Celery("cli", broker=os.environ["RARE_TEST_BROKER"], backend=f"file://{DIR}/results")
app.conf.update(
    task_default_queue="cli.default",
    task_queues=[Queue("cli.default")],
    task_routes={"cli.charge": {"queue": "cli.billing"}, "cli.record": {"queue": "cli.requeue"},
                 "cli.broken": {"queue": "cli.real"}, "cli.inspected": {"queue": "cli.inspect"},
                 "cli.purged": {"queue": "cli.purge"}, "cli.watched": {"queue": "cli.status"}},
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


def record(kind: str, task, **extra) -> None:
    headers = task.request.headers or {}
    line = json.dumps({"kind": kind, "id": task.request.id, "t": time.time(), "task": task.name,
                       "attempt": headers.get("x-rare-attempt"), "deadline": headers.get("x-rare-deadline"),
                       "reason": headers.get("x-rare-reason"), "edits": headers.get("x-rare-edits"), **extra})
    with open(EVENTS, "a") as f:
        f.write(line + "\n")


def runs(task_id: str) -> int:
    if not os.path.exists(EVENTS):
        return 0
    with open(EVENTS) as f:
        return sum(1 for line in f if task_id in line)


# schedule, declare: the billing policy (retries until its shelf life of 7 days ends, then a fallback)
@app.task(base=RareTask, name="cli.charge", max_attempts=None, fallback="cli.notify_disconnect",
          backoff=backoff.exponential(60, cap=timedelta(days=3)), expires_in=timedelta(days=7))
def charge(invoice: int):
    raise ConnectionError("payment gateway down")


@app.task(base=RareTask, name="cli.notify_disconnect", max_attempts=3, backoff=[10, 60])
def notify_disconnect(invoice: int):
    raise ConnectionError("mail server down")


# schedule: one timeline per payload handler; a fallback chain that would loop
class Notify(RareTask):
    name = "cli.notify"
    dispatch_on = "kind"
    max_attempts = 2
    backoff = 1


@Notify.handler("sms", max_attempts=3, backoff=[5, 30])
def send_sms(payload):
    raise ConnectionError("sms gateway down")


@Notify.handler("email", fallback="cli.letter")
def send_email(payload):
    raise ConnectionError("smtp down")


notify = app.register_task(Notify())


@app.task(base=RareTask, name="cli.letter", max_attempts=2, backoff=60, fallback="cli.notify")
def letter(payload):
    raise ConnectionError("printer down")


# requeue: the bug messages the test publishes name this task; it runs again on the worker
@app.task(base=RareTask, bind=True, name="cli.record", max_attempts=3, backoff=0.2,
          expires_in=timedelta(hours=1))
def record_run(self, tag):
    record("run", self, tag=tag)
    return tag


# a real bug from the worker: fails with Bug on its first run, succeeds once requeued
@app.task(base=RareTask, bind=True, name="cli.broken", bug_queue="cli.real.dead", max_attempts=3)
def broken(self, n: int):
    first = runs(self.request.id) == 0
    record("run", self, n=n)
    if first:
        raise Bug(f"invalid input {n}")
    return n * 2


# one work queue (and so one bug queue) per test
@app.task(base=RareTask, name="cli.inspected", max_attempts=2)
def inspected():
    raise ConnectionError("down")


@app.task(base=RareTask, name="cli.purged", max_attempts=2)
def purged():
    raise ConnectionError("down")


@app.task(base=RareTask, name="cli.watched", max_attempts=3, backoff=[777, 7200])
def watched():
    raise ConnectionError("down")


@app.task(name="cli.plain")
def plain():
    """Not a RareTask: the CLI leaves it alone."""


# status: a circuit breaker whose state the test sets with a state note of its own (nothing runs it)
@app.task(base=RareTask, name="cli.metered", max_attempts=2, backoff=60, breaker="cli-svc", breaker_failures=5,
          breaker_within=60, breaker_open=30, breaker_max_open=300)
def metered():
    raise ConnectionError("down")
