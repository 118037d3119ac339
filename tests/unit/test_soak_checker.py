"""The soak's checker (tests/soak/checker.py) on made-up runs: it must catch what it is there to catch."""

from __future__ import annotations

from tests.soak.checker import check, table
from tests.soak.workload import Job

MAX = {"work": 4, "rescue": 3, "doomed": 2, "hop": 3, "brittle": 10, "call": 8, "poison": 3}
T0 = 1_000.0


def run(job_id: str, att: int, t: float, task: str = "work", node: str = "w1", kind: str = "run") -> dict:
    return {"k": kind, "id": job_id, "task": f"faults.classic.{task}", "att": att, "q": "faults",
            "redelivered": False, "pid": 1, "w": node, "t": t}


def ok(job_id: str, att: int, t: float, task: str = "work", node: str = "w1") -> list[dict]:
    return [run(job_id, att, t, task, node), run(job_id, att, t, task, node, kind="ok")]


def fault(kind: str, t: float, target: str = "w1") -> dict:
    return {"kind": kind, "t": t, "target": target, "detail": ""}


def one(plan: str = "ok", due: float | None = None) -> dict[str, Job]:
    return {"a": Job("a", "classic", plan, T0, due)}


def test_a_clean_run_passes_and_says_so():
    jobs = {"a": Job("a", "classic", "ok", T0), "b": Job("b", "classic", "always", T0)}
    records = ok("a", 1, T0 + 1) + [run("b", n, T0 + n * 2) for n in range(1, 5)]
    report = check(jobs, {}, records, [("b", "exhausted")], set(), [], MAX)
    assert report.ok and report.published == 2 and report.succeeded["work"] == 1 and report.bugs["exhausted"] == 1
    assert "**passed**" in table(report, 1, 5, 10)


def test_a_job_with_no_end_is_lost_or_stuck():
    assert check(one(), {}, [], [], set(), [], MAX).lost == 1
    stuck = check(one(), {}, [], [], {"a"}, [], MAX)
    assert stuck.stuck == 1 and not stuck.ok and "**FAILED**" in table(stuck, 1, 5, 10)


def test_a_repeat_is_explained_only_by_a_death_of_the_worker_that_ran_it_in_between():
    records = [run("a", 1, T0 + 1), *ok("a", 1, T0 + 3, node="w2")]
    assert check(one(), {}, records, [], set(), [], MAX).unexplained == 1
    assert check(one(), {}, records, [], set(), [fault("kill_worker", T0 + 2)], MAX).explained == 1
    assert check(one(), {}, records, [], set(), [fault("kill_worker", T0 + 2, "w3")], MAX).unexplained == 1
    assert check(one(), {}, records, [], set(), [fault("kill_worker", T0 + 0.5)], MAX).unexplained == 1
    assert check(one(), {}, records, [], set(), [fault("warm_stop", T0 + 2)], MAX).unexplained == 1
    assert check(one(), {}, records, [], set(), [fault("restart_broker", T0 + 2, "*")], MAX).explained == 1


def test_two_ends_are_a_repeat():
    report = check(one(), {}, ok("a", 1, T0 + 1), [("a", "exhausted")], set(), [], MAX)
    assert report.unexplained == 1 and report.wrong == 1  # and an "ok" job cannot end exhausted


def test_an_end_its_plan_cannot_reach_is_wrong():
    assert check(one("bug"), {}, [run("a", 1, T0 + 1)], [("a", "exhausted")], set(), [], MAX).wrong == 1
    assert check(one("always"), {}, ok("a", 1, T0 + 1), [], set(), [], MAX).wrong == 1
    # worker_lost: only when a death came while it was under way
    lost = [run("a", 1, T0 + 1)]
    assert check(one("ok"), {}, lost, [("a", "worker_lost")], set(), [], MAX).wrong == 1
    held = check(one("ok"), {}, lost, [("a", "worker_lost")], set(), [fault("died", T0 + 2, "w9")], MAX)
    assert held.ok and held.held_lost == 1  # another worker died: it may have held attempt 2 unstarted
    ran = check(one("ok"), {}, lost, [("a", "worker_lost")], set(), [fault("kill_pool", T0 + 2)], MAX)
    assert ran.ok and ran.held_lost == 0


