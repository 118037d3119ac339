"""The Celery app of the circuit-breaker tests: tasks that call a fake downstream service.

The service is down while the file ``$RARE_TEST_DIR/down-<service>`` exists. Every call that
reaches it is recorded (``request``, with whether it was up), every success (``done``), and every
breaker signal (``breaker-open``, ``breaker-probe``, ``breaker-close``) in ``events.jsonl``.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery
from kombu import Queue

from rare_celery import Bug, RareTask, RetryAfter, signals

DIR = os.environ["RARE_TEST_DIR"]
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)
EVENTS = os.path.join(DIR, "breaker-events.jsonl")

app = Celery("breakers", broker=os.environ["RARE_TEST_BROKER"],
             backend=f"tests.support:AtomicFS+file://{DIR}/results")
app.conf.update(
    task_default_queue="breakers",
    task_queues=[Queue("breakers"), Queue("breakers.short"), Queue("breakers.hang"), Queue("breakers.slowprobe"),
                 Queue("breakers.gateway"), Queue("breakers.limited"), Queue("breakers.slotted"),
                 Queue("breakers.single"), Queue("breakers.rated"), Queue("breakers.busy")],
    worker_send_task_events=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


class Down(Exception):
    """The service answered 503."""


def record(kind: str, task_id: str | None, **extra) -> None:
    line = json.dumps({"kind": kind, "id": task_id, "t": time.time(), "pid": os.getpid(), **extra})
    with open(EVENTS, "a") as f:
        f.write(line + "\n")


def down_file(service: str) -> str:
    return os.path.join(DIR, f"down-{service}")


def call_service(task, service: str, key: str) -> str:
    up = not os.path.exists(down_file(service))
    record("request", task.request.id, service=service, up=up, attempt=task.attempt, key=key)
    if not up:
        raise Down(f"{service} answered 503")
    record("done", task.request.id, service=service, attempt=task.attempt, key=key)
    return key


@app.task(base=RareTask, bind=True, name="breakers.translate", queue="breakers", breaker="svc",
          breaker_failures=3, breaker_within=30, breaker_open=2, breaker_max_open=4,
          max_attempts=None, expires_in=120, backoff=0.5, retry_on=(Down,))
def translate(self, key: str):
    return call_service(self, "svc", key)


@app.task(base=RareTask, bind=True, name="breakers.short", queue="breakers.short", breaker="slow",
          breaker_failures=1, breaker_open=60, max_attempts=None, expires_in=4, backoff=0.3, retry_on=(Down,))
def short(self, key: str):
    """A task whose shelf life (4 s) ends while its breaker (open 60 s) holds it."""
    return call_service(self, "slow", key)


@app.task(base=RareTask, bind=True, name="breakers.hang", queue="breakers.hang", breaker="hang",
          breaker_failures=2, breaker_open=1, breaker_max_open=2, time_limit=1.5, max_attempts=None,
          expires_in=60, backoff=0.2)
def hang(self, key: str):
    """A service that hangs while it is down: the hard time limit ends each attempt."""
    up = not os.path.exists(down_file("hang"))
    record("request", self.request.id, service="hang", up=up, attempt=self.attempt, key=key)
    while not up and os.path.exists(down_file("hang")):  # hangs while down: its 1.5 s time limit ends it
        time.sleep(0.05)
    record("done", self.request.id, service="hang", attempt=self.attempt, key=key)
    return key


@app.task(base=RareTask, bind=True, name="breakers.slowprobe", queue="breakers.slowprobe", breaker="slowp",
          breaker_failures=1, breaker_open=1, breaker_max_open=1, max_attempts=None, expires_in=120, backoff=0.2,
          retry_on=(Down,))
def slowprobe(self, key: str):
    """A service that takes 6 s to answer 503 while it is down (sooner if it comes back meanwhile): a long
    probe, with attempts held meanwhile."""
    up = not os.path.exists(down_file("slowp"))
    record("request", self.request.id, service="slowp", up=up, attempt=self.attempt, key=key)
    answers = time.monotonic() + 6
    while not up and time.monotonic() < answers and os.path.exists(down_file("slowp")):
        time.sleep(0.05)
    if not up:
        raise Down("slowp answered 503")
    record("done", self.request.id, service="slowp", attempt=self.attempt, key=key)
    return key


def busy_file(service: str) -> str:
    return os.path.join(DIR, f"busy-{service}")


@app.task(base=RareTask, bind=True, name="breakers.gateway", queue="breakers.gateway", breaker="gateway",
          max_attempts=5, expires_in=120, backoff=0.2)
def gateway(self, key: str):
    """An SMS gateway: the first request that finds the file ``busy-gateway`` gets HTTP 429 with
    ``Retry-After: 3`` (and takes the file away); every other request goes through."""
    try:
        os.remove(busy_file("gateway"))
        busy = True
    except FileNotFoundError:
        busy = False
    record("request", self.request.id, service="gateway", up=not busy, attempt=self.attempt, key=key)
    if busy:
        raise RetryAfter.of({"Retry-After": "3"})
    record("done", self.request.id, service="gateway", attempt=self.attempt, key=key)
    return key


@app.task(base=RareTask, bind=True, name="breakers.limited", queue="breakers.limited", breaker="limited",
          service_rate="20/s", service_concurrency=3, max_attempts=3, expires_in=300, backoff=0.2)
def limited(self, key: str):
    """A service that takes 20 requests a second and 3 at a time: each request records when it began and
    ended (a request takes 0.1 s)."""
    began = time.time()
    time.sleep(0.1)
    record("served", self.request.id, service="limited", began=began, ended=time.time(), attempt=self.attempt,
           key=key)
    return key


@app.task(base=RareTask, bind=True, name="breakers.slotted", queue="breakers.slotted", breaker="slotted",
          service_concurrency=2, max_attempts=3, expires_in=300, backoff=0.2)
def slotted(self, key: str, seconds: float = 0.2):
    """A service that takes 2 requests at a time; the first attempt's takes ``seconds``, a later one's 0.2 s."""
    began = time.time()
    record("serving", self.request.id, service="slotted", began=began, attempt=self.attempt, pid=os.getpid(), key=key)
    time.sleep(seconds if self.attempt == 1 else 0.2)
    record("served", self.request.id, service="slotted", began=began, ended=time.time(), attempt=self.attempt,
           key=key)
    return key


@app.task(base=RareTask, bind=True, name="breakers.single", queue="breakers.single", breaker="single",
          service_concurrency=1, max_attempts=3, expires_in=300, backoff=0.2)
def single(self, key: str):
    """A service that takes one request at a time (0.25 s each); while the file ``bug-single`` exists, each
    attempt raises Bug instead (to the bug queue)."""
    if os.path.exists(os.path.join(DIR, "bug-single")):
        raise Bug("asked to fail")
    began = time.time()
    time.sleep(0.25)
    record("served", self.request.id, service="single", began=began, ended=time.time(), attempt=self.attempt,
           key=key)
    return key


@app.task(base=RareTask, bind=True, name="breakers.busy", queue="breakers.busy", breaker="busy",
          service_concurrency=2, max_attempts=3, expires_in=300, backoff=0.2)
def busy(self, key: str):
    """A service with limits whose first request that finds the file ``busy-busy`` gets HTTP 429 with
    ``Retry-After: 3`` (and takes the file away)."""
    try:
        os.remove(busy_file("busy"))
        answer = 429
    except FileNotFoundError:
        answer = 200
    record("served", self.request.id, service="busy", began=time.time(), ended=time.time(), attempt=self.attempt,
           key=key, answer=answer)
    if answer == 429:
        raise RetryAfter(3)
    return key


@app.task(base=RareTask, bind=True, name="breakers.rated", queue="breakers.rated", breaker="rated",
          service_rate="5/s", max_attempts=3, expires_in=300, backoff=0.2)
def rated(self, key: str):
    """A service that takes 5 requests a second, with no cap on those in flight."""
    record("served", self.request.id, service="rated", began=time.time(), ended=time.time(), attempt=self.attempt,
           key=key)
    return key


@signals.limit_started.connect
def _limit_started(sender=None, service=None, waiting=None, **kw):
    record("limit-start", None, service=service, waiting=waiting)


@signals.limit_stopped.connect
def _limit_stopped(sender=None, service=None, **kw):
    record("limit-stop", None, service=service)


@signals.breaker_opened.connect
def _opened(sender=None, gen=None, until=None, open_for=None, reopened=None, task_id=None, **kw):
    record("breaker-open", task_id, breaker=sender, gen=gen, until=until, open_for=open_for, reopened=reopened,
           why=kw.get("why"))


@signals.breaker_probe.connect
def _probe(sender=None, gen=None, task_id=None, worker=None, **kw):
    record("breaker-probe", task_id, breaker=sender, gen=gen, worker=worker)


@signals.breaker_closed.connect
def _closed(sender=None, gen=None, task_id=None, **kw):
    record("breaker-close", task_id, breaker=sender, gen=gen)
