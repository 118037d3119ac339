"""Benchmark plumbing: vhosts, worker subprocesses, the records tasks write, broker settings, stats."""

from __future__ import annotations

import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
HOST = os.environ.get("BENCH_HOST", "127.0.0.1:5672")


class BenchError(RuntimeError):
    """Something the benchmark needs did not happen (the text says what)."""


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if out.returncode:
        raise BenchError(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip()


# -- vhosts ---------------------------------------------------------------------------------------

_LIVE_VHOSTS: set[str] = set()


class Vhost:
    """A fresh vhost, deleted with everything in it by :meth:`delete` (or :func:`cleanup`)."""

    def __init__(self, label: str) -> None:
        self.name = f"rare-bench-{label}-{uuid.uuid4().hex[:6]}"
        _LIVE_VHOSTS.add(self.name)  # before it exists: an interrupted add_vhost may still have made it
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        self.url = f"amqp://guest:guest@{HOST}/{self.name}"

    def delete(self) -> None:
        if self.name in _LIVE_VHOSTS:
            delete_vhost(self.name)

    def queues(self) -> dict[str, dict[str, int]]:
        """Queue name -> {ready, unacked} as the broker counts them."""
        out = rabbitmqctl("list_queues", "-p", self.name, "--no-table-headers", "name", "messages_ready",
                          "messages_unacknowledged")
        stats = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit():
                stats[parts[0]] = {"ready": int(parts[1]), "unacked": int(parts[2])}
        return stats


def delete_vhost(name: str) -> None:
    try:
        rabbitmqctl("delete_vhost", name)
    except BenchError as exc:
        if "does not exist" not in str(exc) and "no_such_vhost" not in str(exc):
            raise
    _LIVE_VHOSTS.discard(name)


# -- broker settings changed for a scenario ---------------------------------------------------------

_RESTORE: dict[str, str] = {}


def get_rabbit_env(key: str) -> str:
    """The Erlang term of ``application:get_env(rabbit, key)``, e.g. ``{ok,1800000}``."""
    return rabbitmqctl("eval", f"application:get_env(rabbit, {key}).")


def set_rabbit_env(key: str, value: int) -> None:
    """Set a broker-wide setting; the first old value is remembered for :func:`restore_rabbit_env`."""
    if key not in _RESTORE:
        _RESTORE[key] = get_rabbit_env(key)
    rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {int(value)}).")


def restore_rabbit_env() -> None:
    for key, old in list(_RESTORE.items()):
        m = re.fullmatch(r"\{ok,(.+)\}", old)
        if m:
            rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {m.group(1)}).")
        else:  # it was unset
            rabbitmqctl("eval", f"application:unset_env(rabbit, {key}).")
        del _RESTORE[key]


# -- worker subprocesses --------------------------------------------------------------------------

_LIVE_WORKERS: set[Worker] = set()


