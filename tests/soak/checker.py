"""The soak's checker: every job published is accounted for, from the run records and the queues at the end.

For each job (one published task id):

* **ended once**: its own success record (by a task its plan allows) or one copy in a bug queue with a reason
  its plan allows; ``worker_lost`` is allowed also when a death (see :data:`tests.soak.nemesis.DEATHS`) came
  while it was under way (a worker that ran it, or one that held its next attempt unstarted);
* **lost**: no end and in no queue; **stuck**: no end and still in a queue when the run ended;
* **repeats** (an attempt run twice, or two ends): *explained* when a fault that may repeat work (a death
  of the worker that ran the first copy, or of the broker, or a requeue of its bug queue) came between the
  first copy and the repeat; any other is *unexplained*, a failure;
* **over limit**: more distinct attempts of a task than its ``max_attempts``;
* **early**: a delayed start, or a retry of ``work``, that ran before its time; **late** (reported, not a
  failure): how long after its time it ran.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tests.soak.nemesis import DEATHS, ENDS
from tests.soak.workload import PLANS, Job

WORK_BACKOFF = (0.5, 1.25, 2.0)  # tests/apps/faults.py: work's schedule
SLACK = 0.05  # s: clocks of one machine, a record written just after the run starts


@dataclass
class Report:
    published: int = 0
    unsure: int = 0  # publishes that raised (the caller saw an error)
    unsure_seen: int = 0  # of those, the ones whose message arrived all the same
    succeeded: Counter = field(default_factory=Counter)  # by task short name
    bugs: Counter = field(default_factory=Counter)  # by reason
    lost: int = 0
    stuck: int = 0
    unexplained: int = 0
    explained: int = 0
    requeued: int = 0  # repeats of Bug jobs that an operator's requeue-bugs sent back
    held_lost: int = 0  # worker_lost ends where only a worker that held its next attempt unstarted died
    counted_unrun: int = 0  # attempts counted as failed that never ran (held unstarted by a worker that died)
    wrong: int = 0
    over_limit: int = 0
    early: int = 0
    late_max: float = 0.0  # s beyond its time, delayed starts and retries
    late_where: str = ""
    faults: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stuck or self.unexplained or self.wrong or self.over_limit or self.early)


def short(task: str) -> str:
    return task.rsplit(".", 1)[-1]


def check(jobs: dict[str, Job], unsure: dict[str, Job], records: list[dict], bugs: list[tuple[str, str]],
          waiting: set[str], faults: list[dict], max_attempts: dict[str, int]) -> Report:
    """``bugs``: (task id, reason) of every message in the bug queues at the end; ``waiting``: ids still in
    another queue then; ``faults``: the run log's entries ``{"t", "kind", "target", "detail"}``."""
    report = Report()
    faults = spans(faults)
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_id[r["id"]].append(r)
    bugs_of: dict[str, list[str]] = defaultdict(list)
    for task_id, reason in bugs:
        bugs_of[task_id].append(reason)
    for f in faults:
        if not f["kind"].endswith(("_back", "stopped", "_up", "requeued")):
            report.faults[f["kind"]] += 1
    everyone = dict(jobs)
    report.unsure = len(unsure)
    for task_id, job in unsure.items():
        if by_id.get(task_id) or bugs_of.get(task_id) or task_id in waiting:
            everyone[task_id] = job
            report.unsure_seen += 1
    report.published = len(everyone)
    for job in everyone.values():
        _check_job(job, sorted(by_id.get(job.id, []), key=lambda r: r["t"]), bugs_of.get(job.id, []),
                   job.id in waiting, faults, max_attempts, report)
    return report


def _deaths(faults: list[dict], nodes: set[str] | None, since: float, until: float, requeued: bool = False) -> list[dict]:
    """The faults that came (or lasted) between ``since`` and ``until`` and may repeat the work of a job run
    on ``nodes`` (``nodes`` None: on any worker; ``requeued``: its bug queue's requeues count, for jobs whose
    plan ends there with ``bug``)."""
    return [f for f in faults if f["kind"] in DEATHS and f["t"] - SLACK <= until and f.get("end", f["t"]) + SLACK >= since
            and (nodes is None or f["target"] in nodes or f["target"] == "*" or (requeued and f["kind"] == "requeue"))]


