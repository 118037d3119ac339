"""The Celery app of tests/integration/test_endings.py: one ending per message, on every path.

Work queues: ``endings`` (classic) and ``endings.q`` (quorum, Celery 5.5+), each with a ``.rescue``
queue for fallbacks; ``endings.temp`` (a queue a test deletes) and ``endings.later`` (consumed only
when a test says so). Tasks are made per queue kind (``endings.<kind>.<name>``).

Every run appends one JSON line to ``$RARE_ENDINGS_DIR/rec-<pid>.jsonl`` (see tests.support.Records):
``{"k": "run"|"ok"|"callback"|"errback"|"failure"|"held"|..., "id", "task", "att", ...}``.

**Fault injection** (``inject`` argument of ``work``): the worker's copy of this module wraps functions on
rare_celery's routing path; when the running task's ``inject`` names one of them, that function raises
``Injected`` (``"<step>"``: the first time for this task id, ``"<step>!"``: every time). This is the test
app patching the library from outside, not a hook of the package.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from celery import Celery, signals
from celery._state import get_current_task
from celery.backends.filesystem import FilesystemBackend
from kombu import Queue

import rare_celery.headers
import rare_celery.hops
import rare_celery.message
import rare_celery.policy
import rare_celery.publish
from rare_celery import Bug, Hop, RareTask
from rare_celery import signals as rare_signals
from rare_celery.worker.request import RareRequest
from tests.support import AtomicFS

BROKER = os.environ.get("RARE_ENDINGS_BROKER", "amqp://guest:guest@127.0.0.1//")
DIR = os.environ.get("RARE_ENDINGS_DIR") or tempfile.gettempdir()
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)
KINDS = {"classic": "endings", "quorum": "endings.q"}
MAX_ATTEMPTS = {"work": 3, "rescue": 2, "doomed": 2, "auto": 3, "timed": 3, "holdok": 1, "soft": 3, "once": 1,
                "slowstart": 1, "expiring": 3, "hopper": 3, "racer": 3, "chordpart": 3}


class PlainFS(AtomicFS):
    """Celery's file-system backend without its "never overwrite SUCCESS" check (as the database
    backend): a RETRY stored after a faster next attempt's SUCCESS would overwrite it. Each write is
    atomic, and every state stored is appended to ``states-<id>`` (for the ordering tests)."""

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id
        if str(task_id).startswith("nohop-") and state == "HOPPED":
            raise ConnectionError("result backend down (injected)")
        self.set(self.get_key_for_task(task_id), self.encode(meta))
        with open(os.path.join(DIR, f"states-{task_id}"), "a") as f:
            f.write(f"{time.time()} {state}\n")
        return result


app = Celery("endings", broker=BROKER, backend=f"tests.apps.endings:PlainFS+file://{DIR}/results")


def _queue(name: str, kind: str) -> Queue:
    return Queue(name, queue_arguments={"x-queue-type": "quorum"} if kind == "quorum" else None)


app.conf.update(
    task_default_queue="endings",
    task_queues=[_queue(q, kind) for kind, base in KINDS.items() for q in (base, base + ".rescue")]
    + [Queue("endings.temp"), Queue("endings.later"), Queue("endings.warm")],
    task_routes={**{f"endings.{kind}.rescue": {"queue": base + ".rescue"} for kind, base in KINDS.items()},
                 **{f"endings.{kind}.*": {"queue": base} for kind, base in KINDS.items()},
                 "endings.plain.*": {"queue": "endings"}},
    result_extended=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=int(os.environ.get("RARE_ENDINGS_PREFETCH", "4")),
)


class _Recorder:
    def __init__(self) -> None:
        self.pid = self.file = None

    def __call__(self, kind: str, task_id: str, name: str, att=None, **extra) -> None:
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.file = open(os.path.join(DIR, f"rec-{self.pid}.jsonl"), "a", buffering=1)  # noqa: SIM115
        self.file.write(json.dumps({"k": kind, "id": task_id, "task": name, "att": att, "pid": self.pid,
                                    "t": time.time(), **extra}) + "\n")


record = _Recorder()


def ran(task, **extra) -> int:
    attempt = (task.request.headers or {}).get("x-rare-attempt", 1)
    record("run", task.request.id, task.name, attempt, redelivered=bool((task.request.delivery_info or {})
                                                                         .get("redelivered")), **extra)
    return attempt


def flag(name: str) -> bool:
    return os.path.exists(os.path.join(DIR, name))


def wait_flag(name: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not flag(name) and time.monotonic() < deadline:
        time.sleep(0.05)


def once(key: str) -> bool:
    """True the first time ``key`` is asked, in any process."""
    try:
        os.close(os.open(os.path.join(DIR, f"once-{key}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


# -- the tasks, per queue kind -----------------------------------------------------------------------

def tasks_for(kind: str) -> dict:
    prefix = f"endings.{kind}"
    common = {"base": RareTask, "bind": True}

    @app.task(**common, name=f"{prefix}.rescue", max_attempts=MAX_ATTEMPTS["rescue"], backoff=0.2)
    def rescue(self, plan: str, inject: str = ""):
        ran(self)
        record("ok", self.request.id, self.name)
        return ["rescued", plan]

    @app.task(**common, name=f"{prefix}.work", max_attempts=MAX_ATTEMPTS["work"], backoff=[0.3, 0.6],
              fallback=f"{prefix}.rescue")
    def work(self, plan: str, inject: str = ""):
        """ok | flaky (fails on attempt 1) | always (fallback takes over) | bug | hop (Hop to rescue)."""
        attempt = ran(self)
        if plan == "bug":
            raise Bug("this input can never work")
        if plan == "hop":
            raise Hop(f"{prefix}.rescue", reason="moved on")
        if plan == "always" or (plan == "flaky" and attempt == 1):
            raise ConnectionError(f"{plan}: down on attempt {attempt}")
        record("ok", self.request.id, self.name)
        return [plan, attempt]

    @app.task(**common, name=f"{prefix}.auto", max_attempts=MAX_ATTEMPTS["auto"], backoff=0.2,
              autoretry_for=(Exception,), retry_backoff=False)
    def auto(self, plan: str):
        """Celery's autoretry around a Hop (it must hop once, not retry it) or a plain failure."""
        attempt = ran(self)
        if plan == "hop":
            raise Hop(f"{prefix}.rescue", plan, reason="hop inside autoretry")
        if attempt == 1:
            raise ValueError("autoretried")
        record("ok", self.request.id, self.name)
        return [plan, attempt]

    @app.task(**common, name=f"{prefix}.timed", max_attempts=MAX_ATTEMPTS["timed"], backoff=0.3, time_limit=2)
    def timed(self, seconds: float):
        """Attempt 1 outlives its hard time limit; attempt 2 is quick."""
        attempt = ran(self)
        if attempt == 1:
            time.sleep(seconds)
        record("ok", self.request.id, self.name)
        return ["timed", attempt]

    @app.task(**common, name=f"{prefix}.holdok", max_attempts=MAX_ATTEMPTS["holdok"])
    def holdok(self, tag: str):
        """Succeeds at once; the task_success receiver below then holds the pool process (before the ack)."""
        attempt = ran(self)
        record("ok", self.request.id, self.name)
        return ["holdok", attempt]

    @app.task(**common, name=f"{prefix}.once", max_attempts=MAX_ATTEMPTS["once"])
    def once_only(self, seconds: float = 0):
        """One attempt only: a redelivery counted as a lost attempt would send it to the bug queue."""
        attempt = ran(self)
        time.sleep(seconds)
        record("ok", self.request.id, self.name)
        return ["once", attempt]

    @app.task(**common, name=f"{prefix}.soft", max_attempts=MAX_ATTEMPTS["soft"], backoff=[2], soft_time_limit=3)
    def soft(self):
        """Fails at once; its retry (2 s delay queue) is refused for a while: the soft time limit fires
        while the worker waits to publish it."""
        attempt = ran(self)
        if attempt == 1:
            raise ConnectionError("first attempt fails")
        record("ok", self.request.id, self.name)
        return ["soft", attempt]

    @app.task(**common, name=f"{prefix}.racer", max_attempts=MAX_ATTEMPTS["racer"], backoff=0.05)
    def racer(self):
        """Attempt 1 fails; the states stored when its retry is handed to the main process are recorded."""
        attempt = ran(self)
        if attempt == 1:
            raise ConnectionError("first attempt fails")
        record("ok", self.request.id, self.name)
        return ["racer", attempt]

    @app.task(**common, name=f"{prefix}.chordpart", max_attempts=MAX_ATTEMPTS["chordpart"], backoff=0.2)
    def chordpart(self, n: int):
        attempt = ran(self)
        if n == 0 and attempt == 1:
            raise ConnectionError("the first header task fails once")
        record("ok", self.request.id, self.name)
        return n

    return {"work": work, "rescue": rescue, "auto": auto, "timed": timed, "holdok": holdok, "once": once_only,
            "soft": soft, "racer": racer, "chordpart": chordpart}


