"""Test support: a vhost per test run, real celery worker subprocesses, broker look-ups, polling."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
HOST = os.environ.get("RARE_TEST_HOST", "127.0.0.1:5672")


def rabbitmqctl(*args: str) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def broker_cycle_lines() -> int:
    """How many times the broker's log says it dropped a dead-lettered message as a cycle (3.10:
    "Dead-letter queues cycle detected"; 4.x: "... contains a dead letter cycle ...")."""
    code = ('[F|_] = rabbit:log_locations(), {ok, B} = file:read_file(F), '
            'length(binary:matches(B, [<<"cycle detected">>, <<"dead letter cycle">>])).')
    return int(rabbitmqctl("eval", code).strip())


class Vhost:
    """A fresh vhost for one test session, deleted (with everything in it) at the end."""

    def __init__(self) -> None:
        self.name = f"rare-test-{uuid.uuid4().hex[:8]}"
        default_type = os.environ.get("RARE_TEST_DEFAULT_QUEUE_TYPE")  # quorum: as Amazon MQ 4.2 makes them
        rabbitmqctl("add_vhost", self.name, *(["--default-queue-type", default_type] if default_type else []))
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        self.url = f"amqp://guest:guest@{HOST}/{self.name}"

    def delete(self) -> None:
        rabbitmqctl("delete_vhost", self.name)

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """name -> {ready, unacked, consumers}, read from the broker (includes unacked counts)."""
        out = rabbitmqctl("list_queues", "-p", self.name, "--no-table-headers", "name", "messages_ready",
                          "messages_unacknowledged", "consumers")
        stats = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[1].isdigit():
                stats[parts[0]] = {"ready": int(parts[1]), "unacked": int(parts[2]), "consumers": int(parts[3])}
        return stats


# the type an untyped work queue gets in the test vhosts (make test-quorum-vhost makes them quorum)
UNTYPED_KIND = "quorum" if os.environ.get("RARE_TEST_DEFAULT_QUEUE_TYPE") == "quorum" else "classic"
CELERY = tuple(int(p) for p in __import__("celery").__version__.split(".")[:2])
QUORUM_OK = CELERY >= (5, 5)
KINDS = ["classic", "quorum"] if QUORUM_OK else ["classic"]  # Celery 5.4 cannot consume quorum queues


def app_module(name: str, env: dict):
    """The test process's copy of the test app module ``name``, loaded (again) with ``env`` set, so
    that it points at the calling test module's vhost. Returns the module and the previous values."""
    import importlib

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    return module, saved


def restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def take_exclusive(conn: Connection, name: str, timeout: float = 10) -> None:
    """Declare the exclusive queue ``name`` (a lock) on ``conn`` once its last holder's is gone: the
    broker deletes an exclusive queue when it sees its connection gone, a moment after that
    connection's close-ok, and refuses a declare in that moment (RESOURCE_LOCKED)."""
    from amqp.exceptions import ResourceLocked

    def taken() -> bool:
        try:
            conn.channel().queue_declare(name, exclusive=True, auto_delete=False,
                                         arguments={"x-queue-type": "classic"})
        except ResourceLocked:
            return False
        return True
    wait_for(taken, timeout, 0.05, f"the lock {name} free")


