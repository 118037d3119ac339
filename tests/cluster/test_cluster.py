"""The leader of a quorum work queue stopped mid-run on a three-node RabbitMQ cluster (4.3 by default, or 3.10)
(scripts/cluster): nothing lost, nothing stuck, duplicates only where at-least-once delivery allows them,
and retries resume soon after the leader changes.

1,000 tasks with mixed outcomes (tests.support.PLANS: succeed, fail once or twice then succeed, always
fail, Bug, fallback) through two ``celery worker`` processes (prefork) of tests/apps/cluster.py, each
with the three nodes in a failover URL in another order (the first worker connects to rabbit-a, the
second to rabbit-b). While some tasks run, some wait in the quorum delay queues (``rare.wait.quorum.*``)
and some are queued, the node that leads ``cluster.q`` is stopped (``scripts/cluster stop-node``), kept
down until retries complete again without it (at least OUTAGE_MIN s, at most OUTAGE_MAX s), and started
again. The report (figures, duplicates, worker log lines of interest) is printed at the end of the run.

Two more tests read the run: every worker kept consuming through the node stop, and attempts ran while
the node was down (with classic bug queues and ``rare.unrouted`` on the stopped node, neither held:
the app sets ``rare_queue_type = "quorum"``, the choice for clusters).
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from rare_celery.topology import is_delay_queue
from tests.cluster.conftest import REPORT, node_name
from tests.support import Records, Worker, Workload, bug_reasons, peek_ids, ready_counts, tally, wait_for

TASKS = 1000
LATE = 200  # of them published while the node is down (5 s after its stop): new work must run without it
WORKERS = 2
CONCURRENCY = 2
OUTAGE_MIN, OUTAGE_MAX = 10.0, 30.0  # seconds the stopped node stays down
STALL = 45.0  # seconds without a task ending that end a wait (the longest retry delay is 2 s)
SEED = 11

# worker log lines worth counting, and showing, after a node stop
PATTERNS = {
    "connection lost": r"Connection to broker lost",
    "reconnected": r"Connected to amqp://",
    "cannot connect": r"consumer: Cannot connect",
    "NO_ROUTE": r"NO_ROUTE",
    "declared again": r"was missing; declaring it again",
    "NOT_FOUND / home node down": r"NOT_FOUND|home node",
    "publish refused or timed out": r"did not take the message|publish to .* failed|refused \(nacked\)|[Tt]imed? ?out",
    "kept unacked (next place failed)": r"could not go to its next place|kept in its queue|stays in .* \(not acked\)",
    "put back": r"put back in",
    "came back after success": r"came back after it had succeeded",
    "attempt lost": r"attempt \d+ was lost",
    "unroutable": r"unroutable",
    "worker_lost": r"worker_lost",
    "frequent restarts": r"Frequent restarts",
    "unrecoverable": r"Unrecoverable error",
    "critical": r"CRITICAL/",
}


def delayed(vhost) -> int:
    """Messages waiting in delay queues now (a passive declare: exact for quorum queues)."""
    return sum(ready_counts(vhost.url, [q for q in vhost.queue_stats() if is_delay_queue(q)]).values())


def retry_runs(records: Records, after: float) -> list[float]:
    """Times of attempts after the first (retries that came back through a delay queue) that ran."""
    return sorted(r["t"] for r in records.all() if r["k"] == "run" and r["att"] >= 2 and r["t"] > after)


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float]:
    """The longest pause between consecutive ``times`` within [start, end] (edges included): (length, from)."""
    points = [start] + [t for t in times if start < t < end] + [end]
    gap, at = 0.0, start
    for a, b in zip(points, points[1:]):
        if b - a > gap:
            gap, at = b - a, a
    return gap, at


RUN: dict = {}  # what the run left for the tests after it


class ClusterWorkload(Workload):
    """tests.support.Workload whose tally, when some jobs did not end, looks for them in the work, delay
    and unrouted queues only: Workload.tally peeks every queue but the bug queues, and a passive declare of
    Celery 5.7's exclusive pidbox queue fails (RESOURCE_LOCKED)."""

    def tally(self):
        ended = self.ended()
        waiting: set[str] = set()
        if len(ended) < len(self.jobs):
            queues = [q for q in self.vhost.queue_stats() if not q.endswith(".bugs") and ".pidbox" not in q
                      and not q.startswith("celery")]
            waiting = peek_ids(self.vhost.url, queues) & (self.jobs.keys() - ended)
        return tally(self.jobs, self.records.all(), bug_reasons(self.bug_messages), self.faults.MAX_ATTEMPTS,
                     waiting)


def log_findings(workers: list[Worker]) -> tuple[Counter, list[str]]:
    """Counts of :data:`PATTERNS` in the worker logs, and a few example lines of each."""
    counts: Counter = Counter()
    examples: list[str] = []
    for w in workers:
        shown: Counter = Counter()
        for line in w.text().splitlines():
            labels = [label for label, pattern in PATTERNS.items() if re.search(pattern, line)]
            counts.update(labels)
            fresh = [label for label in labels if shown[label] < 2 and label != "reconnected"]
            if fresh and line.startswith("["):  # a log line, not a traceback's
                shown.update(fresh)
                examples.append(f"  [{w.log.name}] {line[:400]}")
    return counts, examples