def test_early_runs_fail_and_late_ones_are_measured():
    early = check(one("later", due=T0 + 5), {}, ok("a", 1, T0 + 4), [], set(), [], MAX)
    assert early.early == 1 and not early.ok
    late = check(one("later", due=T0 + 5), {}, ok("a", 1, T0 + 7.5), [], set(), [], MAX)
    assert late.ok and round(late.late_max, 3) == 2.5
    # work retries after 0.5, 1.25, 2 s
    retried = [run("a", 1, T0), run("a", 2, T0 + 0.2), *ok("a", 3, T0 + 2)]
    assert check(one("flaky"), {}, retried, [], set(), [], MAX).early == 1


def test_more_attempts_than_the_limit_fail():
    records = [run("a", n, T0 + n * 3) for n in range(1, 6)]
    assert check(one("always"), {}, records, [("a", "exhausted")], set(), [], MAX).over_limit == 1


def test_a_publish_that_raised_counts_only_if_its_message_arrived():
    unsure = {"u": Job("u", "classic", "ok", T0), "v": Job("v", "classic", "ok", T0)}
    report = check({}, unsure, ok("u", 1, T0 + 1), [], set(), [], MAX)
    assert report.published == 1 and report.unsure_seen == 1 and report.ok


def test_a_repeat_is_explained_by_a_death_during_the_run_that_made_the_repeated_copy():
    """Attempt 1 on w1, its connection cut while its retry was published: attempt 2 runs twice. The cut
    came before either copy of attempt 2, during attempt 1 (the soak's flaky-002165)."""
    records = [run("a", 1, T0), run("a", 2, T0 + 0.6, node="w2"), *ok("a", 2, T0 + 0.62)]
    assert check(one("flaky"), {}, records, [], set(), [fault("cut", T0 + 0.01)], MAX).explained == 1
    assert check(one("flaky"), {}, records, [], set(), [fault("cut", T0 - 1)], MAX).unexplained == 1


def test_a_repeated_first_run_is_explained_by_a_death_of_any_worker_after_the_publish():
    """A delayed start sent round by a worker whose connection was then cut (the records do not say which
    worker did it): two copies wait, both run."""
    records = [*ok("a", 1, T0 + 5, node="w2"), *ok("a", 1, T0 + 5.1, node="w3")]
    assert check(one("later", due=T0 + 5), {}, records, [], set(), [fault("cut", T0 + 0.2, "w9")], MAX).explained == 1
    assert check(one("later", due=T0 + 5), {}, records, [], set(), [], MAX).unexplained == 1


def test_an_attempt_counted_without_a_run_is_counted_and_no_retry_reads_as_early():
    """A worker died holding attempt 1 unstarted: attempt 2 is the first run; later a requeue runs attempt 1."""
    records = [run("a", 2, T0 + 1), run("a", 1, T0 + 100)]
    report = check(one("bug"), {}, records, [("a", "bug")], set(), [fault("died", T0 + 0.5, "w9")], MAX)
    assert report.counted_unrun == 0 and report.early == 0  # attempts {1, 2} both ran, in another order
    report = check(one("bug"), {}, [run("a", 2, T0 + 1)], [("a", "bug")], set(), [], MAX)
    assert report.counted_unrun == 1 and report.ok


def test_a_broker_restart_explains_what_happened_while_it_took():
    """The restart is logged when it begins (stop_app) and when the broker is back, 3 s later; an attempt that
    ran while it stopped, whose retry was made twice, is explained (the soak's fallback-000444)."""
    records = [run("a", 1, T0 + 0.1), run("a", 2, T0 + 2.9), run("a", 2, T0 + 3.2, node="w2")]
    restart = [fault("restart_broker", T0, "*"), fault("broker_back", T0 + 3.3, "*")]
    assert check(one("always"), {}, records, [], set(), restart, MAX).explained == 1
    assert check(one("always"), {}, records, [], set(), restart[:1], MAX).unexplained == 1