class Worker:
    """``celery -A <app> worker`` in a subprocess, with its log in a file."""

    def __init__(self, app: str, queues: list[str], env: dict, workdir: Path, pool: str = "prefork",
                 concurrency: int = 2, name: str | None = None, extra: list[str] | None = None) -> None:
        self.log = workdir / f"worker-{name or app.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:6]}.log"
        node = f"{name or 'w'}-{uuid.uuid4().hex[:6]}"
        self.node = f"{node}@{socket.gethostname()}"  # the worker's node name: task.request.hostname
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", ",".join(queues), "-P", pool,
               "-c", str(concurrency), "--without-mingle", "--without-gossip", "-l", os.environ.get("RARE_TEST_LOGLEVEL", "info"),
               "-n", f"{node}@%h", *(extra or [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> Worker:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            return " ready." in self.text()
        wait_for(ready, timeout, 0.1, "the worker to be ready")
        return self

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


class Events:
    """The JSON-lines record the test apps write (task runs and signals), read back by tests."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def of(self, task_id: str, kind: str | None = None) -> list[dict]:
        return [e for e in self.all() if e.get("id") == task_id and (kind is None or e["kind"] == kind)]


def drain(url: str, queue: str) -> list:
    """Take every message out of ``queue`` (acked): for tests that own the queue."""
    out = []
    with Connection(url) as conn:
        channel = conn.channel()
        while True:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                return out
            out.append(message)


def message_count(url: str, queue: str) -> int:
    with Connection(url) as conn:
        return conn.channel().queue_declare(queue, passive=True).message_count


class BugQueues:
    """Reads bug queues for tests: every message taken out is kept here by task id, so a test
    looking for its own message never loses another test's."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: dict[tuple[str, str], list] = {}

    def find(self, queue: str, task_id: str, timeout: float = 15):
        def look():
            for message in drain(self.url, queue):
                key = (queue, (message.headers or {}).get("id") or message.properties.get("correlation_id") or "")
                self.seen.setdefault(key, []).append(message)
            return self.seen.get((queue, task_id))
        found = wait_for(look, timeout, 0.2, f"task {task_id} in {queue}")
        assert len(found) == 1, f"{task_id} is in {queue} {len(found)} times"
        return found[0]


def atomic_filesystem_backend():
    """Celery's file-system result backend, writing each result atomically (temp file + rename), so a
    test reading a result never sees half a file. Use as ``tests.support:AtomicFS+file:///dir``."""
    from celery.backends.filesystem import FilesystemBackend

    class AtomicFS(FilesystemBackend):
        def set(self, key, value):
            path = self._filename(key)
            tmp = path + b".tmp-%d" % os.getpid()
            with self.open(tmp, "wb") as f:
                f.write(value if isinstance(value, bytes) else value.encode())
            os.replace(tmp, path)

    return AtomicFS


AtomicFS = atomic_filesystem_backend()


# -- fault tests and bench/load.py: records of tests/apps/faults.py, broker connections, conservation ----


class Records:
    """The JSON lines tests/apps/faults.py writes, one file per process, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def all(self) -> list[dict]:
        out = []
        for path in sorted(self.directory.glob("rec-*.jsonl")):
            for line in path.read_text().splitlines():
                if line.endswith("}"):  # a line being written is skipped until it is whole
                    out.append(json.loads(line))
        return out

    def of(self, task_id: str, kind: str | None = None) -> list[dict]:
        out = []
        for path in sorted(self.directory.glob("rec-*.jsonl")):
            for line in path.read_text().splitlines():
                if task_id in line and line.endswith("}"):
                    r = json.loads(line)
                    if r["id"] == task_id and (kind is None or r["k"] == kind):
                        out.append(r)
        return sorted(out, key=lambda r: r["t"])


def local_ports(pid: int) -> set[int]:
    """TCP ports of the sockets process ``pid`` has open (Linux /proc): to find its broker connections."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def close_connections(vhost: str, pid: int, reason: str = "closed by a fault test") -> int:
    """Close, from the broker side, every connection process ``pid`` has to ``vhost``; how many.
    One ``rabbitmqctl eval`` (one start of rabbitmqctl's VM, 1-3 s on a busy machine), not one to list
    and one per connection: the tests that close a worker's connections while it holds a message count
    on the close coming within the seconds before the next delivery."""
    ports = sorted(local_ports(pid))
    if not ports:
        return 0
    code = (
        f"Ports = {ports}, VHost = <<\"{_erlang_text(vhost)}\">>, "
        "Mine = [proplists:get_value(pid, I) || I <- rabbit_networking:connection_info_all([pid, vhost, peer_port]), "
        "proplists:get_value(vhost, I) =:= VHost, lists:member(proplists:get_value(peer_port, I), Ports)], "
        f"[rabbit_networking:close_connection(P, \"{_erlang_text(reason)}\") || P <- Mine], length(Mine)."
    )
    return int(rabbitmqctl("eval", code).strip())


def _erlang_text(text: str) -> str:
    if any(c in text for c in '"\\~'):
        raise ValueError(f"not for an Erlang string: {text!r}")
    return text


def restart_broker_app(timeout: float = 120) -> float:
    """``rabbitmqctl stop_app`` then ``start_app`` and ``await_startup``: the broker restarts for
    everyone on this machine, so the outage is as short as RabbitMQ allows. Returns its length (s)."""
    start = time.monotonic()
    rabbitmqctl("stop_app")
    for last in (False, True):  # never leave the broker stopped because one start_app failed
        try:
            rabbitmqctl("start_app")
            break
        except RuntimeError:
            if last:
                raise
            time.sleep(2)
    subprocess.run(["rabbitmqctl", "-q", "await_startup", "--timeout", str(int(timeout))],
                   capture_output=True, timeout=timeout + 10, check=True)
    return time.monotonic() - start


# A random workload through tests/apps/faults.py and its conservation check (fault tests, bench/load.py).

from dataclasses import dataclass, field

PLANS = (("ok", 40), ("flaky", 25), ("always", 10), ("bug", 10), ("fallback", 15))  # plan, weight in %
EXPECTED = {  # plan -> (success expected?, bug-queue reasons it may end with)
    "ok": (True, {"worker_lost"}),
    "flaky": (True, {"worker_lost"}),
    "fallback": (True, {"worker_lost"}),
    "always": (False, {"exhausted", "worker_lost"}),
    "bug": (False, {"bug", "worker_lost"}),
}


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    plan: str
    fails: int = 0


def publish_jobs(faults, kind: str, n: int, rng) -> dict[str, Job]:
    """Publish ``n`` tasks with random plans (see :data:`PLANS`) to ``kind``'s work queue."""
    tasks = faults.TASKS[kind]
    plans = rng.choices([p for p, _ in PLANS], weights=[w for _, w in PLANS], k=n)
    jobs = {}
    with faults.app.producer_or_acquire() as producer:
        for plan in plans:
            fails = rng.randint(1, 2) if plan == "flaky" else 0
            if plan == "fallback":
                result = tasks["doomed"].apply_async((plan,), producer=producer)
            else:
                result = tasks["work"].apply_async((plan, fails), producer=producer)
            jobs[result.id] = Job(result.id, kind, plan, fails)
    return jobs


@dataclass
class Tally:
    """What became of the jobs of one queue kind."""

    kind: str
    published: int = 0
    succeeded: int = 0
    rescued: int = 0  # of the succeeded: by the fallback task
    bugs: dict = field(default_factory=dict)  # reason -> how many ended in a bug queue with it
    duplicated: int = 0  # ids that ran an attempt, or reached an end, more than once (at least once)
    lost: int = 0  # ids in no end and in no queue
    stuck: int = 0  # ids still waiting in a queue when the run ended
    over_limit: int = 0  # ids that ran more distinct attempts of a task than its max_attempts
    wrong: int = 0  # ids that ended where their plan cannot end (e.g. an "ok" job with reason "bug")
    runs: int = 0
    problems: list = field(default_factory=list)

    @property
    def bugged(self) -> int:
        return sum(self.bugs.values())

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stuck or self.over_limit or self.wrong)


def bug_reasons(messages) -> dict[str, list[str]]:
    """Task id -> reasons of its copies among ``messages`` (taken from bug queues)."""
    out: dict[str, list[str]] = {}
    for message in messages:
        headers = message.headers or {}
        out.setdefault(headers.get("id") or "", []).append(headers.get("x-rare-reason"))
    return out


def tally(jobs: dict[str, Job], records: list[dict], bugs: dict[str, list[str]], max_attempts: dict[str, int],
          waiting: set[str] = frozenset()) -> dict[str, Tally]:
    """Conservation: each job is in exactly one end (its own success record or the bug queue) or
    still ``waiting`` (seen in a work or delay queue); none ran more attempts than its policy allows.
    Repeats explained by at-least-once delivery are counted as ``duplicated``, not as errors."""
    oks: dict[str, int] = {}
    rescued: set[str] = set()
    runs: dict[tuple, int] = {}
    for r in records:
        if r["k"] == "ok":
            oks[r["id"]] = oks.get(r["id"], 0) + 1
            if r["task"].endswith(".rescue"):
                rescued.add(r["id"])
        elif r["k"] == "run":
            key = (r["id"], r["task"].rsplit(".", 1)[-1], r["att"])
            runs[key] = runs.get(key, 0) + 1
    attempts: dict[str, dict[str, set]] = {}
    repeated: set[str] = set()
    for (task_id, task, att), count in runs.items():
        attempts.setdefault(task_id, {}).setdefault(task, set()).add(att)
        if count > 1:
            repeated.add(task_id)
    out = {kind: Tally(kind) for kind in sorted({j.kind for j in jobs.values()})}
    for job in jobs.values():
        t = out[job.kind]
        t.published += 1
        t.runs += sum(len(a) for a in attempts.get(job.id, {}).values())
        succeeded, reasons = oks.get(job.id, 0), bugs.get(job.id, [])
        success_expected, allowed = EXPECTED[job.plan]
        if succeeded:
            t.succeeded += 1
            t.rescued += job.id in rescued
        elif reasons:
            t.bugs[reasons[0]] = t.bugs.get(reasons[0], 0) + 1
        elif job.id in waiting:
            t.stuck += 1
            t.problems.append(f"{job.id} ({job.plan}) is still waiting in a queue")
        else:
            t.lost += 1
            t.problems.append(f"{job.id} ({job.plan}) is lost: no success, not in a bug queue, in no queue")
        if succeeded + len(reasons) > 1 or job.id in repeated:
            t.duplicated += 1
        bad = [r for r in reasons if r not in allowed] + (["success"] if succeeded and not success_expected else [])
        if bad:
            t.wrong += 1
            t.problems.append(f"{job.id} ({job.plan}) ended as {bad}")
        for task, seen in attempts.get(job.id, {}).items():
            if len(seen) > max_attempts[task] or max(seen) > max_attempts[task]:
                t.over_limit += 1
                t.problems.append(f"{job.id} ({job.plan}) ran attempts {sorted(seen)} of {task}")
    return out


def tally_table(tallies, title: str = "") -> str:
    """A Markdown table of :func:`tally`'s result."""
    lines = ([f"{title}", ""] if title else []) + [
        ("| queue type | published | attempts run | succeeded (by the fallback) | bug queue (reasons) | lost | "
         "duplicated | stuck | over limit | wrong end |"),
        "|---|---|---|---|---|---|---|---|---|---|"]
    for t in tallies:
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(t.bugs.items())) or "-"
        lines.append(f"| {t.kind} | {t.published:,} | {t.runs:,} | {t.succeeded:,} ({t.rescued:,}) | {t.bugged:,} "
                     f"({reasons}) | {t.lost} | {t.duplicated} | {t.stuck} | {t.over_limit} | {t.wrong} |")
    return "\n".join(lines)