def spans(faults: list[dict]) -> list[dict]:
    """The run log's entries, a restart's and a requeue's with the ``end`` of their span (:data:`ENDS`)."""
    out = []
    for i, f in enumerate(faults):
        closing = ENDS.get(f["kind"])
        end = next((g["t"] for g in faults[i + 1:] if g["kind"] == closing), None) if closing else None
        out.append({**f, "end": end if end is not None else f["t"]})
    return out


def _check_job(job: Job, runs: list[dict], reasons: list[str], waiting: bool, faults: list[dict],
               max_attempts: dict[str, int], report: Report) -> None:
    plan = PLANS[job.plan]
    oks = [r for r in runs if r["k"] == "ok"]
    tries = [r for r in runs if r["k"] == "run"]
    nodes = {r["w"] for r in tries}
    problems: list[str] = []

    def story() -> str:
        lines = [f"{job.id} ({job.plan}, {job.kind}), published at {job.published:.3f}"
                 + (f", due {job.due:.3f}" if job.due else "")]
        lines += [f"  {r['t']:.3f} {r['k']} {short(r['task'])} attempt {r['att']} on {r['w']} pid {r['pid']}"
                  + (" (redelivered)" if r["redelivered"] else "") for r in runs]
        lines += [f"  bug queue: {reason}" for reason in reasons]
        start = runs[0]["t"] - 1 if runs else job.published
        end = runs[-1]["t"] + 1 if runs else job.published + 60
        lines += [f"  fault {f['t']:.3f} {f['kind']} {f['target']} {f['detail']}" for f in faults
                  if start <= f["t"] <= end and (f["target"] in nodes or f["target"] in ("*", "bugs", "service"))]
        return "\n".join(lines)

    # where it ended
    ends = len(oks) + len(reasons)
    if not ends:
        if waiting:
            report.stuck += 1
            problems.append("stuck: still in a queue when the run ended")
        else:
            report.lost += 1
            problems.append("lost: no success, in no bug queue, in no queue")
    elif oks:
        report.succeeded[short(oks[0]["task"])] += 1
    else:
        report.bugs[reasons[0]] += 1
    # worker_lost: a worker that ran it died, or one that held its next attempt unstarted (prefetched: a
    # redelivery cannot tell the two apart, so it counts as a failed attempt; see docs/faults.md)
    ran_died = bool(_deaths(faults, nodes, tries[0]["t"], tries[-1]["t"] + 10)) if tries else False
    held_died = bool(_deaths(faults, None, tries[0]["t"], tries[-1]["t"] + 10)) if tries else False
    allowed = set(plan.reasons) | ({"worker_lost"} if ran_died or held_died else set())
    if "worker_lost" in reasons and "worker_lost" not in plan.reasons and not ran_died and held_died:
        report.held_lost += 1
    wrong = [f"success of {short(r['task'])}" for r in oks if short(r["task"]) not in plan.done_by]
    wrong += [f"bug queue ({reason})" for reason in reasons if reason not in allowed]
    if wrong:
        report.wrong += 1
        problems.append(f"ended where its plan cannot end: {', '.join(wrong)}")

    # repeats. The same copy delivered again: a death after its first run, of the worker that ran it, and
    # before the repeat. Or the copy made twice (its publish not confirmed, then made again): a death
    # after the step that made it (the run before, or for a copy made before any run, by a worker the
    # records do not name: a delayed start sent round, a breaker's hold, an expiry routed, the publish)
    # and before the repeat.
    seen: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in tries:
        seen[(short(r["task"]), r["att"])].append(r)
    repeated = [copies for copies in seen.values() if len(copies) > 1]
    if ends > 1 or repeated:
        requeued, explained = job.plan == "bug", False
        group = min(repeated, key=lambda copies: copies[1]["t"], default=None)  # the first repeat
        if group is not None:
            explained = bool(_deaths(faults, {group[0]["w"]}, group[0]["t"], group[1]["t"], requeued))
            before = [r for r in tries if r["t"] < group[0]["t"]]
            if before:
                explained = explained or bool(_deaths(faults, {before[-1]["w"]}, before[-1]["t"], group[1]["t"],
                                                      requeued))
            elif job.due is not None or job.plan in ("service", "expire"):
                explained = explained or bool(_deaths(faults, None, job.published, group[1]["t"], requeued))
        else:  # two ends, no attempt run twice
            last = tries[-1]["t"] if tries else job.published + 60
            explained = bool(_deaths(faults, None if not tries else nodes, job.published, last + 5, requeued))
            explained = explained or (not tries and bool(_deaths(faults, None, job.published, last, requeued)))
        last = tries[-1]["t"] if tries else job.published + 60
        by_requeue = job.plan == "bug" and any(f["kind"] == "requeue" and f["t"] <= last and f["end"] >= job.published
                                               for f in faults)
        if explained and by_requeue:
            report.requeued += 1  # an operator's requeue ran it again: what it is for
        elif explained:
            report.explained += 1
        else:
            report.unexplained += 1
            problems.append(f"repeated without a fault that allows it: {ends} ends, attempts run twice: "
                            f"{sorted(k for k, v in seen.items() if len(v) > 1)}")

    # attempt limits
    for task in {short(r["task"]) for r in tries}:
        attempts = {r["att"] for r in tries if short(r["task"]) == task}
        if max(attempts) > max_attempts[task] or len(attempts) > max_attempts[task]:
            report.over_limit += 1
            problems.append(f"ran attempts {sorted(attempts)} of {task} (max_attempts {max_attempts[task]})")

    # attempts counted that never ran (a worker died holding the message unstarted: see worker_lost above)
    for task in {short(r["task"]) for r in tries}:
        ran = {r["att"] for r in tries if short(r["task"]) == task}
        report.counted_unrun += max(ran) - len(ran)

    # on time: a delayed start's first run, and each retry of work after the run it follows
    if job.due is not None and tries:
        _on_time(report, problems, job.id, tries[0]["t"] - job.due, "delayed start")
    works = [r for r in tries if short(r["task"]) == "work"]
    for prev, r in zip(works, works[1:]):
        if r["att"] == prev["att"] + 1:
            wait = WORK_BACKOFF[min(r["att"] - 2, len(WORK_BACKOFF) - 1)]
            _on_time(report, problems, job.id, r["t"] - prev["t"] - wait, f"retry {r['att']}")
    if problems:
        report.problems.append("; ".join(problems) + "\n" + story())


