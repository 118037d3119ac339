"""The console's state and its broker work, apart from HTTP: queues, snapshots, plans, jobs.

Every broker operation opens a connection of its own (py-amqp connections are not shared between
threads) and closes it at the end, so nothing is held between page views. Reads and moves of one
queue are serialized by a lock per queue: a scan never runs while a move takes from the same queue
(either would see the other's messages as held and stop early).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ...inventory import RareTaskInfo, rare_tasks, task_name
from ...topology import NOT_A_BUG_QUEUE, UNROUTED_QUEUE, bug_queue_name, looks_like_bug_queue
from .. import breakers, bugs, moves, records, status
from ..display import count
from . import reading

PLAN_TTL = 900.0  # seconds a confirmation stays valid
SNAPSHOT_REUSE = 5.0  # seconds a snapshot is used as it is
AUTO_RESCAN_BELOW = 20_000  # older snapshots of smaller queues are read again when their depth changed
KEEP_JOBS = 50
KEEP_SNAPSHOTS = 50  # queues whose last read is kept (the oldest goes first)
LOCKS = 64


class Refused(Exception):
    """A request the console will not carry out; the text says why (shown to the user)."""


@dataclass
class Job:
    """Work done in the background (a read, a plan, a move), with its progress for the pages."""

    id: str
    kind: str  # scan, plan, requeue, purge
    queue: str
    title: str
    progress: reading.Progress = field(default_factory=reading.Progress)
    state: str = "running"  # running, done, failed
    result: object = None
    error: str | None = None
    finished: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "queue": self.queue, "title": self.title, "state": self.state,
                "total": self.progress.total, "done": self.progress.done, "error": self.error,
                "seconds": round((self.finished or time.time()) - self.progress.started, 1),
                "summary": self.result.get("summary") if isinstance(self.result, dict) else None}


@dataclass
class PendingPlan:
    token: str
    action: str  # requeue or purge
    queue: str
    plan: moves.Plan
    to: str | None
    reset: bool
    created: float
    scope: str  # what was chosen, in words
    per_second: float | None = None  # a requeue at most this fast (evened out)
    edit: moves.Edit | None = None  # a requeue of one message with new arguments


class Console:
    """What the pages and the metrics work on: the app (or a broker URL), its queues, the jobs."""

    def __init__(self, connect: Callable[[], Any], app: Any = None, where: str = "") -> None:
        self.connect, self.app, self.where = connect, app, where
        self.tasks: list[RareTaskInfo] = rare_tasks(app) if app is not None else []
        self.breakers: breakers.Uses = breakers.uses(app, self.tasks) if app is not None else {}
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        # bounded, whatever queue names are asked for: the newest snapshots, the scans running, a fixed set of locks
        self.snapshots: OrderedDict[str, reading.Snapshot] = OrderedDict()
        self.scans: dict[str, Job] = {}
        self.plans: dict[str, PendingPlan] = {}
        self._locks = tuple(threading.Lock() for _ in range(LOCKS))
        self._lock = threading.Lock()
        self.seen_delays: status.Delays = {}  # delay queues seen in events (the metrics' receiver)

    # -- what is there ---------------------------------------------------------------------------

    def bug_queues(self) -> list[str]:
        names = {t.bug_queue for t in self.tasks} | {bug_queue_name(t.queue) for t in self.tasks}
        return sorted(names)

    def readable(self, queue: str) -> None:
        """With an app, only its bug queues and ``rare.unrouted`` are read and changed (as in the CLI)."""
        if not queue or len(queue.encode()) > 255:
            raise Refused("not a queue name")
        if self.app is not None and queue not in self.bug_queues() and queue != UNROUTED_QUEUE.name:
            raise Refused(f"{queue!r} is not a bug queue of the app; to read another bug queue, start the console "
                          f"with --broker URL and without -A")
        if self.app is None and not looks_like_bug_queue(queue):
            raise Refused(f"{queue!r} {NOT_A_BUG_QUEUE}")

    def task(self, name: str | None) -> RareTaskInfo | None:
        return next((t for t in self.tasks if t.name == name), None)

    def find_task(self, fallback: object) -> tuple[str, RareTaskInfo | None]:
        target = task_name(self.app, fallback)
        return target, self.task(target)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        conn = self.connect()
        try:
            bugs.connect(conn)
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.release()

    def overview(self, scan: bool = False) -> dict[str, Any]:
        """The status report of every rare work queue, bug queue and delay queue, plus ``rare.unrouted``
        and the app's circuit breakers (when it has any)."""
        works = status.work_queues(self.tasks)
        delays = status.delay_users(self.tasks)
        with self.connection() as conn:
            report = status.probe(conn, works, delays, scan, extra=dict(self.seen_delays), breaker_uses=self.breakers)
        report["totals"] = {
            "ready": sum(w["ready"] or 0 for w in report["work_queues"]),
            "consumers": sum(w["consumers"] or 0 for w in report["work_queues"]),
            "bugs": sum(b["messages"] or 0 for w in report["work_queues"] for b in w["bug_queues"]),
            "waiting": sum(d["messages"] or 0 for d in report["delay_queues"]),
            "unrouted": report["unrouted"]["messages"] or 0,
        }
        if "breakers" in report:
            report["totals"]["breakers_open"] = sum(1 for b in report["breakers"] if b["state"] in ("open", "probing"))
        report["read_at"] = time.time()
        return report

    def look_for_delay_queues(self) -> int:
        """Every possible delay queue, looked for now (``status --scan``: a passive declare each, about
        3,500, and the broker logs each one that is missing); those that exist are listed from now on,
        on the overview and in ``/metrics``. Returns how many exist."""
        with self.connection() as conn:
            report = status.probe(conn, {}, {}, scan=True)
        for d in report["delay_queues"]:
            self.seen_delays.setdefault((d["kind"], d["delay_ms"]), set())
        return len(report["delay_queues"])

    def pause(self, service: str, seconds: float, why: str, by: str) -> None:
        """``rare-celery pause`` from the console (:func:`rare_celery.tools.breakers.pause`)."""
        self._service(service)
        if not 0 < seconds <= 30 * 86_400:
            raise Refused("a pause lasts more than 0 s and at most 30 days")
        with self.connection() as conn:
            try:
                breakers.pause(self.app, conn, service, seconds, why[:200], by[:100])
            except RuntimeError as exc:
                raise Refused(str(exc)) from None

    def resume(self, service: str, by: str) -> bool:
        """``rare-celery resume`` from the console; False when the service was not held."""
        self._service(service)
        with self.connection() as conn:
            try:
                return breakers.resume(self.app, conn, service, by[:100]) is not None
            except RuntimeError as exc:
                raise Refused(str(exc)) from None

    def _service(self, service: str) -> None:
        if service not in self.breakers:
            raise Refused(f"no rare task of the app names the service {service[:100]!r} (breaker = ...)")

    def depth(self, queue: str) -> int | None:
        with self.connection() as conn:
            found = bugs.depth(conn, queue)
        return None if found is None else found[0]

    # -- jobs ------------------------------------------------------------------------------------

    def queue_lock(self, queue: str) -> threading.Lock:
        """The lock that serializes reads and moves of ``queue`` (one of :data:`LOCKS`, by the name's hash:
        two queues may share one, and then wait for each other)."""
        return self._locks[zlib.crc32(queue.encode("utf-8", "surrogatepass")) % LOCKS]

    def start(self, kind: str, queue: str, title: str, work: Callable[[Job], object]) -> Job:
        job = Job(secrets.token_hex(8), kind, queue, title)
        with self._lock:
            self.jobs[job.id] = job
            while len(self.jobs) > KEEP_JOBS:
                self.jobs.popitem(last=False)

        def run() -> None:
            try:
                with self.queue_lock(queue):
                    job.result = work(job)
                job.state = "done"
            except Refused as exc:
                job.state, job.error = "failed", str(exc)
            except bugs.QueueMissing:
                job.state, job.error = "failed", f"queue {queue!r} does not exist"
            except socket.timeout:
                job.state, job.error = "failed", f"the broker stopped answering (nothing for {bugs.READ_TIMEOUT:g} s)"
            except bugs.Interrupted as exc:
                job.state = "failed"
                job.error = exc.describe()
                job.result = {"summary": job.error, "moved": exc.done}
            except bugs.MoveFailed as exc:
                job.state = "failed"
                job.error = f"{exc}; stopped after {exc.done}, the rest stays in {queue}"
                job.result = {"summary": job.error, "moved": exc.done}
            except Exception as exc:  # noqa: BLE001 - shown on the job's page, one line, no traceback
                job.state, job.error = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
            finally:
                job.finished = time.time()

        threading.Thread(target=run, name=f"rare-web-{kind}-{job.id}", daemon=True).start()
        return job

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def wait(self, job: Job, seconds: float) -> bool:
        ends = time.monotonic() + seconds
        while job.state == "running" and time.monotonic() < ends:
            time.sleep(0.02)
        return job.state != "running"

    # -- reading a queue -------------------------------------------------------------------------

    def snapshot(self, queue: str, fresh: bool = False) -> tuple[reading.Snapshot | None, Job | None]:
        """The snapshot to show for ``queue``, or the job reading it now."""
        self.readable(queue)
        with self._lock:
            running = self.scans.get(queue)
            if running is not None and running.state == "running":
                return self.snapshots.get(queue), running
            snap = self.snapshots.get(queue)
        if snap is not None and not fresh and not self._stale(snap):
            return snap, None
        job = self.start("scan", queue, f"reading {queue}", lambda job: self._scan(queue, job))
        with self._lock:
            self.scans = {q: j for q, j in self.scans.items() if j.state == "running"}
            self.scans[queue] = job
        return snap, job

    def _stale(self, snap: reading.Snapshot) -> bool:
        if time.time() - snap.read_at < SNAPSHOT_REUSE or snap.depth > AUTO_RESCAN_BELOW:
            return False
        return self.depth(snap.queue) != snap.depth

    def _scan(self, queue: str, job: Job) -> dict[str, Any]:
        with self.connection() as conn:
            snap = reading.scan(conn, queue, job.progress)
        with self._lock:
            self.snapshots.pop(queue, None)
            self.snapshots[queue] = snap
            while len(self.snapshots) > KEEP_SNAPSHOTS:
                self.snapshots.popitem(last=False)
        return {"summary": f"read {len(snap.entries)} messages of {queue} in {snap.seconds:.1f} s"}

    def forget(self, queue: str) -> None:
        with self._lock:
            self.snapshots.pop(queue, None)

    def message(self, queue: str, fingerprint: str, message_id: str | None) -> tuple[records.Record, bugs.Held] | None:
        self.readable(queue)
        with self.queue_lock(queue), self.connection() as conn:
            return reading.find(conn, queue, fingerprint, message_id)

    # -- changing a queue: plan, confirm, take -------------------------------------------------

    def plan(self, action: str, queue: str, wanted: Callable[[bugs.Held], bool], scope: str, to: str | None,
             reset: bool, per_second: float | None = None, edit: moves.Edit | None = None) -> Job:
        """First read: count what would move (in the background); the job's result is a confirmation."""
        self.readable(queue)
        if action not in ("requeue", "purge"):
            raise Refused("unknown action")
        if to is not None:
            problem = _name_problem(to)
            if problem:
                raise Refused(problem)

        def work(job: Job) -> dict[str, Any]:
            with self.connection() as conn:
                def counted(held: bugs.Held) -> bool:
                    job.progress.done += 1
                    return wanted(held)

                job.progress.total = (bugs.depth(conn, queue) or (0, 0))[0]
                found = moves.plan(conn, queue, counted, to, moving=action == "requeue", browse=reading.browse)
                missing = moves.missing_targets(conn, found) if action == "requeue" else []
            pending = PendingPlan(secrets.token_urlsafe(16), action, queue, found, to, reset, time.time(), scope,
                                  per_second, edit)
            if found.count and not missing:
                with self._lock:
                    self._expire_plans()
                    self.plans[pending.token] = pending
            return {"plan": pending, "missing": missing,
                    "summary": f"{found.count} messages of {queue} chosen to {action}"}

        return self.start("plan", queue, f"counting what to {action} in {queue}", work)

    def _expire_plans(self) -> None:
        now = time.time()
        for token in [t for t, p in self.plans.items() if now - p.created > PLAN_TTL]:
            del self.plans[token]

    def take(self, token: str) -> Job:
        """Second read: move or delete exactly what the plan counted (each move confirmed before its ack)."""
        with self._lock:
            self._expire_plans()
            pending = self.plans.pop(token, None)
        if pending is None:
            raise Refused("this confirmation has expired or was used already: choose the messages again")
        found, queue = pending.plan, pending.queue
        planned = found.count
        targets = dict(found.targets)

        def work(job: Job) -> dict[str, Any]:
            job.progress.total = planned

            def step(held: bugs.Held) -> None:
                job.progress.done += 1

            send = (moves.requeue_sender(pending.to, pending.reset, time.time(), pending.edit,
                                         lines=moves.lines_of(self.app))
                    if pending.action == "requeue" else None)
            try:
                with self.connection() as conn:
                    pace = moves.Pace(pending.per_second, conn) if pending.per_second else None

                    def moved_one(held: bugs.Held) -> None:
                        step(held)
                        if pace is not None:
                            pace()

                    done = bugs.take(conn, queue, found.take, send, moved_one)
            finally:
                self.forget(queue)
            gone = planned - done
            if pending.action == "requeue":
                where = ", ".join(f"{q} ({n})" for q, n in sorted(targets.items()))
                text = f"requeued {count(done, 'message')} from {queue} to {where}"
            else:
                text = f"deleted {count(done, 'message')} from {queue}"
            if gone:
                text += f"; {gone} of those counted were no longer there"
            return {"summary": text, "moved": done, "planned": planned, "gone": gone}

        verb = "requeueing" if pending.action == "requeue" else "deleting"
        return self.start(pending.action, queue, f"{verb} {planned} messages of {queue}", work)


def _name_problem(name: str) -> str | None:
    from ...topology import name_problem

    return name_problem(name)
