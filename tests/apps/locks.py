"""The app of tests/integration/test_locks.py: RareTasks on quorum work queues that run longer than the
queue's consumer timeout, or whose message keeps coming back.

Work queues (all quorum): ``locks.q`` (``locks.long``, hard time limit 30 s), ``locks.free``
(``locks.free``, no time limit), ``locks.limited`` (``locks.back``, hard time limit 30 s). Prefetch
multiplier 1. Runs are appended to ``$RARE_LOCKS_DIR/events.jsonl``.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery
from kombu import Queue

from rare_celery import RareTask

BROKER = os.environ.get("RARE_LOCKS_BROKER", "amqp://guest:guest@127.0.0.1//")
DIR = os.environ.get("RARE_LOCKS_DIR", "/tmp")
EVENTS = os.path.join(DIR, "events.jsonl")
QUORUM = {"x-queue-type": "quorum"}

app = Celery("locks", broker=BROKER, backend=f"tests.support:AtomicFS+file://{DIR}/results")
app.conf.update(
    task_queues=[Queue("locks.q", queue_arguments=QUORUM), Queue("locks.free", queue_arguments=QUORUM),
                 Queue("locks.limited", queue_arguments=QUORUM)],
    task_default_queue="locks.q",
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)


def record(kind: str, task_id: str) -> None:
    with open(EVENTS, "a") as f:
        f.write(json.dumps({"kind": kind, "id": task_id, "t": time.time(), "pid": os.getpid()}) + "\n")


@app.task(base=RareTask, bind=True, name="locks.long", queue="locks.q", time_limit=30, max_attempts=3, backoff=1)
def long(self, seconds: float):
    record("run", self.request.id)
    time.sleep(seconds)
    return "done"


@app.task(base=RareTask, bind=True, name="locks.free", queue="locks.free", max_attempts=3, backoff=1)
def free(self):
    return "free"


@app.task(base=RareTask, bind=True, name="locks.back", queue="locks.limited", time_limit=30, max_attempts=3, backoff=1)
def back(self, seconds: float):
    record("run", self.request.id)
    time.sleep(seconds)
    return "back"
