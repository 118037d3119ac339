"""The Celery app the web console tests point ``rare-celery -A`` at (its worker sends task events).

Runs of ``web.record`` are appended to ``$RARE_TEST_DIR/web-events.jsonl``.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery
from kombu import Queue

from rare_celery import Bug, RareTask

DIR = os.environ["RARE_TEST_DIR"]
EVENTS = os.path.join(DIR, "web-events.jsonl")

app = Celery("web", broker=os.environ["RARE_TEST_BROKER"])
app.conf.update(
    task_default_queue="web.default",
    task_queues=[Queue("web.default"), Queue("web.work"), Queue("web.other")],
    task_routes={"web.record": {"queue": "web.work"}, "web.flaky": {"queue": "web.work"},
                 "web.sms": {"queue": "web.work"}, "web.email": {"queue": "web.other"}},
    worker_send_task_events=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


def record(task, **extra) -> None:
    headers = task.request.headers or {}
    line = json.dumps({"kind": "run", "id": task.request.id, "t": time.time(), "task": task.name,
                       "attempt": headers.get("x-rare-attempt"), **extra})
    with open(EVENTS, "a") as f:
        f.write(line + "\n")


# the bug messages the tests publish name this task; requeued from the console, it runs again here
@app.task(base=RareTask, bind=True, name="web.record", max_attempts=2, backoff=0.2)
def record_run(self, tag):
    record(self, tag=tag)
    return tag


# retries with an off-grid delay (1.99 s: 1900 ms in rare.wait.1900ms, then 90 ms more), then the bug queue
@app.task(base=RareTask, bind=True, name="web.flaky", max_attempts=2, backoff=1.99)
def flaky(self):
    record(self)
    raise ConnectionError("flaky gateway down")


# a fallback chain: web.sms -> web.email, which raises a Bug
@app.task(base=RareTask, bind=True, name="web.sms", max_attempts=1, fallback="web.email")
def sms(self, to):
    record(self)
    raise ConnectionError(f"sms to {to} failed")


@app.task(base=RareTask, bind=True, name="web.email", max_attempts=2, backoff=0.1)
def email(self, to):
    record(self)
    raise Bug(f"no email address for {to}")


# the overview and /metrics: a circuit breaker whose state the test sets with a state note of its own
@app.task(base=RareTask, name="web.metered", queue="web.work", max_attempts=1, breaker="web-svc", breaker_failures=3,
          breaker_within=10, breaker_open=60, breaker_max_open=600)
def metered():
    raise ConnectionError("down")
