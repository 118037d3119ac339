"""The five scenarios of issue 6. Each ``run_*`` function runs one variant once, in a fresh vhost with
its own worker, and returns a flat dict of metrics (numbers, or None where nothing was measured).

Timing comes from the records the tasks write (see :mod:`bench.apps`); CPU from psutil (worker with
its children, the broker's ``beam.smp``); memory from psutil (RSS and PSS of the worker and children);
message locations from ``rabbitmqctl list_queues``.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field

import psutil

from .apps import BULK, QUEUE, fail_once_name, make_app
from .harness import (
    BenchError,
    Load,
    Records,
    Vhost,
    Worker,
    broker_process,
    get_rabbit_env,
    max_gap,
    new_workdir,
    percentile,
    restore_rabbit_env,
    set_rabbit_env,
)

ALL = ("success-only", "celery-countdown", "celery-native-delay", "rare", "rare-bulk", "rare-quorum")
RETRYING = ("celery-countdown", "celery-native-delay", "rare", "rare-quorum")


@dataclass
class Scenario:
    key: str
    number: str
    title: str
    variants: tuple[str, ...]
    solo: tuple[str, ...] = ()  # variants also run with -P solo (bounded by the solo timeout)
    repeat: bool = True  # False: one run per variant whatever --repeats says
    repeats: int | None = None  # the full run's default repeats, when not the usual 3
    diagnostic: tuple[str, ...] = ()  # extra variants for the full run (or when named with --variants)
    quick_solo: tuple[str, ...] = ()  # the solo variants a --quick run keeps
    full_only: bool = False  # left out of --quick runs unless named with --scenarios


SCENARIOS = {s.key: s for s in (
    Scenario("throughput", "1", "Retry throughput", ALL,
             solo=("success-only", "celery-countdown", "rare", "rare-bulk"), quick_solo=("rare",)),
    Scenario("accuracy", "2", "Delay accuracy", RETRYING),
    Scenario("paced", "2b", "Delay accuracy, paced publishing (diagnostic)", RETRYING, repeat=False,
             full_only=True),
    Scenario("memory", "3", "Pending memory", RETRYING, repeat=False),
    Scenario("success", "4", "Success-path overhead", ("success-only", "rare", "celery-native-delay", "rare-quorum"),
             solo=("success-only", "plain-acks-late", "rare"), quick_solo=("success-only", "rare"),
             diagnostic=("plain-acks-late", "plain-quorum-acks-late"), repeats=5),  # short runs, noisy
    Scenario("timeout", "5", "Long delay under consumer_timeout", ("celery-countdown", "celery-native-delay", "rare"),
             repeat=False),
)}


@dataclass
class Sizes:
    throughput: int = 3000
    accuracy: int = 1000
    memory: int = 20000
    memory_warmup: int = 3000  # enough retries for the pool children's RSS to reach its plateau
    success: int = 5000
    timeout_delay: float = 70.0  # > RabbitMQ 3.10's fixed 60 s consumer-timeout check + 5 s timeout
    consumer_timeout_ms: int = 5000
    solo_timeout: float = 30.0  # a -P solo run stops here (Celery 5.7's solo pool can stall on deferred acks)
    paced_rate: float = 100.0  # tasks/s for the paced accuracy run: the worker keeps up
    limits: dict = field(default_factory=lambda: {
        "throughput": 180.0, "accuracy": 90.0, "memory": 420.0, "success": 120.0})


FULL = Sizes()
QUICK = Sizes(throughput=300, accuracy=100, memory=500, memory_warmup=500, success=500, solo_timeout=10.0,
              limits={"throughput": 60.0, "accuracy": 40.0, "memory": 90.0, "success": 40.0})


# -- shared plumbing ------------------------------------------------------------------------------

class Cpu:
    """CPU seconds used by the worker (with children), the broker and this process between two points."""

    def __init__(self, worker: Worker | None) -> None:
        self.worker, self.broker, self.me = worker, broker_process(), psutil.Process()
        self.start = self._now()

    def from_ready(self, worker: Worker, records: Records) -> Cpu:
        """Count the worker's CPU from when it said it was ready (it may have started on a full queue)."""
        self.worker = worker
        _, broker, me = self.start
        self.start = (records.ready_cpu, broker, me)
        return self

    def _now(self) -> tuple[float, float, float]:
        broker = sum(self.broker.cpu_times()[:2]) if self.broker else 0.0
        worker = self.worker.cpu_seconds() if self.worker is not None else 0.0
        return worker, broker, sum(self.me.cpu_times()[:2])

    def per_task_ms(self, n: int) -> dict:
        end = self._now()
        worker, broker, me = (1000 * (b - a) / max(n, 1) for a, b in zip(self.start, end))
        return {"worker_cpu_ms": worker, "broker_cpu_ms": broker, "publisher_cpu_ms": me}


