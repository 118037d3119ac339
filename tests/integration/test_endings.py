"""Every message ends in exactly one place, on every path (issue 10), on the real broker with real
``celery worker -P prefork`` processes running tests/apps/endings.py (results: docs/faults.md).

Each numbered item of the issue has a test here (the number is in the test's docstring); the last
tests raise an exception at each step of the routing path in turn, on classic and quorum work queues,
and check that each task id ends once: done, or in a bug queue.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from celery import chord
from click.testing import CliRunner
from kombu import Connection, Queue

from rare_celery.endings import MAX_DELIVERIES
from rare_celery.tools.cli import main as cli
from rare_celery.topology import UNROUTED_QUEUE, delay_queue
from tests.support import (
    KINDS,
    BugQueues,
    Records,
    Vhost,
    Worker,
    app_module,
    close_connections,
    drain,
    rabbitmqctl,
    ready_counts,
    restore_env,
    wait_for,
)

# -- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker():
    v = Vhost()
    yield v
    v.delete()


@pytest.fixture(scope="module")
def edir(tmp_path_factory):
    return tmp_path_factory.mktemp("endings")


@pytest.fixture(scope="module")
def eenv(broker, edir):
    return {"RARE_ENDINGS_BROKER": broker.url, "RARE_ENDINGS_DIR": str(edir)}


@pytest.fixture(scope="module")
def endings(eenv):
    """The test process's copy of tests.apps.endings (to publish), pointed at this module's vhost."""
    module, saved = app_module("tests.apps.endings", eenv)
    assert module.app.conf.broker_url == eenv["RARE_ENDINGS_BROKER"]
    yield module
    restore_env(saved)


def main_queues() -> list[str]:
    out = []
    for kind in KINDS:
        base = "endings" if kind == "classic" else "endings.q"
        out += [base, base + ".rescue"]
    return out


@pytest.fixture(scope="module")
def worker(endings, eenv, edir):
    w = Worker("tests.apps.endings", main_queues(), eenv, edir, name="endings").wait_ready()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def records(edir):
    return Records(edir)


@pytest.fixture(scope="module")
def ebugs(broker):
    return BugQueues(broker.url)


def attempts(records, task_id: str) -> list[int]:
    return [r["att"] for r in records.of(task_id, "run")]


def lines(worker, task_id: str, text: str = "") -> list[str]:
    return [line for line in worker.text().splitlines() if task_id in line and text in line]


def nothing_in(broker, task_id: str, queues) -> bool:
    """``task_id`` is in none of ``queues`` (read without taking), and nothing is unacked there."""
    from tests.support import peek_ids

    stats = broker.queue_stats()
    return task_id not in peek_ids(broker.url, queues) and all(stats.get(q, {}).get("unacked", 0) == 0
                                                               for q in queues)


def bug_copies(ebugs, queue: str, task_id: str) -> int:
    """How many copies of ``task_id`` the bug queue ``queue`` has received so far (kept by ``ebugs``)."""
    if queue not in ready_counts(ebugs.url, [queue]):
        return len(ebugs.seen.get((queue, task_id), []))  # the queue does not exist (yet)
    for message in drain(ebugs.url, queue):
        key = (queue, (message.headers or {}).get("id") or "")
        ebugs.seen.setdefault(key, []).append(message)
    return len(ebugs.seen.get((queue, task_id), []))


class RefusingPolicy:
    """A vhost policy that makes a queue refuse every publish (max-length 0, reject-publish)."""

    def __init__(self, vhost, queue: str) -> None:
        self.vhost, self.name = vhost, f"refuse-{uuid.uuid4().hex[:6]}"
        rabbitmqctl("set_policy", "-p", vhost.name, "--apply-to", "queues", "--priority", "10", self.name,
                    f"^{queue.replace('.', '[.]')}$", '{"max-length": 0, "overflow": "reject-publish"}')

    def clear(self) -> None:
        rabbitmqctl("clear_policy", "-p", self.vhost.name, self.name)


# -- lost: acked with no copy anywhere (items 1-4) --------------------------------------------------------

pytestmark = pytest.mark.usefixtures("worker")


def test_soft_time_limit_while_a_refused_retry_waits_loses_nothing(endings, broker, records, worker):
    """1a. The soft time limit fires while the worker waits for the broker to take the retry: the
    wait goes on (the limit cannot interrupt routing), and the retry is published once the broker takes it."""
    target = delay_queue(2000).name
    with Connection(broker.url) as conn:
        delay_queue(2000).bind(conn.default_channel).declare()
    policy = RefusingPolicy(broker, target)
    try:
        result = endings.TASKS["classic"]["soft"].delay()
        started = wait_for(lambda: records.of(result.id, "run"), 10, what="attempt 1")[0]["t"]
        wait_for(lambda: len(lines(worker, result.id, "kept in its queue")) >= 3, 20, 0.2,
                 "three refusals (1 + 2 + 4 s: past the 3 s soft time limit)")
        assert time.time() - started > 3
        assert result.state not in ("FAILURE", "SUCCESS")
        assert ready_counts(broker.url, ["endings"])["endings"] == 0  # held unacked, not put back
    finally:
        policy.clear()
    assert result.get(timeout=30) == ["soft", 2]
    assert attempts(records, result.id) == [1, 2]


def test_a_copy_that_cannot_be_built_ends_in_the_bug_queue_as_unroutable(endings, ebugs, records, worker):
    """1b and 5. A ``stamps`` header that is a string and a past deadline: the bug-queue copy cannot be
    built. The message is put back, at most MAX_DELIVERIES times, then copied as it is to the bug queue."""
    result = endings.eternal.apply_async(headers={"stamps": "not a table", "stamped_headers": ["stamps"],
                                                  "x-rare-deadline": time.time() - 60})
    message = ebugs.find("endings.bugs", result.id, timeout=40)
    h = message.headers
    assert h["x-rare-reason"] == "unroutable"
    assert h["x-rare-deliveries"] == MAX_DELIVERIES + 1
    assert not [k for k in h if k.startswith("rare_")]  # the worker's own bookkeeping stays out of messages
    assert "delivered 6 times without reaching a next place" in h["x-rare-error"]
    assert len(lines(worker, result.id, "put back in endings")) == MAX_DELIVERIES
    assert records.of(result.id, "run") == []  # past its deadline: never run
    assert result.get(timeout=10, propagate=False) is not None and result.state == "FAILURE"


def test_a_hop_whose_result_backend_fails_still_hops_once(endings, records, ebugs):
    """1. The result backend fails to store HOPPED (before the hop is published): the hop still happens, once."""
    task_id = f"nohop-{uuid.uuid4()}"
    result = endings.TASKS["classic"]["work"].apply_async(("hop",), task_id=task_id)
    assert result.get(timeout=15) == ["rescued", "hop"]
    assert len(records.of(task_id, "ok")) == 1
    assert bug_copies(ebugs, "endings.bugs", task_id) == 0


def test_an_unregistered_fallback_class_is_a_bug_not_a_loop(endings, ebugs, records):
    """1. A fallback that names no task ends in the bug queue with a reason, at once."""
    result = endings.orphaned.delay()
    message = ebugs.find("endings.bugs", result.id, timeout=15)
    assert message.headers["x-rare-reason"] == "bug"
    assert "cannot hop to" in message.headers["x-rare-error"]
    assert attempts(records, result.id) == [1]


def test_a_compressed_task_retries_and_is_put_back_decodable(endings, broker, records, worker):
    """Copies are made of the decompressed body: they must not carry the ``compression`` header."""
    result = endings.TASKS["classic"]["work"].apply_async(("flaky",), compression="zlib")
    assert result.get(timeout=15) == ["flaky", 2]
    tag = uuid.uuid4().hex
    held = endings.TASKS["classic"]["holdok"].apply_async((tag,), compression="zlib")
    wait_for(lambda: records.of(held.id, "held"), 15, what="the success to be held before its ack")
    close_connections(broker.name, worker.proc.pid, "fault test: a compressed message redelivered")
    (records.directory / f"release-{tag}").touch()
    wait_for(lambda: lines(worker, held.id, "came back after it had succeeded"), 30, 0.2, "the put-back copy")
    assert not lines(worker, held.id, "decode")


def test_a_retry_comes_back_to_the_queue_it_was_delivered_from(endings, records):
    """2. ``x-rare-queue`` naming a queue that does not exist is not trusted: the retry comes back."""
    result = endings.TASKS["classic"]["work"].apply_async(("flaky",), headers={"x-rare-queue": "some-old-name"})
    assert result.get(timeout=15) == ["flaky", 2]
    assert attempts(records, result.id) == [1, 2]


def test_due_retries_of_a_deleted_work_queue_wait_in_rare_unrouted(endings, broker, records, eenv, edir):
    """2. A work queue deleted while a retry waits: the due retry lands in rare.unrouted (not dropped);
    inspect-bugs reads it there and requeue-bugs --to moves it to a queue that runs it."""
    temp = Worker("tests.apps.endings", ["endings.temp"], eenv, edir, name="temp").wait_ready()
    try:
        result = endings.temp.delay()
        wait_for(lambda: ready_counts(broker.url, [delay_queue(5000).name]).get(delay_queue(5000).name) == 1, 15, 0.1,
                 "the retry to wait in its delay queue")
    finally:
        os.killpg(temp.proc.pid, signal.SIGKILL)  # at once: the retry is due in 5 s
        temp.proc.wait(10)
    rabbitmqctl("delete_queue", "-p", broker.name, "endings.temp")
    assert ready_counts(broker.url, [delay_queue(5000).name])[delay_queue(5000).name] == 1  # still waiting
    wait_for(lambda: ready_counts(broker.url, [UNROUTED_QUEUE.name]).get(UNROUTED_QUEUE.name) == 1, 15, 0.2,
             "the due retry to wait in rare.unrouted")
    runner = CliRunner()
    shown = runner.invoke(cli, ["--broker", broker.url, "inspect-bugs", UNROUTED_QUEUE.name, "--json"])
    assert shown.exit_code == 0, shown.output
    assert result.id in shown.output and '"queue": "endings.temp"' in shown.output
    moved = runner.invoke(cli, ["--broker", broker.url, "requeue-bugs", UNROUTED_QUEUE.name, "--id", result.id,
                                "--to", "endings", "--keep-attempts", "--yes"])
    assert moved.exit_code == 0, moved.output
    assert result.get(timeout=15) == ["temp", 2]
    assert attempts(records, result.id) == [1, 2]


def test_a_delayed_start_after_its_delay_queue_was_deleted_still_runs(endings, broker, worker):
    """3. Delayed starts go to the delay queue with confirms and mandatory: a deleted delay queue is
    declared again, and the task runs."""
    assert endings.delayed.apply_async(("warm",), countdown=1).get(timeout=15) == "warm"
    rabbitmqctl("delete_queue", "-p", broker.name, delay_queue(1000).name)
    published = time.time()
    result = endings.delayed.apply_async(("again",), countdown=1)
    assert result.get(timeout=15) == "again"
    assert time.time() - published >= 1
    assert f"delay queue '{delay_queue(1000).name}'" in worker.text() and "was missing; declaring it" in worker.text()


def test_the_delay_exchange_deleted_under_a_worker_is_declared_again(endings, broker, records, worker):
    """5. ``rare.delay`` deleted while the worker runs: the publish fails (NOT_FOUND), it is declared
    again, the retry is published, nothing loops."""
    work = endings.TASKS["classic"]["work"]
    assert work.delay("flaky").get(timeout=15) == ["flaky", 2]  # declared and cached
    with Connection(broker.url) as conn:
        conn.default_channel.exchange_delete("rare.delay")
    result = work.delay("flaky")
    assert result.get(timeout=15) == ["flaky", 2]
    assert attempts(records, result.id) == [1, 2]
    assert not lines(worker, result.id, "put back")


def test_celerys_expires_becomes_the_deadline(endings, ebugs, records):
    """4. ``expires=1`` on the task: the retry would start after it, so the message ends as expired in
    the bug queue (Celery would revoke it; the broker would drop it from the queue)."""
    result = endings.expiring.delay()
    message = ebugs.find("endings.bugs", result.id, timeout=15)
    assert message.headers["x-rare-reason"] == "expired"
    assert not [k for k in message.headers if k.startswith("rare_")]  # a copy rebuilt in the pool process
    assert attempts(records, result.id) == [1]
    assert message.properties.get("expiration") is None


def test_an_expired_message_waiting_for_a_worker_is_not_dropped(endings, broker, ebugs, records, eenv, edir):
    """4. A task with ``expires`` published while no worker consumes its queue: the broker keeps it past
    the time (no AMQP expiration), and the worker routes it to the bug queue as expired, unrun."""
    published = time.time()
    result = endings.later.delay()
    wait_for(lambda: time.time() - published > 1.0, 5, what="the expires (0.5 s) to pass")
    assert ready_counts(broker.url, ["endings.later"])["endings.later"] == 1  # still there
    late = Worker("tests.apps.endings", ["endings.later"], eenv, edir, name="later").wait_ready()
    try:
        message = ebugs.find("endings.later.bugs", result.id, timeout=15)
    finally:
        late.stop()
    assert message.headers["x-rare-reason"] == "expired"
    assert records.of(result.id, "run") == []


def test_a_permanently_refused_retry_ends_unroutable_after_bounded_deliveries(endings, broker, ebugs, records,
                                                                              worker):
    """5. Every retry publish is refused for good (its delay queue exists with other arguments): the
    message is put back with a count in its headers, MAX_DELIVERIES times, then ends in the bug queue."""
    wrong = Queue(delay_queue(770).name, queue_arguments={"x-message-ttl": 999})
    with Connection(broker.url) as conn:
        wrong.bind(conn.default_channel).declare()
    result = endings.refused.delay()
    message = ebugs.find("endings.bugs", result.id, timeout=60)
    assert message.headers["x-rare-reason"] == "unroutable"
    assert "inequivalent arg" in message.headers["x-rare-error"]
    assert message.headers["x-rare-deliveries"] == MAX_DELIVERIES + 1
    assert attempts(records, result.id) == [1] * (MAX_DELIVERIES + 1)
    assert wait_for(lambda: nothing_in(broker, result.id, ["endings", wrong.name]), 10, 0.2, "no copy left")
    rabbitmqctl("delete_queue", "-p", broker.name, wrong.name)


# -- two endings (items 6-9) --------------------------------------------------------------------------------

def test_a_hop_inside_autoretry_hops_once(endings, ebugs, records):
    """6. Celery's autoretry catches the Hop: it is still one hop, not a retry and a bug-queue copy."""
    result = endings.TASKS["classic"]["auto"].delay("hop")
    assert result.get(timeout=15) == ["rescued", "hop"]
    assert attempts(records, result.id) == [1, 1]  # auto's attempt 1, then rescue's attempt 1
    assert len(records.of(result.id, "ok")) == 1
    assert bug_copies(ebugs, "endings.bugs", result.id) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_new_work_under_the_id_of_a_task_that_succeeded_runs(endings, records, ebugs, worker, kind):
    """Issue 23, 1. A task id is not a message: new work published under the id of a task that
    succeeded (an idempotency key, bulk's ``task_id=sms.id``) runs, even when it arrives as a put-back
    copy (``x-rare-deliveries``: it was redelivered once before it ran)."""
    task_id = f"reused-{uuid.uuid4()}"
    work = endings.TASKS[kind]["work"]
    assert work.apply_async(("ok",), task_id=task_id).get(timeout=15) == ["ok", 1]
    work.apply_async(("ok",), task_id=task_id, headers={"x-rare-deliveries": 1})
    wait_for(lambda: len(records.of(task_id, "ok")) == 2, 15, what="the new work to run")
    assert bug_copies(ebugs, ("endings" if kind == "classic" else "endings.q") + ".bugs", task_id) == 0