TASKS = {kind: tasks_for(kind) for kind in KINDS}


@app.task(base=RareTask, bind=True, name="endings.plain.expiring", max_attempts=3, backoff=[2], expires=1)
def expiring(self):
    """Celery's own ``expires`` (1 s) on the task: it becomes the deadline."""
    attempt = ran(self)
    raise ConnectionError(f"down on attempt {attempt}")


class Later(RareTask):
    name = "endings.plain.later"
    queue = "endings.later"
    max_attempts = 2
    backoff = 0.2
    expires = 0.5

    def run(self):
        ran(self)
        record("ok", self.request.id, self.name)
        return "later"


later = app.register_task(Later())


@app.task(base=RareTask, bind=True, name="endings.plain.temp", queue="endings.temp", max_attempts=3, backoff=[5])
def temp(self):
    """On a queue the test deletes while its retry waits."""
    attempt = ran(self)
    if attempt == 1:
        raise ConnectionError("first attempt fails")
    record("ok", self.request.id, self.name)
    return ["temp", attempt]


@app.task(base=RareTask, bind=True, name="endings.plain.delayed", max_attempts=2, backoff=0.2)
def delayed(self, label: str):
    ran(self, label=label)
    record("ok", self.request.id, self.name)
    return label


class Orphan(RareTask):  # a fallback class that is never registered
    max_attempts = 1


