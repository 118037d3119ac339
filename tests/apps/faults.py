"""The Celery app the fault tests (tests/integration/test_faults.py) and bench/load.py run in real workers.

One set of tasks per work-queue kind, each on its own queues:

==========  =================  =========================  ==================================
kind        work queue         fallback (rescue) queue    bug queues
==========  =================  =========================  ==================================
classic     ``faults``         ``faults.rescue``          ``faults.bugs``, ``faults.rescue.bugs``
quorum      ``faults.q``       ``faults.q.rescue``        ``faults.q.bugs``, ``faults.q.rescue.bugs``
==========  =================  =========================  ==================================

Tasks (``<k>`` = ``classic`` or ``quorum``; outcomes depend only on the arguments and the attempt
number, so every copy of a message decides the same way):

* ``faults.<k>.work(plan, fails)`` - ``ok``: succeeds; ``flaky``: fails (ConnectionError) on attempts
  1..``fails``, then succeeds; ``always``: always fails (bug queue, ``exhausted``); ``bug``: raises Bug;
* ``faults.<k>.doomed(plan)`` - always fails; after 2 attempts its fallback ``faults.<k>.rescue`` takes
  the work (same task id) and succeeds;
* ``faults.<k>.hold(tag, then="ok")`` - attempt 1 records ``hold`` and waits until the file ``release-<tag>``
  exists in the record directory (or its worker is killed), then fails if ``then`` is ``fail``; later
  attempts succeed;
* ``faults.<k>.pause(tag)`` - attempt 1 fails, retried after 5 s; the worker's main process then records
  ``paused`` and waits for ``release-<task id>`` (after the delay copy is confirmed and recorded, before
  the ack; blocked there, its consumer still takes what the broker sends, until its connection is closed:
  the test closes it within the 5 s, before attempt 2 is due);
* ``faults.<k>.calm(tag)`` - succeeds; the worker's main process then records ``paused`` and waits for
  ``release-<task id>`` (after the success is kept by the process, before the ack);
* ``faults.<k>.patient(fails)`` - fails on attempts 1..``fails``, retried after 3 s (``rare.wait.3s``);
* ``faults.<k>.poison(deaths)`` - kills its pool process (``os._exit``) on attempts 1..``deaths``;
* ``faults.<k>.hop(plan)`` - hops to ``faults.<k>.rescue`` at once (``Hop``, reason ``soak hop``);
* ``faults.<k>.brittle()`` - always fails, retried every second, with a shelf life of 2.5 s: ``expired``;
* ``faults.<k>.call()`` - calls the fake service: fails while the file ``service-down`` exists in the
  record directory; the breaker ``faults-svc`` (shared by both kinds) stops attempts while it is down.

Every run appends one JSON line to ``$RARE_FAULTS_DIR/rec-<pid>.jsonl`` (one file per process):
``{"k": "run"|"ok"|"hold"|"paused", "id", "task", "att", "q", "redelivered", "pid", "w", "t"}`` (``w``: the
worker's node name).

Environment: ``RARE_FAULTS_BROKER`` (else ``RARE_TEST_BROKER``), ``RARE_FAULTS_DIR`` (else
``RARE_TEST_DIR``), ``RARE_FAULTS_CONFIG`` = ``confirm_off`` | ``pickle`` | ``pickle_type`` (a deliberately broken
configuration the worker must refuse) | ``no_backend`` (no result backend: nothing is recorded in one).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from celery import Celery, signals
from kombu import Queue

from rare_celery import Bug, Hop, RareTask
from rare_celery import endings as rare_endings

BROKER = os.environ.get("RARE_FAULTS_BROKER") or os.environ.get("RARE_TEST_BROKER", "amqp://guest:guest@127.0.0.1//")
DIR = os.environ.get("RARE_FAULTS_DIR") or os.environ.get("RARE_TEST_DIR") or tempfile.gettempdir()
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)
QUORUM_ARGS = {"x-queue-type": "quorum"}
KINDS = {"classic": "faults", "quorum": "faults.q"}  # kind -> work queue
MAX_ATTEMPTS = {"work": 4, "doomed": 2, "rescue": 3, "hold": 3, "pause": 3, "calm": 3, "patient": 3, "poison": 3, "hop": 3,
                "brittle": 10, "call": 8, "limited": 4}
WORK_BACKOFF = [0.5, 1.25, 2]  # work's delays after attempts 1, 2, 3
SHELF_LIFE = 2.5  # brittle's expires_in
BREAKER = {"breaker": "faults-svc", "breaker_failures": 5, "breaker_within": 60, "breaker_open": 2,
           "breaker_max_open": 8}
LIMITED = {"breaker": "faults-lim", "service_concurrency": 2, "service_rate": "20/s"}  # a service with limits
HOLD_LIMIT = 60.0  # a held attempt gives up waiting for its release file after this many seconds


def queues_of(kind: str) -> list[str]:
    """The queues a worker consumes for ``kind``: the work queue and the rescue (fallback) queue."""
    return [KINDS[kind], KINDS[kind] + ".rescue"]


def _queue(name: str, kind: str) -> Queue:
    return Queue(name, queue_arguments=dict(QUORUM_ARGS) if kind == "quorum" else None)


_CONFIG = os.environ.get("RARE_FAULTS_CONFIG")
app = Celery("faults", broker=BROKER,
             backend=None if _CONFIG == "no_backend" else f"tests.support:AtomicFS+file://{DIR}/results")
app.conf.update(
    task_default_queue="faults",
    task_queues=[_queue(q, kind) for kind in KINDS for q in queues_of(kind)],
    task_routes={**{f"faults.{kind}.rescue": {"queue": queue + ".rescue"} for kind, queue in KINDS.items()},
                 **{f"faults.{kind}.*": {"queue": queue} for kind, queue in KINDS.items()}},
    result_extended=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
if _CONFIG == "confirm_off":
    app.conf.broker_transport_options = {"confirm_publish": False}
elif _CONFIG == "pickle":
    app.conf.accept_content = ["json", "pickle"]
elif _CONFIG == "pickle_type":  # the same, by its content type (kombu accepts either)
    app.conf.accept_content = ["json", "application/x-python-serialize"]


class _Recorder:
    """One append-only file per process (reopened after a fork): no interleaving between processes."""

    def __init__(self) -> None:
        self.pid = None
        self.file = None

    def __call__(self, kind: str, task, **extra) -> None:
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.file = open(os.path.join(DIR, f"rec-{self.pid}.jsonl"), "a", buffering=1)  # noqa: SIM115
        req = task.request
        self.file.write(json.dumps({
            "k": kind, "id": req.id, "task": task.name, "att": (req.headers or {}).get("x-rare-attempt", 1),
            "q": (req.delivery_info or {}).get("routing_key"), "w": req.hostname,
            "redelivered": bool((req.delivery_info or {}).get("redelivered")), "pid": self.pid,
            "t": time.time(), **extra}) + "\n")


    def raw(self, kind: str, task_id: str, name: str) -> None:
        """A record made outside a task (the worker's main process)."""
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.file = open(os.path.join(DIR, f"rec-{self.pid}.jsonl"), "a", buffering=1)  # noqa: SIM115
        self.file.write(json.dumps({"k": kind, "id": task_id, "task": name, "pid": self.pid, "t": time.time()}) + "\n")


record = _Recorder()


def _wait_for_release(tag: str) -> None:
    path = os.path.join(DIR, f"release-{tag}")
    deadline = time.monotonic() + HOLD_LIMIT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _attempt(task) -> int:
    return (task.request.headers or {}).get("x-rare-attempt", 1)


def _tasks_for(kind: str) -> dict:
    prefix = f"faults.{kind}"
    common = {"base": RareTask, "bind": True}  # queues: task_routes

    @app.task(**common, name=f"{prefix}.work", max_attempts=MAX_ATTEMPTS["work"], backoff=WORK_BACKOFF)
    def work(self, plan: str, fails: int = 0):
        record("run", self)
        if plan == "bug":
            raise Bug(f"plan {plan}: this input can never work")
        if plan == "always" or (plan == "flaky" and _attempt(self) <= fails):
            raise ConnectionError(f"plan {plan}: gateway down on attempt {_attempt(self)}")
        record("ok", self)
        return [plan, _attempt(self)]

    @app.task(**common, name=f"{prefix}.rescue",
              max_attempts=MAX_ATTEMPTS["rescue"], backoff=0.5)
    def rescue(self, plan: str):
        record("run", self)
        record("ok", self)
        return ["rescued", plan]

    @app.task(**common, name=f"{prefix}.doomed", max_attempts=MAX_ATTEMPTS["doomed"], backoff=0.5,
              fallback=rescue)
    def doomed(self, plan: str):
        record("run", self)
        raise ConnectionError("the primary channel is down for good")

    @app.task(**common, name=f"{prefix}.hold", max_attempts=MAX_ATTEMPTS["hold"], backoff=0.5)
    def hold(self, tag: str, then: str = "ok"):
        record("run", self)
        if _attempt(self) == 1:
            record("hold", self)
            _wait_for_release(tag)
            if then == "fail":
                raise ConnectionError("attempt 1 fails once released")
        record("ok", self)
        return "held"

    @app.task(**common, name=f"{prefix}.pause", max_attempts=MAX_ATTEMPTS["pause"], backoff=5)
    def pause(self, tag: str):
        record("run", self)
        if _attempt(self) == 1:
            raise ConnectionError("the first attempt fails")
        record("ok", self)
        return "paused"

    @app.task(**common, name=f"{prefix}.calm", max_attempts=MAX_ATTEMPTS["calm"])
    def calm(self, tag: str):
        record("run", self)
        record("ok", self)
        return "calm"

    @app.task(**common, name=f"{prefix}.patient", max_attempts=MAX_ATTEMPTS["patient"], backoff=3)
    def patient(self, fails: int):
        record("run", self)
        if _attempt(self) <= fails:
            raise ConnectionError(f"down on attempt {_attempt(self)}; next try in 3 s")
        record("ok", self)
        return ["patient", _attempt(self)]

    @app.task(**common, name=f"{prefix}.poison", max_attempts=MAX_ATTEMPTS["poison"], backoff=0.2)
    def poison(self, deaths: int):
        record("run", self)
        if _attempt(self) <= deaths:
            os._exit(1)
        record("ok", self)
        return "survived"

    @app.task(**common, name=f"{prefix}.hop", max_attempts=MAX_ATTEMPTS["hop"], backoff=0.5)
    def hop(self, plan: str):
        record("run", self)
        raise Hop(f"{prefix}.rescue", plan, reason="soak hop")

    @app.task(**common, name=f"{prefix}.brittle", max_attempts=MAX_ATTEMPTS["brittle"], backoff=1,
              expires_in=SHELF_LIFE)
    def brittle(self):
        record("run", self)
        raise ConnectionError("down until its shelf life ends")

    @app.task(**common, name=f"{prefix}.call", max_attempts=MAX_ATTEMPTS["call"], backoff=[0.5, 1, 2, 3], **BREAKER)
    def call(self):
        record("run", self)
        if os.path.exists(os.path.join(DIR, "service-down")):
            raise ConnectionError("the service answers 503")
        record("ok", self)
        return "called"

    @app.task(**common, name=f"{prefix}.limited", max_attempts=MAX_ATTEMPTS["limited"], backoff=0.5, **LIMITED)
    def limited(self):
        """A call to a service that takes 2 at a time and 20 a second (both kinds share it): attempts wait
        in its lines (rare.limit.faults-lim.line, .line.quorum) and are woken."""
        record("run", self)
        time.sleep(0.05)
        record("ok", self)
        return "limited"

    return {"work": work, "rescue": rescue, "doomed": doomed, "hold": hold, "pause": pause, "calm": calm, "patient": patient,
            "poison": poison, "hop": hop, "brittle": brittle, "call": call, "limited": limited}


TASKS = {kind: _tasks_for(kind) for kind in KINDS}


def _hold_once(task_id: str | None, name: str) -> None:
    """The worker's main process records ``paused`` for ``task_id`` and waits for its release, once."""
    if not task_id:
        return
    try:
        os.close(os.open(os.path.join(DIR, f"paused-{task_id}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    record.raw("paused", task_id, name)
    _wait_for_release(task_id)


def _pause_between_publish_and_ack(record_ended):
    """Test hook, in the worker's main process: the first retry of ``pause`` waits here, after its delay
    copy is confirmed and recorded as ended and before its message is acked, until the test releases it
    (``release-<task id>``)."""
    def wrapped(task, headers, how):
        record_ended(task, headers, how)
        if task is None or not task.name.endswith(".pause") or how != rare_endings.RETRY:
            return
        if headers.get("x-rare-attempt", 1) == 1:
            _hold_once(headers.get("id"), task.name)

    wrapped.__wrapped__ = record_ended
    return wrapped


def _pause_between_success_and_ack(ended_here):
    """Test hook, in the worker's main process: a success of ``calm`` waits here, after the process kept
    it and before its message is acked, until the test releases it (``release-<task id>``)."""
    def wrapped(headers, how):
        ended_here(headers, how)
        name = str((headers or {}).get("task", ""))
        if how == rare_endings.SUCCESS and name.endswith(".calm") and not _IN_POOL:
            _hold_once(headers.get("id"), name)

    wrapped.__wrapped__ = ended_here
    return wrapped


_IN_POOL = False


@signals.worker_process_init.connect(weak=False)
def _in_pool(**kwargs) -> None:
    global _IN_POOL
    _IN_POOL = True


rare_endings.record_ended = _pause_between_publish_and_ack(rare_endings.record_ended)
rare_endings.ended_here = _pause_between_success_and_ack(rare_endings.ended_here)