@dataclass
class Run:
    variant: str
    pool: str
    vhost: Vhost
    records: Records
    app: object
    worker: Worker | None = None
    delays: tuple = (1.0,)
    load: Load | None = None

    def start_worker(self, timeout: float = 60) -> Worker:
        self.worker = Worker(self.variant, self.vhost, self.records.directory, pool=self.pool, delays=self.delays)
        self.worker.wait_ready(self.records, timeout)
        return self.worker

    def measure(self) -> None:
        """From here on, count the CPU other processes use (see :class:`~bench.harness.Load`)."""
        self.load = Load(self.worker)

    def annotate(self, out: dict) -> dict:
        """Add what disturbed the run, if anything: other processes' CPU, the broker going away."""
        out["other_cores"] = self.load.other_cores() if self.load is not None else None
        out["disturbed"] = self.worker.disturbance() if self.worker is not None else None
        return out

    def publish(self, names: list[str], n: int, rate: float | None = None) -> float:
        """Publish ``n`` tasks, cycling through ``names`` (at most ``rate`` a second); returns the time
        of the first publish."""
        tasks = [self.app.tasks[name] for name in names]
        together = self.variant in BULK  # with rare_celery.bulk: one block, confirmed together at its end
        if together:
            from rare_celery import bulk  # (not at the top: the bench also measures versions without it)
        with bulk(self.app) if together else self.app.producer_or_acquire() as producer:
            first = time.time()
            for i in range(n):
                if rate is not None:
                    time.sleep(max(0.0, first + i / rate - time.time()))
                tasks[i % len(tasks)].apply_async((i,), **({} if together else {"producer": producer}))
        return first


@contextlib.contextmanager
def fresh(scenario: str, variant: str, pool: str, delays=(1.0,), profiler=None):
    """A vhost, a record directory and (not yet started) worker settings; all removed afterwards."""
    vhost = Vhost(f"{scenario}-{variant}")
    directory = new_workdir(scenario)
    app = make_app(variant, vhost.url, str(directory), delays)
    run = Run(variant, pool, vhost, Records(directory), app, delays=tuple(delays))
    try:
        yield run
    finally:
        if profiler is not None and run.worker is not None:
            profiler.stop()
        app.close()
        if run.worker is not None:
            run.worker.kill()
        try:
            vhost.delete()
        except BenchError:  # the broker is away: harness.cleanup() tries again at the end
            pass
        shutil.rmtree(directory, ignore_errors=True)


def _limit(sizes: Sizes, scenario: str, pool: str) -> float:
    return sizes.solo_timeout if pool == "solo" else sizes.limits[scenario]


def _outcome(records: Records, n: int, done: bool, worker: Worker | None) -> dict:
    died = worker is not None and not worker.alive()
    return {"completed": len(records.ok), "expected": n, "timed_out": (not done) and not died,
            "worker_died": died}


# -- 1. retry throughput --------------------------------------------------------------------------

