"""The Celery app the benchmark runs, one variant per worker, configured by environment variables.

``BENCH_BROKER``   broker URL (the run's own vhost)
``BENCH_VARIANT``  success-only | celery-countdown | celery-native-delay | rare | rare-bulk | rare-quorum, or one of the
                   diagnostic variants plain-acks-late | plain-quorum-acks-late (a plain Task with
                   ``acks_late=True`` like RareTask, on rare's classic / quorum queue)
``BENCH_DIR``      where every process appends its records (``rec-<pid>.txt``)
``BENCH_DELAYS``   comma-separated retry delays in seconds (default ``1``): one fail-once task per delay

Tasks (all on the queue ``bench``):

* ``bench.succeed(i)`` - returns at once (a RareTask in the rare variants, a plain Task otherwise);
* ``bench.fail_once.<D>s(i)`` - fails its first attempt, retried after D seconds, then succeeds.
  Plain variants: ``raise self.retry(countdown=D)``; rare variants: a RareTask with ``backoff=[D]``
  that raises ``ConnectionError``.

Every attempt appends one line to its process's record file, written by the task itself:
``<kind> <task id> <retries> <start> <end> <due>`` with ``kind`` = ``ok`` or ``retry`` and ``due``
= when the retry was asked for + D (``-`` for ``ok``); then, from Celery's ``task_postrun``,
``post <task id> <retries> <time>``: when the process that ran the attempt was done with it. The
worker's main process writes ``ready <pid> <CPU seconds so far>`` when it can take tasks.
"""

from __future__ import annotations

import os
import time

from celery import Celery, Task, signals
from kombu import Exchange, Queue

from rare_celery import RareTask

VARIANTS = ("success-only", "celery-countdown", "celery-native-delay", "rare", "rare-bulk", "rare-quorum")
BULK = ("rare-bulk",)  # the worker of "rare"; the tasks are published inside ``with rare_celery.bulk(app):``
DIAGNOSTIC = ("plain-acks-late", "plain-quorum-acks-late")
QUEUE = "bench"
QUORUM = {"x-queue-type": "quorum"}


class Recorder:
    """One append-only file per process (reopened after a fork), one line per record."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pid = None
        self.file = None

    def write(self, line: str) -> None:
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.file = open(os.path.join(self.directory, f"rec-{self.pid}.txt"), "a", buffering=1)  # noqa: SIM115
        self.file.write(line + "\n")


def delay_label(delay: float) -> str:
    return f"{delay:g}s"


def fail_once_name(delay: float) -> str:
    return f"bench.fail_once.{delay_label(delay)}"


def configure(app: Celery, variant: str) -> None:
    """Queues and transport options of one variant, as its users would set them."""
    app.conf.update(
        task_default_queue=QUEUE,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
    )
    if variant == "celery-native-delay":
        # Celery's "Native Delayed Delivery": a quorum queue on a topic exchange, confirms on,
        # quorum-queue detection on (the default, set explicitly as the docs show).
        exchange = Exchange(QUEUE, type="topic")
        app.conf.update(
            task_queues=[Queue(QUEUE, exchange, routing_key=QUEUE, queue_arguments=QUORUM)],
            task_default_exchange=QUEUE,
            task_default_exchange_type="topic",
            task_default_routing_key=QUEUE,
            broker_transport_options={"confirm_publish": True},
            worker_detect_quorum_queues=True,
        )
    elif variant in ("rare-quorum", "plain-quorum-acks-late"):
        app.conf.task_queues = [Queue(QUEUE, queue_arguments=QUORUM)]
    else:
        app.conf.task_queues = [Queue(QUEUE)]


def make_app(variant: str, broker: str, directory: str, delays=(1.0,)) -> Celery:
    if variant not in VARIANTS + DIAGNOSTIC:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS + DIAGNOSTIC)}")
    app = Celery(f"bench-{variant}", broker=broker, set_as_current=False)
    configure(app, variant)
    recorder = Recorder(directory)
    rare = variant.startswith("rare")
    base = RareTask if rare else Task
    if variant in DIAGNOSTIC:
        app.conf.task_acks_late = True

    @app.task(base=base, bind=True, shared=False, name="bench.succeed", **({"max_attempts": 1} if rare else {}))
    def succeed(self, i):
        start = time.time()
        recorder.write(f"ok {self.request.id} {self.request.retries} {start:.6f} {time.time():.6f} -")
        return i

    def fail_once_task(delay: float):
        def fail_once(self, i):
            start = time.time()
            retries = self.request.retries
            if retries == 0:
                due = time.time() + delay
                recorder.write(f"retry {self.request.id} 0 {start:.6f} {time.time():.6f} {due:.6f}")
                if rare:
                    raise ConnectionError("the first attempt fails")
                raise self.retry(countdown=delay)
            recorder.write(f"ok {self.request.id} {retries} {start:.6f} {time.time():.6f} -")
            return i

        options = {"max_attempts": 2, "backoff": [delay]} if rare else {"max_retries": 3}
        return app.task(base=base, bind=True, shared=False, name=fail_once_name(delay), **options)(fail_once)

    for delay in delays:
        fail_once_task(delay)
    app.bench_recorder = recorder
    return app


def _from_env() -> Celery | None:
    if "BENCH_BROKER" not in os.environ:
        return None
    delays = [float(d) for d in os.environ.get("BENCH_DELAYS", "1").split(",") if d]
    bench = make_app(os.environ["BENCH_VARIANT"], os.environ["BENCH_BROKER"], os.environ["BENCH_DIR"], delays)

    @signals.worker_ready.connect(weak=False)
    def ready(sender=None, **kwargs):
        # CPU seconds of the worker and its pool so far: scenarios that start a worker on a full
        # queue count the worker's CPU from here, not from when the runner noticed it was ready
        import psutil

        me = psutil.Process()
        cpu = sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])
        bench.bench_recorder.write(f"ready {os.getpid()} {cpu:.3f}")

    @signals.task_postrun.connect(weak=False)
    def after(sender=None, task_id=None, task=None, **kwargs):
        # when the pool process is done with an attempt (Celery's bookkeeping and, before issue 28, the
        # retry's confirmed publish included): the hold beyond the task's own run is this minus its end
        bench.bench_recorder.write(f"post {task_id} {task.request.retries or 0} {time.time():.6f}")

    return bench


app = _from_env()
