"""The Celery app the core integration tests run in a real worker.

Every task run and every Celery signal is appended to ``$RARE_TEST_DIR/events.jsonl``.
"""

from __future__ import annotations

import functools
import json
import os
import time

from celery import Celery, signals
from kombu import Queue

from rare_celery import Bug, RareTask

DIR = os.environ["RARE_TEST_DIR"]
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)
EVENTS = os.path.join(DIR, "events.jsonl")
QUORUM = os.environ.get("RARE_TEST_QUORUM") == "1"
QUEUE = "core.quorum" if QUORUM else "core"

app = Celery("core", broker=os.environ["RARE_TEST_BROKER"], backend=f"tests.support:AtomicFS+file://{DIR}/results")
app.conf.update(
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, queue_arguments={"x-queue-type": "quorum"} if QUORUM else None),
                 Queue("core.wait")],
    result_extended=True,
    worker_send_task_events=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("RARE_TEST_QUORUM_DELAYS") == "1":  # a cluster's choice: every delay in quorum queues
    app.conf.rare_queue_type = "quorum"


def record(kind: str, task_id: str | None, **extra) -> None:
    line = json.dumps({"kind": kind, "id": task_id, "t": time.time(), "pid": os.getpid(), **extra})
    with open(EVENTS, "a") as f:
        f.write(line + "\n")


def runs(task_id: str) -> int:
    with open(EVENTS) as f:
        return sum(1 for line in f if '"kind": "run"' in line and task_id in line)


def recorded(fn):
    """Record each real run (not the worker's early-arrival re-delays) with its attempt number."""

    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        headers = self.request.headers or {}
        record("run", self.request.id, task=self.name, attempt=headers.get("x-rare-attempt", 1),
               retries=self.request.retries, queue=(self.request.delivery_info or {}).get("routing_key"))
        return fn(self, *args, **kwargs)

    return run


class RecordsItsRetries(RareTask):
    """Celery's ``Task.on_retry`` handler, recorded."""

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        record("on_retry", task_id, exc=repr(exc), args=list(args), traceback=einfo.traceback)


@app.task(base=RecordsItsRetries, bind=True, name="core.flaky", max_attempts=5, backoff=[1, 2])
@recorded
def flaky(self, fails: int, value: str = "ok"):
    """Fails ``fails`` times, then returns ``value`` and how many runs it took."""
    n = runs(self.request.id)
    if n <= fails:
        raise ConnectionError(f"gateway down (run {n})")
    return [value, n]


@app.task(base=RareTask, bind=True, name="core.always", max_attempts=3, backoff=0.3)
@recorded
def always(self):
    raise ConnectionError("gateway down for good")


@app.task(base=RareTask, bind=True, name="core.shelf", max_attempts=None, backoff=1, expires_in=2.5)
@recorded
def shelf(self):
    raise TimeoutError("still down")


@app.task(base=RareTask, bind=True, name="core.slow", max_attempts=2, backoff=[60])
@recorded
def slow(self):
    raise ConnectionError("come back in a minute")


@app.task(base=RareTask, bind=True, name="core.buggy", max_attempts=5, backoff=0.2)
@recorded
def buggy(self, phone: str):
    raise Bug(f"invalid phone number {phone!r}")


@app.task(base=RareTask, bind=True, name="core.picky", max_attempts=5, backoff=0.2, retry_on=(ConnectionError,))
@recorded
def picky(self):
    raise KeyError("not retryable")


@app.task(base=RareTask, bind=True, name="core.countdown", max_attempts=3, backoff=60)
@recorded
def countdown(self, seconds: float):
    """Asks for its own retry with an explicit countdown that is not on the delay grid."""
    if runs(self.request.id) == 1:
        raise self.retry(countdown=seconds)
    return "done"


@app.task(base=RareTask, bind=True, name="core.auto", max_attempts=3, backoff=0.2,
          autoretry_for=(ValueError,))
@recorded
def auto(self):
    if runs(self.request.id) < 3:
        raise ValueError("autoretry")
    return "auto ok"


@app.task(base=RareTask, bind=True, name="core.typed", max_attempts=5, backoff=0.2)
@recorded
def typed(self, a, b):
    return a + b


# canvas: chain(step_a.s(1), step_b.s(), step_c.s()) where b is a RareTask failing twice
@app.task(bind=True, name="core.step_a")
def step_a(self, x):
    record("run", self.request.id, task=self.name)
    return x + 1


@app.task(base=RareTask, bind=True, name="core.step_b", max_attempts=4, backoff=0.2)
@recorded
def step_b(self, x):
    if runs(self.request.id) <= 2:
        raise ConnectionError("b fails")
    return x * 10


@app.task(bind=True, name="core.step_c")
def step_c(self, x):
    record("run", self.request.id, task=self.name)
    return x + 100


@signals.task_retry.connect
def _on_retry(sender=None, request=None, reason=None, einfo=None, **kw):
    record("task_retry", request.id, reason=repr(getattr(reason, "exc", reason)),
           traceback=getattr(einfo, "traceback", None))


@signals.task_failure.connect
def _on_failure(sender=None, task_id=None, exception=None, **kw):
    record("task_failure", task_id, exception=type(exception).__name__)


@app.task(base=RareTask, bind=True, name="core.poison", max_attempts=3, backoff=0.2)
@recorded
def poison(self, deaths: int):
    """Kills the pool process running it ``deaths`` times (a poison message when it always does)."""
    if runs(self.request.id) <= deaths:
        os._exit(1)
    return "survived"