def run_throughput(variant: str, pool: str, sizes: Sizes, profiler=None) -> dict:
    """N tasks that fail once and succeed 1 s later (success-only: succeed at once), the worker
    already running; tasks/s from the first publish to the last success."""
    n, limit = sizes.throughput, _limit(sizes, "throughput", pool)
    name = "bench.succeed" if variant == "success-only" else fail_once_name(1.0)
    with fresh("throughput", variant, pool, profiler=profiler) as run:
        worker = run.start_worker()
        if profiler is not None:
            profiler.start(worker)
        cpu = Cpu(worker)
        run.measure()
        first = run.publish([name], n)
        published = time.time() - first
        done = run.records.wait(lambda r: len(r.ok) >= n, limit - published, worker=worker)
        out = _outcome(run.records, n, done, worker)
        out.update(cpu.per_task_ms(n))
        ends = [r[3] for r in run.records.ok]
        starts = run.records.starts()
        last = max(ends) if ends else time.time()
        out.update({
            "tasks_per_s": len(ends) / (last - first) if ends else 0.0,
            "worker_tasks_per_s": len(ends) / (last - starts[0]) if ends else 0.0,
            "publish_s": published,
            "max_pause_s": max_gap(starts),
        })
        failed, ok = run.records.holds()
        for label, holds in (("failed", failed), ("ok", ok)):
            if holds:
                out[f"hold_{label}_p50_ms"] = 1000 * percentile(holds, 50)
                out[f"hold_{label}_p99_ms"] = 1000 * percentile(holds, 99)
        return run.annotate(out)


# -- 2. delay accuracy ----------------------------------------------------------------------------

def run_accuracy(variant: str, pool: str, sizes: Sizes, profiler=None, rate: float | None = None) -> dict:
    """N tasks, alternately retried after 1 s and 5 s; lateness of attempt 2 against its due time.

    Published in one burst, the 1 s retries come back while the worker is still working through the
    first attempts; with ``rate`` (tasks/s) the publishing is paced so the worker keeps up, and the
    lateness is the delay mechanism's own."""
    scenario = "accuracy" if rate is None else "paced"
    n, limit = sizes.accuracy, _limit(sizes, "accuracy", pool) + (0 if rate is None else sizes.accuracy / rate)
    delays = (1.0, 5.0)
    with fresh(scenario, variant, pool, delays=delays, profiler=profiler) as run:
        worker = run.start_worker()
        if profiler is not None:
            profiler.start(worker)
        run.measure()
        first = run.publish([fail_once_name(d) for d in delays], n, rate=rate)
        done = run.records.wait(lambda r: len(r.ok) >= n, limit, worker=worker)
        out = _outcome(run.records, n, done, worker)
        # when the worker had started every first attempt: a 1 s retry due before that waits behind them
        out["first_attempts_done_s"] = max((r[1] for r in run.records.retry), default=first) - first
        due = {r[0]: (r[3], r[3] - r[2]) for r in run.records.retry}  # id -> (due, delay asked)
        late: dict[float, list[float]] = {d: [] for d in delays}
        for task_id, _retries, start, _end in run.records.ok:
            if task_id in due:
                at, asked = due[task_id]
                late[min(delays, key=lambda d: abs(d - asked))].append(1000 * (start - at))
        for d, values in late.items():
            key = f"{d:g}s"
            if not values:
                out.update({f"{key}_p50_ms": None, f"{key}_p99_ms": None, f"{key}_max_ms": None,
                            f"{key}_early": None, f"{key}_over_100ms": None})
                continue
            out.update({
                f"{key}_p50_ms": percentile(values, 50),
                f"{key}_p99_ms": percentile(values, 99),
                f"{key}_max_ms": max(values),
                f"{key}_min_ms": min(values),
                f"{key}_early": sum(1 for v in values if v < 0),
                f"{key}_over_100ms": sum(1 for v in values if v > 100),
                f"{key}_measured": len(values),
            })
        return run.annotate(out)


# -- 3. pending memory ----------------------------------------------------------------------------