def kept(ready: int, held: int) -> str:
    """What a quorum queue kept of its due messages, in words (Cluster.overdue)."""
    return ", ".join(part for part in (ready and f"{ready} ready past their TTL, not expired",
                                       held and f"{held} held by its dead-letter worker") if part)


def at_least_once_bound() -> int:
    """Duplicates a connection loss can explain: every message a worker holds unacked when its connection
    drops may have done its work (prefetch: 4 per pool process per consumer, 2 consumers), plus the
    publish each pool process may have had waiting for its confirm. (A quorum delay queue whose leader
    stops dead-letters at least once: a due message may come back twice, also counted here.)"""
    return WORKERS * (2 * 4 * CONCURRENCY + CONCURRENCY)


def survived(worker: Worker) -> bool:
    """The worker still runs and consumes: an unrecoverable error starts a warm shutdown that waits for
    its pool processes (up to 4 minutes while one of them waits for a refused publish)."""
    text = worker.text()
    return worker.proc.poll() is None and "Unrecoverable error" not in text and "Warm shutdown" not in text


def duplicates(records: Records, ids) -> list[str]:
    """What ran or ended more than once, per task id, and on which process, redelivered or not."""
    by_id: dict[str, list[dict]] = {}
    for r in records.all():
        if r["id"] in ids:
            by_id.setdefault(r["id"], []).append(r)
    out = []
    for task_id, rs in sorted(by_id.items()):
        runs = Counter((r["task"].rsplit(".", 1)[-1], r["att"]) for r in rs if r["k"] == "run")
        twice = [f"{task} attempt {att} x{n}" for (task, att), n in sorted(runs.items()) if n > 1]
        oks = sum(r["k"] == "ok" for r in rs)
        if twice or oks > 1:
            steps = ", ".join(f"{r['k']} {r['att']} pid {r['pid']}{' redelivered' if r['redelivered'] else ''}"
                              for r in sorted(rs, key=lambda r: r["t"]))
            out.append(f"  duplicate {task_id}: {'; '.join(twice)}; {oks} successes ({steps})")
    return out