def test_a_success_whose_ack_was_lost_is_not_run_again_nor_routed(endings, broker, ebugs, records, worker):
    """7. The task succeeded (SUCCESS stored), then its connection closed before the ack: the broker
    redelivers it; it is put back, seen to have succeeded, and acked, not run, not in the bug queue
    (its max_attempts is 1: counted as a lost attempt it would have ended as worker_lost)."""
    tag = uuid.uuid4().hex
    result = endings.TASKS["classic"]["holdok"].delay(tag)
    wait_for(lambda: records.of(result.id, "held"), 15, what="the success to be held before its ack")
    assert close_connections(broker.name, worker.proc.pid, "fault test: connection lost after the run") >= 1
    (edir_flag := records.directory / f"release-{tag}").touch()
    assert edir_flag.exists()
    wait_for(lambda: lines(worker, result.id, "came back after it had succeeded"), 30, 0.2, "the duplicate acked")
    assert result.get(timeout=10) == ["holdok", 1]
    assert len(records.of(result.id, "ok")) == 1 and attempts(records, result.id) == [1]
    assert bug_copies(ebugs, "endings.bugs", result.id) == 0
    assert not records.of(result.id, "failure")


def test_prefetched_messages_returned_by_a_warm_shutdown_count_nothing(endings, broker, ebugs, records, eenv, edir):
    """7. A worker stopped gracefully (a deploy) returns the messages it had prefetched: they run on the
    next worker as attempt 1, although each has max_attempts 1."""
    once = endings.TASKS["classic"]["once"]
    first = Worker("tests.apps.endings", ["endings.warm"], eenv, edir, name="warm", concurrency=1)
    first.wait_ready()
    results = [once.apply_async((2.0,), queue="endings.warm")] + [once.apply_async((0,), queue="endings.warm")
                                                                 for _ in range(4)]
    wait_for(lambda: records.of(results[0].id, "run"), 15, what="the first task to start")
    wait_for(lambda: broker.queue_stats().get("endings.warm", {}).get("unacked", 0) >= 3, 10, 0.1,
             "the worker to prefetch the others")
    first.proc.send_signal(signal.SIGTERM)  # warm shutdown: the running task finishes, the rest go back
    first.proc.wait(30)
    second = Worker("tests.apps.endings", ["endings.warm"], eenv, edir, name="warm2", concurrency=1).wait_ready()
    try:
        assert [r.get(timeout=30) for r in results] == [["once", 1]] * 5
    finally:
        second.stop()
    for r in results:
        assert bug_copies(ebugs, "endings.warm.bugs", r.id) == 0
        assert len(records.of(r.id, "ok")) == 1


