"""A Celery app adopted by setting ``task_cls``: every task, Celery's built-ins included, is made
from a RareTask subclass (the drop-in tests: what Celery code relies on keeps working)."""

from __future__ import annotations

import json
import os
import time

from celery import Celery
from celery.exceptions import Reject

from rare_celery import RareTask

DIR = os.environ["RARE_TEST_DIR"]
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)
EVENTS = os.path.join(DIR, "drop-in.jsonl")


class Base(RareTask):
    backoff = 0.05


app = Celery("drop_in", broker=os.environ["RARE_TEST_BROKER"], backend=f"tests.support:AtomicFS+file://{DIR}/results",
             task_cls="tests.apps.drop_in:Base")
app.conf.update(task_default_queue="dropin", worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


def record(task, **extra) -> int:
    """Append this run; returns how many runs the task id had before it."""
    with open(EVENTS, "a+") as f:
        f.seek(0)
        before = sum(1 for line in f if task.request.id in line)
        f.write(json.dumps({"id": task.request.id, "t": time.time(), "attempt": task.attempt,
                            "redelivered": (task.request.delivery_info or {}).get("redelivered"), **extra}) + "\n")
    return before


@app.task(bind=True, name="dropin.reargs")
def reargs(self, foo, bar=0):
    """The first run asks for a retry with new positional or keyword arguments."""
    if record(self) == 0:
        raise self.retry(args=[foo + 1]) if bar >= 0 else self.retry(kwargs={"foo": foo + 10})
    return [foo, bar]


@app.task(bind=True, name="dropin.requeue")
def requeue(self):
    """Asks to be requeued once (``Reject(requeue=True)``), then succeeds."""
    if record(self) == 0:
        raise Reject("not now", requeue=True)
    return "back"


@app.task(bind=True, name="dropin.own_attempt")
def own_attempt(self):
    """Keeps its own ``self.attempt``, as Celery's test_retry does."""
    record(self)
    self.attempt = 41
    self.attempt += 1
    mine = self.attempt
    del self.attempt
    return [mine, self.attempt]


@app.task(name="dropin.slow_add")
def slow_add(x, seconds):
    time.sleep(seconds)
    return x


@app.task(name="dropin.total")
def total(values):
    return sum(values)