def _on_time(report: Report, problems: list[str], task_id: str, late: float, what: str) -> None:
    if late < -SLACK:
        report.early += 1
        problems.append(f"{what} ran {-late:.3f} s early")
    elif late > report.late_max:
        report.late_max, report.late_where = late, f"{what} of {task_id}"


def counted(counts: Counter) -> str:
    """``12 (a 5, b 7)``."""
    return f"{sum(counts.values()):,} ({', '.join(f'{k} {n:,}' for k, n in sorted(counts.items())) or '-'})"


def table(report: Report, seed: int, minutes: float, every: float) -> str:
    """The soak's report, Markdown."""
    done = sum(report.succeeded.values())
    rows = [
        ("published", (f"{report.published:,} (of which {report.unsure_seen} arrived although their publish "
                       f"raised; {report.unsure - report.unsure_seen} more raised and never arrived)")),
        ("done (by task)", f"{done:,} ({', '.join(f'{t} {n:,}' for t, n in sorted(report.succeeded.items()))})"),
        ("in bug queues (by reason)", counted(report.bugs)),
        ("**lost**", str(report.lost)),
        ("**stuck in a queue**", str(report.stuck)),
        ("**unexplained repeats**", str(report.unexplained)),
        ("explained repeats: a death between a run or a publish and its ack", f"{report.explained:,}"),
        ("repeats an operator asked for (`requeue-bugs` of `Bug` jobs)", f"{report.requeued:,}"),
        ("**wrong ends**", str(report.wrong)),
        ("`worker_lost` for an attempt a dying worker held unstarted (a redelivery cannot tell)", str(report.held_lost)),
        ("attempts counted as failed that never ran (the same cause)", f"{report.counted_unrun:,}"),
        ("**over the attempt limit**", str(report.over_limit)),
        ("**early** (delayed starts and retries)", str(report.early)),
        ("longest beyond its schedule", f"{report.late_max:.1f} s ({report.late_where or '-'})"),
        ("faults injected", counted(report.faults)),
    ]
    head = [f"Soak: seed {seed}, {minutes:g} min, a fault every {every:g} s on average: "
            + ("**passed**" if report.ok else "**FAILED**"), "", "| | |", "|---|---:|"]
    return "\n".join(head + [f"| {k} | {v} |" for k, v in rows])