def test_a_hard_time_limit_ends_once(endings, records):
    """8. A hard time limit: one failed attempt (no FAILURE, no errback, no task_failure), the retry
    succeeds and the callback runs once."""
    timed = endings.TASKS["classic"]["timed"]
    result = timed.apply_async((10,), link=endings.callback.s(), link_error=endings.errback.s())
    assert result.get(timeout=30) == ["timed", 2]
    assert attempts(records, result.id) == [1, 2]
    wait_for(lambda: [r for r in records.all() if r["k"] == "callback" and r.get("result") == ["timed", 2]],
             10, what="the callback")
    assert len([r for r in records.all() if r["k"] == "callback" and r.get("result") == ["timed", 2]]) == 1
    assert not records.of(result.id, "failure")
    assert not [r for r in records.all() if r["k"] == "errback"]


def test_retry_state_is_stored_before_the_retry_is_published(endings, edir, records):
    """9. RETRY is stored before the retry's copy exists, and nothing stores it again after: attempt 2's
    SUCCESS stays. Since issue 28 the pool process hands the copy to the worker's main process, which
    publishes it: by then attempt 1's run, Celery's bookkeeping included, has ended (before, the test held
    attempt 1 after the publish until attempt 2 had stored SUCCESS)."""
    result = endings.TASKS["classic"]["racer"].delay()
    assert result.get(timeout=20) == ["racer", 2]
    handed = wait_for(lambda: records.of(result.id, "handed"), 10, what="the retry to be handed over")
    assert handed[0]["states"][-1:] == ["RETRY"], handed  # stored by the pool process, before the publish
    settled = lambda: (edir / f"states-{result.id}").read_text().split("\n")
    wait_for(lambda: "SUCCESS" in settled()[-2], 5, what="the last state stored")
    states = [line.split()[1] for line in settled() if line]
    assert states.index("RETRY") < states.index("SUCCESS")
    assert "RETRY" not in states[states.index("SUCCESS"):], states
    assert endings.app.AsyncResult(result.id).state == "SUCCESS"