def peek_ids(url: str, queues) -> set[str]:
    """Task ids of the messages ready in ``queues``, read without taking them (they go back when the
    connection closes): what is still waiting when a run ends."""
    from amqp.exceptions import NotFound

    ids: set[str] = set()
    with Connection(url) as conn:
        channel = conn.channel()
        for queue in queues:
            try:
                count = channel.queue_declare(queue, passive=True).message_count
            except NotFound:
                channel = conn.channel()
                continue
            for _ in range(count):
                message = channel.basic_get(queue, no_ack=False)
                if message is None:
                    break
                ids.add((message.headers or {}).get("id") or "")
    return ids


def ready_counts(url: str, queues) -> dict[str, int]:
    """Messages ready in each of ``queues`` as the queue itself says (passive declare: exact for quorum
    queues too, whose ``rabbitmqctl list_queues`` numbers lag up to 5 s)."""
    from amqp.exceptions import NotFound

    out = {}
    with Connection(url) as conn:
        channel = conn.channel()
        for queue in queues:
            try:
                out[queue] = channel.queue_declare(queue, passive=True).message_count
            except NotFound:
                channel = conn.channel()
    return out


class Workload:
    """Random jobs through tests/apps/faults.py: publish, collect where each one ended (its success
    record, or a bug queue), wait until every job ended and nothing is in flight, then :func:`tally`."""

    def __init__(self, faults, vhost, records_dir: Path, kinds, seed: int = 0) -> None:
        import random

        self.faults, self.vhost, self.kinds = faults, vhost, list(kinds)
        self.records = Records(records_dir)
        self.rng = random.Random(seed)
        self.jobs: dict[str, Job] = {}
        self.bug_messages: list = []
        self.bug_queues = [q + ".bugs" for kind in self.kinds for q in faults.queues_of(kind)]
        self._oks: set[str] = set()
        self._offsets: dict[Path, int] = {}

    def publish(self, per_kind: int) -> None:
        for kind in self.kinds:
            self.jobs.update(publish_jobs(self.faults, kind, per_kind, self.rng))

    def _new_oks(self) -> None:
        for path in self.records.directory.glob("rec-*.jsonl"):
            with path.open("rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(whole)
            for line in whole.decode().splitlines():
                if '"k": "ok"' in line:
                    self._oks.add(json.loads(line)["id"])

    def ended(self) -> set[str]:
        """Ids of this workload's jobs that ended (so far)."""
        for queue in self.bug_queues:
            self.bug_messages.extend(drain(self.vhost.url, queue))
        self._new_oks()
        ended = self._oks | {(m.headers or {}).get("id") for m in self.bug_messages}
        return ended & self.jobs.keys()

    def in_flight(self) -> int:
        """Messages ready in work and delay queues (and rare.unrouted), plus unacked ones (classic queues
        only: exact)."""
        return sum(ready + unacked for ready, unacked, _ in self.held().values())

    def holding(self) -> dict[str, str]:
        """Queue -> what it holds (ready, unacked) and its consumers: what a failure message shows."""
        return {q: f"{ready} ready, {unacked} unacked, {consumers} consumers"
                for q, (ready, unacked, consumers) in self.held().items()}

    def held(self) -> dict[str, tuple[int, int, int]]:
        """Queue -> (ready, unacked, consumers) for the queues that hold something, bug queues left out."""
        stats = self.vhost.queue_stats()
        queues = [q for q in stats if not q.endswith(".bugs") and not q.startswith(("celery", "faults.filler", "rare.breaker"))
                  and ".pidbox" not in q and not q.startswith("celeryev")]
        ready = ready_counts(self.vhost.url, queues)
        return {q: (ready.get(q, 0), stats[q]["unacked"], stats[q]["consumers"])
                for q in queues if ready.get(q, 0) + stats[q]["unacked"]}

    def wait(self, timeout: float, stall: float = 30, interval: float = 0.5, progress=None) -> bool:
        """Until every job ended and nothing is in flight (True), or ``timeout`` s, or no job ended for
        ``stall`` s (False)."""
        start = last_change = time.monotonic()
        done = -1
        while time.monotonic() - start < timeout:
            ended = len(self.ended())
            if progress:
                progress(ended)
            if ended != done:
                done, last_change = ended, time.monotonic()
            if ended == len(self.jobs) and self.in_flight() == 0:
                return True
            if time.monotonic() - last_change > stall:
                return False
            time.sleep(interval)
        return False

    def tally(self) -> dict[str, Tally]:
        ended = self.ended()
        waiting: set[str] = set()
        if len(ended) < len(self.jobs):
            queues = [q for q in self.vhost.queue_stats() if not q.endswith(".bugs")]
            waiting = peek_ids(self.vhost.url, queues) & (self.jobs.keys() - ended)
        return tally(self.jobs, self.records.all(), bug_reasons(self.bug_messages), self.faults.MAX_ATTEMPTS,
                     waiting)


# -- a TCP proxy on loopback that can go silent (issue 24: a dead connection that is not closed) ------------

class StallingProxy:
    """Forwards TCP connections from 127.0.0.1:``port`` to the broker; after the client has sent
    ``stall_after_acks`` ``basic.ack`` frames it stops forwarding anything, either way, without closing
    (a cable pulled, a NAT entry dropped): the broker and the client each see a silent peer. ``stalled.set()``
    does it at once, wherever the bytes stand; ``cut.set()`` does it in the middle of the next frame the
    broker sends (its header and one byte of its payload arrive, nothing more), and so does ``cut_after``
    once that many bytes came from the broker on a connection. ``close()`` ends every
    connection (the broker then puts back what it had handed out)."""

    BASIC_ACK = (60, 80)

    def __init__(self, stall_after_acks: int | None = None, target: str = HOST, cut_after: int | None = None) -> None:
        import socket
        import threading

        self.stall_after_acks, self.acks, self.stalled = stall_after_acks, 0, threading.Event()
        self.cut, self.cut_after = threading.Event(), cut_after
        host, _, port = target.partition(":")
        self.target = (host, int(port or 5672))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, vhost: str, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{vhost}"

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, from_client: bool) -> None:
        import struct

        buffer, header_seen = b"", not from_client
        frame = _FrameWalker()  # where the broker's frames start and end, for cut
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.stalled.is_set():
                continue  # read and dropped: nothing arrives, nothing is refused
            out = data
            if not from_client:
                at = frame.walk(data, self.cut.is_set() or (self.cut_after is not None and frame.seen >= self.cut_after))
                if at is not None:
                    out = data[:at]
                    self.stalled.set()
            if from_client and self.stall_after_acks is not None:
                buffer += data
                out = b""
                if not header_seen and len(buffer) >= 8:
                    out, buffer, header_seen = buffer[:8], buffer[8:], True
                while header_seen and len(buffer) >= 7:
                    kind, _, size = struct.unpack(">BHI", buffer[:7])
                    if len(buffer) < 8 + size:
                        break
                    frame, buffer = buffer[:8 + size], buffer[8 + size:]
                    if kind == 1 and struct.unpack(">HH", frame[7:11]) == self.BASIC_ACK:
                        self.acks += 1
                        if self.acks >= self.stall_after_acks:
                            self.stalled.set()
                            break
                    out += frame
            try:
                dst.sendall(out)
            except OSError:
                return

    def close(self) -> None:
        import socket

        self._closed = True
        for s in [self.listener, *self.sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class _FrameWalker:
    """Follows the AMQP frames of one direction of a connection (7-byte header, payload, frame-end)."""

    def __init__(self) -> None:
        self.left, self.head = 0, b""  # bytes left of the current frame; a frame header read in part
        self.seen = 0  # bytes walked before this call

    def walk(self, data: bytes, cutting: bool) -> int | None:
        """Reads ``data``; when ``cutting``, returns how much of it to forward to end in the middle of a frame."""
        import struct

        i = 0
        self.seen += len(data)
        while i < len(data):
            if self.left == 0:
                need = 7 - len(self.head)
                self.head += data[i:i + need]
                i += min(need, len(data) - i)
                if len(self.head) == 7:
                    size = struct.unpack(">I", self.head[3:7])[0]
                    self.left, self.head = size + 1, b""
                    if cutting and size > 1:
                        return i + 1  # the header and one byte of the payload
            else:
                step = min(self.left, len(data) - i)
                self.left -= step
                i += step
        return None