class Worker:
    """``celery -A bench.apps worker`` for one variant in its own vhost, logging to a file."""

    def __init__(self, variant: str, vhost: Vhost, directory: Path, pool: str = "prefork",
                 concurrency: int = 2, delays=(1.0,), loglevel: str = "warning") -> None:
        self.directory = directory
        self.log = directory / "worker.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "BENCH_BROKER": vhost.url, "BENCH_VARIANT": variant,
               "BENCH_DIR": str(directory), "BENCH_DELAYS": ",".join(f"{d:g}" for d in delays)}
        cmd = [sys.executable, "-m", "celery", "-A", "bench.apps", "worker", "-Q", "bench", "-P", pool,
               "-c", str(concurrency), "--without-mingle", "--without-gossip", "-l", loglevel,
               "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _LIVE_WORKERS.add(self)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, records: Records, timeout: float = 60) -> Worker:
        deadline = time.monotonic() + timeout
        while not records.ready:
            records.poll()
            if not self.alive():
                raise BenchError(f"worker exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"worker not ready after {timeout}s:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        return self

    def processes(self) -> list[psutil.Process]:
        try:
            main = psutil.Process(self.proc.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def memory(self) -> dict[str, float]:
        """RSS and PSS in MB (10^6 bytes) of the worker with all its children (PSS counts shared pages
        once), and the RSS of the main process alone."""
        rss = pss = main = 0
        for proc in self.processes():
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            if proc.pid == self.proc.pid:
                main = info.rss
        return {"rss_mb": rss / 1e6, "pss_mb": pss / 1e6, "main_rss_mb": main / 1e6}

    def cpu_seconds(self) -> float:
        """User + system CPU of the worker and its children so far."""
        total = 0.0
        for proc in self.processes():
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def disturbance(self) -> str | None:
        """What in the worker's log says the broker went away during the run (other sessions restart it)."""
        for line in self.text().splitlines():
            if any(sign in line for sign in _BROKER_TROUBLE):
                return line.strip()[:300]
        return None

    def kill(self) -> int | None:
        """SIGKILL the worker with its pool (its process group): the benchmark needs no graceful stop,
        the vhost and every message in it are deleted next."""
        _LIVE_WORKERS.discard(self)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        return self.proc.returncode


_BROKER_TROUBLE = ("Connection to broker lost", "Cannot connect to amqp", "CONNECTION_FORCED",
                   "broker forced connection closure")


def stale_vhosts() -> list[str]:
    """``rare-bench-*`` vhosts this process did not create (left by a run that was killed)."""
    names = rabbitmqctl("list_vhosts", "--no-table-headers", "name").split()
    return [n for n in names if n.startswith("rare-bench-") and n not in _LIVE_VHOSTS]


def cleanup() -> list[str]:
    """Kill this run's workers, delete its vhosts, restore broker settings; returns what failed."""
    problems = []
    for worker in list(_LIVE_WORKERS):
        worker.kill()
    try:
        restore_rabbit_env()
    except Exception as exc:  # noqa: BLE001 - report, go on cleaning
        problems.append(f"could not restore broker settings {_RESTORE}: {exc}")
    for name in list(_LIVE_VHOSTS):
        try:
            delete_vhost(name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"could not delete vhost {name}: {exc}")
    return problems


# -- what the tasks recorded -----------------------------------------------------------------------

class Records:
    """Reads the record files the worker processes append to, incrementally."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self.ready = False
        self.ready_cpu = 0.0  # the worker's CPU seconds when it became ready
        self.ok: list[tuple[str, int, float, float]] = []  # id, retries, start, end
        self.retry: list[tuple[str, float, float, float]] = []  # id, start, end, due
        self.post: dict[tuple[str, int], float] = {}  # (id, retries) -> when its process was done with it

    def poll(self) -> Records:
        for path in self.directory.glob("rec-*.txt"):
            with path.open() as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            complete = data[: data.rfind("\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                self._parse(line.split())
        return self

    def _parse(self, parts: list[str]) -> None:
        kind = parts[0]
        if kind == "ready":
            self.ready = True
            self.ready_cpu = float(parts[2]) if len(parts) > 2 else 0.0
        elif kind == "ok":
            self.ok.append((parts[1], int(parts[2]), float(parts[3]), float(parts[4])))
        elif kind == "retry":
            self.retry.append((parts[1], float(parts[3]), float(parts[4]), float(parts[5])))
        elif kind == "post":
            self.post[(parts[1], int(parts[2]))] = float(parts[3])

    def holds(self) -> tuple[list[float], list[float]]:
        """Seconds each attempt held its process beyond its own run (task_postrun minus the task's end):
        of the failed attempts, and of the successful ones."""
        failed = [self.post[(i, 0)] - end for i, _, end, _ in self.retry if (i, 0) in self.post]
        ok = [self.post[(i, n)] - end for i, n, _, end in self.ok if (i, n) in self.post]
        return failed, ok

    def starts(self) -> list[float]:
        return sorted([r[2] for r in self.ok] + [r[1] for r in self.retry])

    def wait(self, predicate, timeout: float, interval: float = 0.05, stall: float | None = None,
             worker: Worker | None = None) -> bool:
        """Poll until ``predicate(self)``; False on timeout, when nothing new came for ``stall`` s,
        or when the worker died."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            self.poll()
            if predicate(self):
                return True
            now = time.monotonic()
            seen = len(self.ok) + len(self.retry)
            if seen != last:
                last, last_change = seen, now
            if now > deadline or (stall is not None and now - last_change > stall):
                return False
            if worker is not None and not worker.alive():
                return False
            time.sleep(interval)


def new_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"rare-bench-{prefix}-"))


# -- load from other processes --------------------------------------------------------------------

def broker_process() -> psutil.Process | None:
    """The local RabbitMQ's Erlang VM, for its CPU time."""
    return next((p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"), None)


class Load:
    """CPU used by processes other than the worker, this process and the broker, while a run lasts
    (the machine may be shared: other test suites show up here), in cores on average."""

    def __init__(self, worker: Worker | None = None) -> None:
        self.worker, self.me = worker, psutil.Process()
        self.broker = broker_process()
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        ours = sum(self.me.cpu_times()[:4])
        if self.worker is not None:
            ours += self.worker.cpu_seconds()
        if self.broker is not None:
            try:
                ours += sum(self.broker.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return time.monotonic(), busy, ours

    def other_cores(self) -> float:
        (t0, busy0, ours0), (t1, busy1, ours1) = self.start, self._sample()
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(t1 - t0, 1e-6)


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 0.5) -> float:
    """Wait (at most ``max_wait`` s) until other processes use less than ``threshold`` cores over a
    ``window``: the machine may be shared with test suites. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_wait:
        load = Load()
        time.sleep(window)
        if load.other_cores() < threshold:
            break
    return time.monotonic() - started


# -- statistics -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def max_gap(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


# -- the machine -----------------------------------------------------------------------------------

def machine() -> dict:
    import celery
    import kombu

    try:
        rabbit = rabbitmqctl("eval", "rabbit_misc:version().").strip('"')
    except BenchError:
        rabbit = "unknown"
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "rabbitmq": rabbit,
    }