def test_a_chord_whose_header_task_retries_runs_its_body_once(endings, records):
    """One ending each: the chord body runs once, after the retried header task succeeded."""
    part = endings.TASKS["classic"]["chordpart"]
    result = chord([part.s(0), part.s(1)], endings.body.s()).apply_async()
    assert result.get(timeout=30) == 1
    bodies = [r for r in records.all() if r["k"] == "body" and r["id"] == result.id]
    assert len(bodies) == 1 and sorted(bodies[0]["results"]) == [0, 1]


def test_retry_with_throw_false_is_that_deliverys_one_ending(endings, records):
    """One ending each: ``self.retry(throw=False)`` and then a return: the retry is the ending, the
    return value is not stored as SUCCESS; attempt 2 ends the task."""
    result = endings.nothrow.delay()
    assert result.get(timeout=15) == ["nothrow", 2]
    assert attempts(records, result.id) == [1, 2]


def test_task_replace_runs_the_replacement_once(endings, records):
    """One ending each: ``Task.replace`` (the replacement keeps the task id) runs the replacement once."""
    result = endings.replacer.delay()
    assert result.get(timeout=15) == "replaced"
    assert [r["task"] for r in records.of(result.id, "run")] == ["endings.plain.replacer", "endings.plain.delayed"]


