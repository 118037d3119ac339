"""The Celery app the cluster test (tests/cluster/test_cluster.py) runs in real workers on the three-node
cluster of scripts/cluster, modelled on tests/apps/faults.py (same tasks, same records, same shape, so
tests.support.Workload can publish to it and count where each job ended).

Only quorum work queues: ``cluster.q`` and its fallback queue ``cluster.q.rescue`` (bug queues
``cluster.q.bugs``, ``cluster.q.rescue.bugs``; retries wait in ``rare.wait.quorum.*``).

Tasks (outcomes depend only on the arguments and the attempt number, so every copy of a message
decides the same way):

* ``cluster.quorum.work(plan, fails)`` - ``ok``: succeeds; ``flaky``: fails (ConnectionError) on attempts
  1..``fails``, then succeeds; ``always``: always fails (bug queue, ``exhausted``); ``bug``: raises Bug;
* ``cluster.quorum.doomed(plan)`` - always fails; after 2 attempts its fallback ``cluster.quorum.rescue``
  takes the work (same task id) and succeeds.

Every run appends one JSON line to ``$RARE_CLUSTER_DIR/rec-<pid>.jsonl`` (one file per process):
``{"k": "run"|"ok", "id", "task", "att", "q", "redelivered", "pid", "t"}`` (tests.support.Records).

Environment: ``RARE_CLUSTER_BROKER`` (a failover URL, ``amqp://...:5673/V;amqp://...:5674/V;...``; each
worker gets the nodes in another order), ``RARE_CLUSTER_DIR``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from celery import Celery
from kombu import Queue

from rare_celery import Bug, RareTask

BROKER = os.environ.get("RARE_CLUSTER_BROKER", "amqp://guest:guest@127.0.0.1:5673//")
DIR = os.environ.get("RARE_CLUSTER_DIR") or tempfile.gettempdir()
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)
QUORUM_ARGS = {"x-queue-type": "quorum"}
KINDS = {"quorum": "cluster.q"}  # kind -> work queue (tests.support.Workload asks for kinds)
MAX_ATTEMPTS = {"work": 4, "doomed": 2, "rescue": 3}
BACKOFF = [0.5, 1.25, 2]  # 1.25 s is off the grid: a second round through rare.wait.quorum.50ms


def queues_of(kind: str) -> list[str]:
    """The queues a worker consumes for ``kind``: the work queue and the rescue (fallback) queue."""
    return [KINDS[kind], KINDS[kind] + ".rescue"]


app = Celery("cluster", broker=BROKER, backend=f"tests.support:AtomicFS+file://{DIR}/results")
app.conf.update(
    task_default_queue="cluster.q",
    task_queues=[Queue(q, queue_arguments=dict(QUORUM_ARGS)) for kind in KINDS for q in queues_of(kind)],
    task_routes={"cluster.quorum.rescue": {"queue": "cluster.q.rescue"}, "cluster.quorum.*": {"queue": "cluster.q"}},
    result_extended=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a worker whose node stopped goes on to the next URL, for ever
    rare_queue_type="quorum",  # the choice for clusters: delay and bug queues, rare.unrouted, all quorum
)


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
            "q": (req.delivery_info or {}).get("routing_key"),
            "redelivered": bool((req.delivery_info or {}).get("redelivered")), "pid": self.pid,
            "t": time.time(), **extra}) + "\n")


record = _Recorder()


def _attempt(task) -> int:
    return (task.request.headers or {}).get("x-rare-attempt", 1)


def _tasks_for(kind: str) -> dict:
    prefix = f"cluster.{kind}"
    common = {"base": RareTask, "bind": True}  # queues: task_routes

    @app.task(**common, name=f"{prefix}.work", max_attempts=MAX_ATTEMPTS["work"], backoff=BACKOFF)
    def work(self, plan: str, fails: int = 0):
        record("run", self)
        if plan == "bug":
            raise Bug(f"plan {plan}: this input can never work")
        if plan == "always" or (plan == "flaky" and _attempt(self) <= fails):
            raise ConnectionError(f"plan {plan}: gateway down on attempt {_attempt(self)}")
        record("ok", self)
        return [plan, _attempt(self)]

    @app.task(**common, name=f"{prefix}.rescue", max_attempts=MAX_ATTEMPTS["rescue"], backoff=0.5)
    def rescue(self, plan: str):
        record("run", self)
        record("ok", self)
        return ["rescued", plan]

    @app.task(**common, name=f"{prefix}.doomed", max_attempts=MAX_ATTEMPTS["doomed"], backoff=0.5,
              fallback=rescue)
    def doomed(self, plan: str):
        record("run", self)
        raise ConnectionError("the primary channel is down for good")

    return {"work": work, "rescue": rescue, "doomed": doomed}


TASKS = {kind: _tasks_for(kind) for kind in KINDS}
