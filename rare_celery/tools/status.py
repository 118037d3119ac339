"""What ``rare-celery status`` reports (and the web console's overview shows): rare work queues with
their ready messages, consumers and bug queues, the delay queues with the messages waiting, and the
app's circuit breakers (:mod:`rare_celery.tools.breakers`).

Counts come from passive declares (no management plugin). Delay queues are shared by every work
queue of a vhost; they are found from the tasks' schedules, or all possible ones with ``scan``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..inventory import RareTaskInfo
from ..topology import CLASSIC, UNROUTED_QUEUE, bug_queue_name, delay_queue, grid_values
from . import breakers, bugs, durations
from . import timeline as tl

Works = dict[str, tuple[str, set[str]]]  # work queue -> (kind, bug queues)
Delays = dict[tuple[str, int], set[str]]  # (kind, grid value in ms) -> work queues whose schedules use it


def work_queues(tasks: list[RareTaskInfo], queues: Iterable[str] = ()) -> Works:
    """The work queues to report (``queues``, or those of ``tasks``) with their kind and bug queues."""
    works: Works = {}
    queues = list(queues)
    if queues:
        for q in queues:
            mine = [t for t in tasks if t.queue == q]
            works[q] = (mine[0].kind if mine else CLASSIC, {bug_queue_name(q)} | {t.bug_queue for t in mine})
    else:
        for t in tasks:
            works.setdefault(t.queue, (t.kind, {bug_queue_name(t.queue)}))[1].add(t.bug_queue)
    return works


def delay_users(tasks: list[RareTaskInfo], queues: Iterable[str] = ()) -> Delays:
    """The delay queues the schedules of ``tasks`` (on ``queues``, if given) start their waits in."""
    queues = set(queues)
    delays: Delays = {}
    for t in tasks:
        if not queues or t.queue in queues:
            for _, policy in t.policies():
                for ms in tl.delay_values(policy):
                    delays.setdefault((t.kind, ms), set()).add(t.queue)
    return delays


def probe(conn: Any, works: Works, delays: Delays, scan: bool = False, extra: Delays | None = None,
          breaker_uses: breakers.Uses | None = None) -> dict[str, Any]:
    """The report: ``{"work_queues": [...], "delay_queues": [...], "unrouted": {...}}``, read from the
    broker now, and ``"breakers": [...]`` when ``breaker_uses`` names any.

    Delay queues of ``delays`` are listed whether they exist or not; those of ``extra`` (seen some
    other way) and, with ``scan``, every possible one, only if they exist.
    """
    report: dict[str, Any] = {"work_queues": [], "delay_queues": []}
    for q, (kind, bug_names) in sorted(works.items()):
        found = bugs.depth(conn, q)
        report["work_queues"].append({
            "queue": q, "kind": kind, "exists": found is not None, "ready": found and found[0],
            "consumers": found and found[1],
            "bug_queues": [bug_depth(conn, b) for b in sorted(bug_names)]})
    report["unrouted"] = bug_depth(conn, UNROUTED_QUEUE.name)
    candidates = dict(delays)
    for key, users in (extra or {}).items():
        candidates.setdefault(key, set(users))
    if scan:
        for kind in (CLASSIC, "quorum"):
            for ms in grid_values():
                candidates.setdefault((kind, ms), set())
    for (kind, ms), users in sorted(candidates.items(), key=lambda kv: (kv[0][0] != CLASSIC, kv[0])):
        name = delay_queue(ms, kind).name
        found = bugs.depth(conn, name)
        if found is None and (kind, ms) not in delays:
            continue  # --scan reports the ones that exist
        report["delay_queues"].append({
            "queue": name, "kind": kind, "delay_ms": ms, "delay": durations.short(ms / 1000), "exists": found is not None,
            "messages": found and found[0], "work_queues": sorted(users)})
    if breaker_uses:
        report["breakers"] = breakers.report(conn, breaker_uses)
    return report


def bug_depth(conn: Any, name: str) -> dict[str, Any]:
    found = bugs.depth(conn, name)
    return {"queue": name, "exists": found is not None, "messages": found and found[0]}