def run_memory(variant: str, pool: str, sizes: Sizes, profiler=None) -> dict:
    """N tasks that fail once with a 1 h delay: worker memory and where the messages are."""
    n, limit = sizes.memory, _limit(sizes, "memory", pool)
    warm = sizes.memory_warmup
    with fresh("memory", variant, pool, delays=(1.0, 3600.0), profiler=profiler) as run:
        worker = run.start_worker()
        time.sleep(1.0)
        idle = worker.memory()
        # warm-up: the same code path (retry, then success) for as many retries as it takes the pool
        # children's RSS to reach its plateau (garbage of the retry path, see bench/README.md), so the
        # delta below is what waiting tasks cost, not what running retries cost
        run.publish([fail_once_name(1.0)], warm)
        if not run.records.wait(lambda r: len(r.ok) >= warm, limit / 2, stall=20, worker=worker):
            raise BenchError(f"warm-up did not finish: {len(run.records.ok)}/{warm}")
        time.sleep(1.0)
        warmed = worker.memory()
        if profiler is not None:
            profiler.start(worker)
        run.measure()
        first = run.publish([fail_once_name(3600.0)], n)
        published = time.time() - first

        def waiting(records: Records) -> set[str]:  # tasks whose first attempt ran and asked for 1 h
            return {r[0] for r in records.retry if r[3] - r[2] > 60}

        # every first attempt has run, or nothing new for 20 s (a countdown worker stops taking more)
        done = run.records.wait(lambda r: len(waiting(r)) >= n, limit - published, stall=20, worker=worker)
        ran = len(waiting(run.records))
        duplicates = len(run.records.retry) - len({r[0] for r in run.records.retry})
        time.sleep(2.0)
        pending = worker.memory()
        queues = settled(run.vhost)
        where = {q: s for q, s in queues.items() if s["ready"] or s["unacked"]}
        return run.annotate({
            "first_attempts_run": ran, "expected": n, "timed_out": not done and worker.alive(),
            "duplicate_first_attempts": duplicates,
            "worker_died": not worker.alive(), "publish_s": published,
            "first_attempts_s": max(r[1] for r in run.records.retry) - first if ran else None,
            "rss_idle_mb": idle["rss_mb"], "rss_warm_mb": warmed["rss_mb"],
            "rss_pending_mb": pending["rss_mb"],
            "rss_delta_mb": pending["rss_mb"] - warmed["rss_mb"],
            "rss_delta_idle_mb": pending["rss_mb"] - idle["rss_mb"],
            "pss_delta_mb": pending["pss_mb"] - warmed["pss_mb"],
            "main_delta_mb": pending["main_rss_mb"] - warmed["main_rss_mb"],
            "children_delta_mb": _children(pending) - _children(warmed),
            "children_warmup_mb": _children(warmed) - _children(idle),
            "unacked": sum(s["unacked"] for s in queues.values()),
            "ready_work_queue": queues.get(QUEUE, {}).get("ready", 0),
            "in_delay_queues": sum(s["ready"] + s["unacked"] for q, s in queues.items()
                                   if q.startswith(("rare.delay", "celery_delayed"))),
            "queues": where,
        })


def settled(vhost: Vhost, every: float = 3.0, tries: int = 6) -> dict:
    """Queue counts once two readings ``every`` s apart agree (quorum queues report on a timer)."""
    before = vhost.queues()
    for _ in range(tries):
        time.sleep(every)
        now = vhost.queues()
        if now == before:
            break
        before = now
    return before


def _children(memory: dict) -> float:
    return memory["rss_mb"] - memory["main_rss_mb"]


# -- 4. success-path overhead ---------------------------------------------------------------------

def run_success(variant: str, pool: str, sizes: Sizes, profiler=None) -> dict:
    """N tasks that succeed at once, published before the worker starts (so the publisher, with or
    without confirms, does not set the pace); tasks/s from the first start to the last success."""
    n, limit = sizes.success, _limit(sizes, "success", pool)
    with fresh("success", variant, pool, profiler=profiler) as run:
        run.publish(["bench.succeed"], n)
        cpu = Cpu(None)
        worker = run.start_worker()
        if profiler is not None:
            profiler.start(worker)
        cpu.from_ready(worker, run.records)
        run.measure()
        done = run.records.wait(lambda r: len(r.ok) >= n, limit, worker=worker)
        out = _outcome(run.records, n, done, worker)
        starts = run.records.starts()
        ends = [r[3] for r in run.records.ok]
        out.update(cpu.per_task_ms(len(ends)))
        out.update({
            "tasks_per_s": len(ends) / (max(ends) - starts[0]) if ends else 0.0,
            "max_pause_s": max_gap(starts),
        })
        out.pop("publisher_cpu_ms", None)
        return run.annotate(out)