# -- bad input (item 13) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    {"x-rare-due": time.time() + 20 * 365 * 86400},  # further than any wait (10 years)
    {"x-rare-due": time.time() + 60, "x-rare-deadline": time.time() + 5},  # after its own deadline
], ids=["20 years ahead", "after the deadline"])
def test_a_hostile_due_time_is_rejected_not_parked(endings, ebugs, records, extra):
    result = endings.TASKS["classic"]["work"].apply_async(("ok",), headers=extra)
    message = ebugs.find("endings.bugs", result.id, timeout=15)
    assert message.headers["x-rare-reason"] == "rejected"
    assert "x-rare-due" in message.headers["x-rare-error"]
    assert records.of(result.id, "run") == []


# -- fault injection: an exception at each step of the routing path, conservation --------------------------

PLANS = ("ok", "flaky", "always", "bug", "hop")
STEPS = ("read", "decide", "rebuild", "error", "hop-entry", "send", "mark-retry", "mark-done", "signal")
ENDS = {"ok": "SUCCESS", "flaky": "SUCCESS", "always": "SUCCESS", "hop": "SUCCESS", "bug": "bug"}


@pytest.mark.parametrize("kind", KINDS)
def test_an_exception_at_each_step_of_the_routing_path_loses_nothing(endings, broker, ebugs, records, worker, kind):
    """Each step of the routing path raises once for each of a task's plans (success, retry, fallback,
    Bug, Hop), and for one task every time: each task id ends once, done or in the bug queue."""
    work = endings.TASKS[kind]["work"]
    base = "endings" if kind == "classic" else "endings.q"
    jobs = {}
    for step in STEPS:
        for plan in PLANS:
            jobs[work.apply_async((plan,), {"inject": step}).id] = (plan, step)
        jobs[work.apply_async(("flaky",), {"inject": step + "!"}).id] = ("flaky", step + "!")
    bug_queues = [base + ".bugs", base + ".rescue.bugs"]

    def ended(task_id):
        in_bugs = sum(bug_copies(ebugs, q, task_id) for q in bug_queues)
        return in_bugs or endings.app.AsyncResult(task_id).state == "SUCCESS"
    wait_for(lambda: all(ended(t) for t in jobs), 150, 0.5, "every task to end")
    wait_for(lambda: all(nothing_in(broker, t, [base, base + ".rescue"]) for t in list(jobs)[:5]), 20, 0.5,
             "the queues to settle")
    problems = []
    for task_id, (plan, step) in jobs.items():
        copies = {q: bug_copies(ebugs, q, task_id) for q in bug_queues}
        state = endings.app.AsyncResult(task_id).state
        in_bugs = sum(copies.values())
        if in_bugs > 1 or (in_bugs and state == "SUCCESS"):
            problems.append(f"{plan}/{step}: two endings: {copies}, {state}")
        reasons = [m.headers["x-rare-reason"] for q in bug_queues for m in ebugs.seen.get((q, task_id), [])]
        expected = ENDS[plan]
        if step.endswith("!") and reasons == ["unroutable"]:
            continue  # a step that always fails: bounded, then the bug queue
        if expected == "SUCCESS" and state != "SUCCESS":
            problems.append(f"{plan}/{step}: ended {state} {reasons}")
        if expected == "bug" and reasons != ["bug"]:
            problems.append(f"{plan}/{step}: ended {state} {reasons}")
        oks = len(records.of(task_id, "ok"))
        if state == "SUCCESS" and oks != 1 and not step.startswith("mark-done"):
            problems.append(f"{plan}/{step}: {oks} successful runs")
    assert not problems, problems
    assert len(worker.text().split("Traceback")) < 10 * len(jobs)  # sanity: no loop filled the log