def test_stopping_the_work_queue_leader_mid_run_loses_nothing(cluster, cvhost, cdir, cenv, capp):
    queues = capp.queues_of("quorum")
    records = Records(cdir)
    workers: list[Worker] = []
    try:
        for i in range(WORKERS):  # one after the other: the first one's node declares the queues
            env = {**cenv, "RARE_CLUSTER_BROKER": cluster.url(cvhost.name, first=i)}
            workers.append(Worker("tests.apps.cluster", queues, env, cdir, name=f"via-{'abc'[i]}",
                                  concurrency=CONCURRENCY).wait_ready(120))
        load = ClusterWorkload(capp, cvhost, cdir, ["quorum"], seed=SEED)
        started, t0 = time.monotonic(), time.time()
        load.publish(TASKS - LATE)
        published_s = time.monotonic() - started
        wait_for(lambda: len(load.ended()) >= TASKS // 4 and delayed(cvhost) >= 10, 240, 0.2,
                 "a quarter of the tasks to end while retries wait in delay queues")
        before = {"ended": len(load.ended()), "delayed": delayed(cvhost), "at": time.time() - t0}
        placed = cluster.placement(cvhost.name)
        leader = placed["cluster.q"]

        t_stop = time.time()
        stop_s = cluster.stop_node(leader)
        t_down = time.time()
        late_at = None
        while time.time() - t_down < OUTAGE_MAX:  # down until retries complete again without it
            if late_at is None and time.time() - t_down >= 5:
                late_at = time.time()
                load.publish(LATE)
            if retry_runs(records, t_down + 5) and time.time() - t_down >= OUTAGE_MIN:
                break
            time.sleep(0.5)
        placed_down = cluster.placement(cvhost.name)
        t_start = time.time()
        start_s = cluster.start_node(leader)
        t_up = time.time()

        ended = load.wait(timeout=600, stall=STALL)
        overdue = {} if ended else cluster.overdue(cvhost.name)
        states = {q: cluster.fifo_state(cvhost.name, q) for q in overdue}
        moved_leaders = {q: cluster.move_leader(cvhost.name, q) for q, (_, held) in overdue.items() if held}
        if moved_leaders:  # a dead-letter worker held due messages: what an operator does, then wait again
            ended = load.wait(timeout=300, stall=STALL)
        run_s = time.monotonic() - started
        alive = [survived(w) for w in workers]
        holding = {} if ended else {**load.holding(), **{
            q: kept(*n) for q, n in cluster.overdue(cvhost.name).items()}}
        tallies = load.tally()
        left = load.held()  # work and delay queues, rare.unrouted: (ready, unacked, consumers) if not empty
    finally:
        for w in workers:
            w.stop()
    counts, examples = log_findings(workers)
    RUN.update(alive=alive, workers=workers)

    t = tallies["quorum"]
    retries = retry_runs(records, 0)
    runs = sorted(r["t"] for r in records.all() if r["k"] == "run")
    end = runs[-1]  # the last attempt: the idle time after it is no pause
    gap, gap_at = longest_gap(runs, t_stop, end)
    retry_gap, retry_gap_at = longest_gap(retries, t_stop, end)
    resume_s = retry_gap_at + retry_gap - t_stop  # from the stop until retries run again after their longest pause
    first_after_down = next((x - t_down for x in retries if x > t_down), None)
    while_down = [x for x in runs if t_down + 5 < x < t_start]  # attempts that ran while the node was down
    after_up = next((x - t_up for x in runs if x > t_up), None)
    RUN.update(while_down=len(while_down), down_s=t_start - t_down)
    moved = {q: f"{node_name(placed[q])} -> {node_name(placed_down.get(q, '?'))}" for q in sorted(placed)
             if placed[q] == leader and not q.startswith("celery_delayed_") and ".pidbox" not in q}
    native = sum(q.startswith("celery_delayed_") for q in placed)  # Celery's own native delayed delivery
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(t.bugs.items())) or "-"
    REPORT.append(f"cluster: tasks {t.published:,}, done {t.succeeded:,} (fallbacks {t.rescued:,}), bugs {t.bugged:,} "
                  f"({reasons}), duplicates {t.duplicated}, lost {t.lost}, stuck {t.stuck}, over limit {t.over_limit}, "
                  f"wrong end {t.wrong}; attempts {t.runs:,}; retries ran again {resume_s:.1f} s after the node "
                  f"stop began; run {run_s:.1f} s")
    REPORT.append(f"  vhost {cvhost.name}; {WORKERS} workers -c {CONCURRENCY} (prefork); publishing took "
                  f"{published_s:.1f} s ({LATE} more while the node was down); before the stop (+{before['at']:.1f} s): {before['ended']} ended, "
                  f"{before['delayed']} waiting in delay queues")
    REPORT.append(f"  stopped {node_name(leader)} (leader of cluster.q) at +{t_stop - t0:.1f} s: the stop took "
                  f"{stop_s:.1f} s, down {t_start - t_down:.1f} s, the start took {start_s:.1f} s "
                  f"(up at +{t_up - t0:.1f} s)")
    REPORT.append(f"  rare and work queues on the stopped node (-> while it was down): {moved}; Celery's "
                  f"celery_delayed_* queues in the vhost: {native}")
    REPORT.append(f"  longest pause in retries run from the stop on: {retry_gap:.1f} s (from +{retry_gap_at - t0:.1f} "
                  f"s), in all attempts {gap:.1f} s (from +{gap_at - t0:.1f} s); first retry run after the node was "
                  f"down: {'-' if first_after_down is None else f'{first_after_down:.1f} s'}; attempts run while it was "
                  f"down (5 s after the stop to the start): {len(while_down)}; first attempt after it was up: "
                  f"{'-' if after_up is None else f'{after_up:.1f} s'}")
    REPORT.append(f"  workers that kept consuming to the end: {alive}; left in work and delay queues: {left or 'nothing'}")
    if overdue:
        REPORT.append(f"  due messages quorum queues kept after {STALL:.0f} s without a task ending: "
                      f"{ {q: kept(*n) for q, n in overdue.items()} }; leaders moved: {moved_leaders or '-'} "
                      f"(docs/operations.md, \"Due retries held by the broker\")")
        REPORT.extend(f"  {q} then: {state}" for q, state in states.items())
    REPORT.append(f"  worker log lines: {dict(sorted(counts.items()))}; logs in {cdir}")
    REPORT.extend(duplicates(records, load.jobs.keys())[:10])
    REPORT.extend(examples[:40])
    assert ended, f"not every task ended: {len(load.ended())}/{len(load.jobs)}; in queues: {holding}"
    assert t.ok, t.problems[:10]
    assert t.published == t.succeeded + t.bugged == TASKS
    assert t.duplicated <= at_least_once_bound(), t.duplicated
    assert set(t.bugs) <= {"bug", "exhausted"}, t.bugs
    assert not left, left


def test_every_worker_survives_the_leader_stop(cluster):
    if "alive" not in RUN:
        pytest.skip("the cluster run did not get as far as the node stop")
    assert RUN["alive"] == [True] * WORKERS, (
        f"workers that kept consuming: {RUN['alive']}; "
        + "; ".join(line for w in RUN["workers"] for line in w.text().splitlines() if "Unrecoverable" in line)[:1000])


def test_tasks_run_while_the_stopped_node_is_down(cluster):
    if "while_down" not in RUN:
        pytest.skip("the cluster run did not get as far as the node stop")
    assert RUN["while_down"] > 0, f"no attempt ran in the {RUN['down_s']:.0f} s the node was down"