# -- 5. long delay under consumer_timeout ---------------------------------------------------------

CHANNEL_CLOSED = ("PRECONDITION_FAILED", "delivery acknowledgement")


class TimeoutScenario:
    """Scenario 5 in two halves, so it can wait in the background while other scenarios run.

    ``start``: with RabbitMQ's (global, in 3.10) ``consumer_timeout`` set to a few seconds, start one
    worker per variant (a channel keeps the timeout it was opened with), put the setting back, and
    publish one task per variant that fails and asks for a retry after ``timeout_delay`` seconds,
    longer than the broker's fixed 60 s check. ``finish``: wait for the retries, read the logs.
    """

    def __init__(self, variants, sizes: Sizes) -> None:
        self.variants, self.sizes = list(variants), sizes
        self.stack = contextlib.ExitStack()
        self.runs: dict[str, Run] = {}
        self.published: dict[str, float] = {}
        self.seen_timeout = ""

    def start(self) -> None:
        delay = self.sizes.timeout_delay
        try:
            set_rabbit_env("consumer_timeout", self.sizes.consumer_timeout_ms)
            for variant in self.variants:
                run = self.stack.enter_context(fresh("timeout", variant, "prefork", delays=(delay,)))
                run.worker = Worker(variant, run.vhost, run.records.directory, delays=(delay,))
                self.runs[variant] = run
            for run in self.runs.values():
                run.worker.wait_ready(run.records)
            # the setting is broker-wide: note it if something else changed it while the channels opened
            self.seen_timeout = get_rabbit_env("consumer_timeout")
        finally:
            restore_rabbit_env()
        for variant, run in self.runs.items():
            self.published[variant] = run.publish([fail_once_name(delay)], 1)

    def finish(self) -> dict[str, dict]:
        delay = self.sizes.timeout_delay
        out = {}
        try:
            deadline = max(self.published.values(), default=time.time()) + delay + 30
            for variant, run in self.runs.items():
                try:
                    run.records.wait(lambda r: len(r.ok) >= 1, max(0.0, deadline - time.time()),
                                     interval=0.5, worker=run.worker)
                    out[variant] = self._result(run)
                except (BenchError, OSError, ValueError) as exc:
                    out[variant] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.stack.close()
        return out

    def abort(self) -> None:
        self.stack.close()

    def _result(self, run: Run) -> dict:
        log = run.worker.text()
        closed = [line.strip() for line in log.splitlines() if any(s in line for s in CHANNEL_CLOSED)]
        retried = run.records.retry
        ok = run.records.ok
        return {
            "retry_delay_s": self.sizes.timeout_delay,
            "consumer_timeout_ms": self.sizes.consumer_timeout_ms,
            "consumer_timeout_seen": self.seen_timeout,
            "channel_closed": bool(closed),
            "channel_error": closed[0][:300] if closed else None,
            "worker_exited": not run.worker.alive(),
            "exit_code": run.worker.proc.poll(),
            "attempt2_ran": bool(ok),
            "lateness_ms": 1000 * (ok[0][2] - retried[0][3]) if ok and retried else None,
            "attempts_run": len(retried) + len(ok),
            "disturbed": run.worker.disturbance(),
        }


def run_paced(variant: str, pool: str, sizes: Sizes, profiler=None) -> dict:
    return run_accuracy(variant, pool, sizes, profiler, rate=sizes.paced_rate)


RUNNERS = {"throughput": run_throughput, "accuracy": run_accuracy, "paced": run_paced, "memory": run_memory,
           "success": run_success}