@app.task(base=RareTask, bind=True, name="endings.plain.orphaned", max_attempts=1, fallback=Orphan)
def orphaned(self):
    ran(self)
    raise ConnectionError("down, and the fallback leads nowhere")


@app.task(base=RareTask, bind=True, name="endings.plain.eternal", max_attempts=2, backoff=0.2)
def eternal(self):
    ran(self)
    raise ConnectionError("always down")


@app.task(base=RareTask, bind=True, name="endings.plain.refused", max_attempts=3, backoff=[0.77])
def refused(self):
    """Its retries go to rare.wait.770ms, which a test declares with other arguments: every retry publish
    is refused for good (PRECONDITION_FAILED)."""
    ran(self)
    raise ConnectionError("down")


@app.task(base=RareTask, bind=True, name="endings.plain.nothrow", max_attempts=3, backoff=0.2)
def nothrow(self):
    """``retry(throw=False)`` on attempt 1, then returns: the retry is that delivery's one ending."""
    attempt = ran(self)
    if attempt == 1:
        self.retry(exc=ConnectionError("later"), throw=False)
        return "attempt 1 returned after retry(throw=False)"
    record("ok", self.request.id, self.name)
    return ["nothrow", attempt]


@app.task(base=RareTask, bind=True, name="endings.plain.replacer", max_attempts=2)
def replacer(self):
    ran(self)
    raise self.replace(delayed.s("replaced"))


@app.task(bind=True, name="endings.plain.callback")
def callback(self, result, *args):
    record("callback", self.request.id, self.name, result=result)


@app.task(bind=True, name="endings.plain.errback")
def errback(self, *args, **kwargs):
    record("errback", self.request.id, self.name)


@app.task(bind=True, name="endings.plain.body")
def body(self, results):
    record("body", self.request.id, self.name, results=results)
    return sum(results)


@signals.task_failure.connect
def _failure(sender=None, task_id=None, exception=None, **kw):
    record("failure", task_id, getattr(sender, "name", ""), exception=type(exception).__name__)


@signals.task_success.connect
def _hold_after_success(sender=None, result=None, **kw):
    """``holdok``: after its SUCCESS is stored and before the ack, wait for the test's release."""
    if sender is not None and sender.name.endswith(".holdok"):
        tag = sender.request.args[0]
        if once(f"held-{tag}"):
            record("held", sender.request.id, sender.name)
            wait_flag(f"release-{tag}")


def _states_when_handed(publish_handed):
    """``racer``: when the worker's main process is handed attempt 1's retry (its pool process's run,
    Celery's bookkeeping included, has ended), before the retry's copy is published: the states stored so far."""
    def wrapped(request, retry, exc_info):
        if request.name.endswith(".racer"):
            path = Path(DIR) / f"states-{request.id}"
            states = [line.split()[1] for line in path.read_text().splitlines() if line] if path.exists() else []
            record("handed", request.id, request.name, states=states)
        return publish_handed(request, retry, exc_info)

    return wrapped


RareRequest._publish_handed = _states_when_handed(RareRequest._publish_handed)


# -- fault injection: this app wraps rare_celery's routing path in the worker -------------------------

class Injected(RuntimeError):
    """Raised by a wrapped step of the routing path."""


STEPS = {  # step -> (module, attribute)
    "read": (rare_celery.headers, "read"),
    "decide": (rare_celery.policy.Policy, "decide"),
    "rebuild": (rare_celery.message, "rebuild"),
    "error": (rare_celery.headers, "error"),
    "hop-entry": (rare_celery.hops, "entry"),
    "send": (rare_celery.publish, "send"),
    "mark-retry": (FilesystemBackend, "mark_as_retry"),
    "mark-done": (FilesystemBackend, "mark_as_done"),
    "signal": None,  # a rare_celery signal receiver that raises
}


def _injecting(step: str) -> bool:
    task = get_current_task()
    if task is None or not task.request or not task.request.id:
        return False
    wanted = (task.request.kwargs or {}).get("inject") or ""
    if wanted == step + "!":
        return True
    return wanted == step and once(f"inject-{step}-{task.request.id}")


def _wrap(owner, name: str, step: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if _injecting(step):
            raise Injected(f"injected at {step}")
        return original(*args, **kwargs)

    wrapped.__wrapped__ = original
    setattr(owner, name, wrapped)


def _raise_in_signal(sender=None, **kw):
    if _injecting("signal"):
        raise Injected("injected in a rare_celery signal receiver")


@signals.worker_init.connect
def _install(**kw):
    """Only in the worker (and its pool processes, which inherit the patches)."""
    for step, where in STEPS.items():
        if where is not None:
            _wrap(where[0], where[1], step)
    for sig in (rare_signals.retry_scheduled, rare_signals.routed_to_bugs, rare_signals.hopped):
        sig.connect(_raise_in_signal, weak=False)
