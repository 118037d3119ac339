"""A service's limits against the real broker: real workers of tests/apps/breakers.py, a fake service
that records each request (when it began and ended, at which attempt). All workers together stay within
the service's rate and attempts in flight; attempts outside them wait in the service's line and are
served in about the order they came. (Run on the newest Celery only: the path is Celery's worker, the
same on 5.4, and CI's time is counted; see tox.ini.)
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from kombu import Connection

from tests.support import Events, Worker, take_exclusive, wait_for


@pytest.fixture(scope="module")
def app(env):
    return importlib.import_module("tests.apps.breakers")


@pytest.fixture(scope="module")
def record(workdir):
    """What the fake service recorded (test_breakers.py reads the same file)."""
    return Events(Path(workdir) / "breaker-events.jsonl")


def kinds(record, kind, **match):
    return [e for e in record.all() if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times)), default=0)


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_two_workers_stay_within_the_services_rate_and_attempts_in_flight(app, env, workdir, record):
    """``service_rate="20/s"``, ``service_concurrency=3``: two workers of 4 processes each, 150 tasks.
    The service never sees more than 20 requests in any second nor more than 3 at once; every task runs
    once, at attempt 1 (a wait for the limits counts nothing)."""
    workers = [Worker("tests.apps.breakers", ["breakers.limited"], env, workdir, name=f"lim{i}", concurrency=4)
               .wait_ready() for i in range(2)]
    try:
        ids = {app.limited.delay(f"l{i}").id for i in range(150)}
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served" and e["id"] in ids])
                          >= len(ids) and s, 90, 0.5, "every task served")
        from tests.integration.test_cli import cli

        report = json.loads(cli("-A", "tests.apps.breakers", "status", "breakers.limited", "--json").out)
        [row] = report["breakers"]
        assert row["settings"]["rate"] == [20, 1.0] and row["settings"]["concurrency"] == 3
        assert 0 <= row["in_window"] <= 20 and row["in_flight"] == 0  # all done: none in flight
    finally:
        for w in workers:
            w.stop()
    assert sorted(Counter(e["id"] for e in served).values()) == [1] * len(ids)  # each once
    assert {e["attempt"] for e in served} == {1}
    assert most_in_any_window([e["began"] for e in served], 1.0) <= 20
    assert most_at_once([(e["began"], e["ended"]) for e in served]) <= 3
    took = max(e["began"] for e in served) - min(e["began"] for e in served)
    print(f"limits: {len(served)} served in {took:.2f} s ({(len(served) - 1) / took:.1f}/s of 20/s), "
          f"most in any 1 s {most_in_any_window([e['began'] for e in served], 1.0)}, "
          f"most at once {most_at_once([(e['began'], e['ended']) for e in served])}")
    assert took >= (150 - 20) / 20  # the rate held them back: no faster than the limit allows


def test_the_slots_of_a_worker_that_dies_are_free_again_at_once(app, env, workdir, record):
    """``service_concurrency=2``: a worker runs two long requests (both slots) and is killed whole
    (SIGKILL). Its connections close, the broker frees the slots, and the other worker starts the
    next requests within seconds; never more than 2 at once."""
    import os
    import signal

    first = Worker("tests.apps.breakers", ["breakers.slotted"], env, workdir, name="slot1").wait_ready()
    second = None
    try:
        held = [app.slotted.delay(f"h{i}", 30.0) for i in range(2)]  # long: they hold both slots
        wait_for(lambda: len({e["id"] for e in record.all() if e["kind"] == "serving"
                              and e["id"] in {r.id for r in held}}) == 2, 20, 0.1, "both slots held")
        from tests.integration.test_cli import cli

        shown = cli("-A", "tests.apps.breakers", "status", "breakers.slotted").out
        assert "at most 2 at once" in shown and "now: 2 of 2 in flight" in shown, shown
        second = Worker("tests.apps.breakers", ["breakers.slotted"], env, workdir, name="slot2").wait_ready()
        quick = {app.slotted.delay(f"q{i}", 0.2).id for i in range(4)}
        wait_for(lambda: " ignored" in second.text(), 20, 0.1,  # sent to wait: both slots held
                 "the other worker to find every slot held")
        assert not [e for e in record.all() if e["kind"] == "serving" and e["id"] in quick]
        killed = time.time()
        os.killpg(first.proc.pid, signal.SIGKILL)
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served" and e["id"] in quick])
                          == len(quick) and s, 30, 0.1, "the next requests on the other worker")
    finally:
        for w in (first, second):
            if w is not None:
                w.stop()
    freed = min(e["began"] for e in served) - killed
    print(f"slots: the first request after the kill began {freed:.2f} s after it")
    assert freed < 3.0, f"the first slot came free {freed:.1f} s after the kill"
    ends = {(e["id"], e["began"]): e["ended"] for e in record.all() if e["kind"] == "served"
            and e.get("service") == "slotted"}
    spans = [(e["began"], ends.get((e["id"], e["began"]), killed))  # the killed ones ended with their worker
             for e in record.all() if e["kind"] == "serving" and e.get("service") == "slotted"]
    assert most_at_once(spans) <= 2


def test_waiting_attempts_are_served_in_arrival_order_and_the_service_says_when_it_limits(app, env, workdir,
                                                                                         record):
    """``service_concurrency=1``, 16 tasks sent one after another to a worker of 4 processes: they wait in
    the service's line (``rare.limit.single.line``), not in the worker, and are served one at a time in
    about the order they were sent (4 processes may swap neighbours). ``status`` and ``/metrics`` count
    the waiting; the worker signals (and sends ``rare-limit-start``) when the service starts limiting,
    and ``limit_stopped`` once its line has been empty for 5 s."""
    from tests.integration.test_cli import cli

    worker = Worker("tests.apps.breakers", ["breakers.single"], env, workdir, name="single",
                    concurrency=4).wait_ready()
    try:
        sent = [app.single.delay(f"s{i}").id for i in range(16)]
        order = {task_id: i for i, task_id in enumerate(sent)}
        shown = wait_for(lambda: (out := cli("-A", "tests.apps.breakers", "status", "breakers.single").out)
                         and re.search(r"[1-9]\d* waiting", out) and out, 10, 0.1, "the waiting counted")
        assert "of 1 in flight" in shown, shown
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served" and e["id"] in order])
                          == len(sent) and s, 60, 0.2, "every task served")
        started = wait_for(lambda: kinds(record, "limit-start", service="single"), 10, 0.1, "limit_started")
        assert started[0]["waiting"] >= 1
        wait_for(lambda: kinds(record, "limit-stop", service="single"), 20, 0.2, "limit_stopped")
    finally:
        worker.stop()
    assert sorted(Counter(e["id"] for e in served).values()) == [1] * len(sent)
    assert {e["attempt"] for e in served} == {1}  # waiting counts no attempt
    assert most_at_once([(e["began"], e["ended"]) for e in served]) <= 1
    ranks = [order[e["id"]] for e in sorted(served, key=lambda e: e["began"])]
    print(f"served in the order sent: {ranks}")
    assert max(abs(rank - place) for place, rank in enumerate(ranks)) <= 4, ranks


def test_an_attempt_woken_for_a_slot_another_took_goes_back_to_the_head_of_the_line(app, env, workdir, record,
                                                                                    vhost):
    """Two wakes for one free slot (two workers' looks, or a look and an ending): the attempt that finds
    the slot taken waits again at the head of the line, not its end. Here the test holds the one slot
    of ``single`` and wakes the head itself: that attempt comes back to the line, and once the slot is
    free the three are served in the order they came (without the head it would be served last)."""
    from rare_celery import limits_io
    from rare_celery.topology import line_queue, slot_lock_name

    line = line_queue("single").name
    worker = Worker("tests.apps.breakers", ["breakers.single"], env, workdir, name="head", concurrency=4).wait_ready()
    holder = Connection(vhost.url)
    try:
        holder.default_channel.queue_declare(slot_lock_name("single", 0), exclusive=True, auto_delete=False,
                                             arguments={"x-queue-type": "classic"})  # the slot, held here
        with Connection(vhost.url) as conn:
            sent = []
            for i in range(3):  # one at a time: the line's order is the order sent
                sent.append(app.single.delay(f"h{i}").id)
                wait_for(lambda: limits_io.depth(conn, line) == len(sent), 20, 0.05, f"task {i} in the line")
            # the head, woken while the slot is held (the line's depth is not read here: the woken copy is
            # published before the line's is acked, and the worker may have put it back already; found by CI)
            assert limits_io.wake(conn, "single", "classic") == 1
            wait_for(lambda: limits_io.depth(conn, line) == 3, 20, 0.05, "the woken attempt back in the line")
        assert not [e for e in record.all() if e["kind"] == "served" and e["id"] in sent]
        holder.release()  # the slot is free: the worker's look at the line wakes the head
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served" and e["id"] in sent])
                          == 3 and s, 30, 0.1, "the three served")
    finally:
        holder.release()
        worker.stop()
    assert [e["id"] for e in sorted(served, key=lambda e: e["began"])] == sent
    assert {e["attempt"] for e in served} == {1}


def test_a_rate_only_service_lets_its_line_go_at_its_rate(app, env, workdir, record):
    """``service_rate="5/s"`` and no cap on attempts in flight: 20 tasks wait in the line and the workers
    wake them as the window frees places: never more than 5 in any second, each once, at attempt 1."""
    workers = [Worker("tests.apps.breakers", ["breakers.rated"], env, workdir, name=f"rated{i}", concurrency=2)
               .wait_ready() for i in range(2)]
    try:
        ids = {app.rated.delay(f"r{i}").id for i in range(20)}
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served" and e["id"] in ids])
                          >= len(ids) and s, 60, 0.2, "every task served")
    finally:
        for w in workers:
            w.stop()
    assert sorted(Counter(e["id"] for e in served).values()) == [1] * len(ids)
    assert {e["attempt"] for e in served} == {1}
    began = [e["began"] for e in served]
    assert most_in_any_window(began, 1.0) <= 5
    took = max(began) - min(began)
    print(f"rate only: 20 served in {took:.2f} s at 5/s")
    assert took >= (20 - 5) / 5 - 0.1  # the window held them back


def test_a_requeue_of_a_limited_services_bugs_goes_through_its_line(app, env, workdir, record, vhost):
    """``rare-celery requeue-bugs`` of a task whose service has limits puts the messages in the service's
    line, not straight in the work queue: they go out as the limits allow (here one at a time). (Their
    order is the bug queue's as the requeue took it; the plan's read before may have moved some.)"""
    from pathlib import Path

    from tests.integration.test_cli import cli

    flag = Path(workdir) / "bug-single"
    flag.touch()
    worker = Worker("tests.apps.breakers", ["breakers.single"], env, workdir, name="bugs1").wait_ready()
    try:
        sent = [app.single.delay(f"b{i}").id for i in range(6)]
        wait_for(lambda: vhost.queue_stats().get("breakers.single.bugs", {}).get("ready") == 6, 30, 0.2,
                 "six in the bug queue")
    finally:
        worker.stop()
    flag.unlink()
    moved = cli("-A", "tests.apps.breakers", "requeue-bugs", "breakers.single.bugs", "--all", "-y")
    assert moved.code == 0 and "requeued 6 messages" in moved.out, moved.out + moved.err
    stats = vhost.queue_stats()
    assert stats["rare.limit.single.line"]["ready"] == 6 and stats["breakers.single"]["ready"] == 0, stats
    worker = Worker("tests.apps.breakers", ["breakers.single"], env, workdir, name="bugs2", concurrency=4).wait_ready()
    try:
        order = {task_id: i for i, task_id in enumerate(sent)}
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served" and e["id"] in order])
                          == len(sent) and s, 30, 0.2, "the requeued tasks served")
    finally:
        worker.stop()
    assert most_at_once([(e["began"], e["ended"]) for e in served]) <= 1
    assert sorted(Counter(e["id"] for e in served).values()) == [1] * len(sent)
    assert {e["attempt"] for e in served} == {1}  # a requeue starts over


def test_a_window_queue_the_broker_refuses_holds_attempts_without_a_hot_loop_and_a_deleted_one_comes_back(
        app, env, workdir, record, vhost):
    """The rate's window queue exists with other arguments (the broker refuses its declare): attempts
    cannot ask for a place, so they wait (1-2 s a round, logged), never run unlimited and never spin.
    Once it is gone they run, and a window deleted while workers use it is declared again."""
    with Connection(vhost.url) as conn:
        conn.default_channel.queue_delete("rare.limit.limited.rate.20-per-1s")  # another test's window
        conn.default_channel.queue_declare("rare.limit.limited.rate.20-per-1s", durable=True, auto_delete=False,
                                           arguments={"x-queue-type": "classic", "x-max-length": 999})
    worker = Worker("tests.apps.breakers", ["breakers.limited"], env, workdir, name="window",
                    concurrency=2).wait_ready()
    try:
        ids = {app.limited.delay(f"w{i}").id for i in range(3)}
        def asked() -> int:
            return worker.text().count("could not ask for a place in its rate window")

        wait_for(lambda: asked() >= 3, 20, 0.1, "the refusals logged")
        started = time.monotonic()
        wait_for(lambda: asked() >= 12, 30, 0.1, "nine more asks")
        took = time.monotonic() - started
        print(f"window refused: 9 asks of 3 attempts took {took:.1f} s")
        assert took >= 1.5, took  # 1-2 s a round each: about 3 s; a hot loop asks that often in milliseconds
        assert not [e for e in record.all() if e["kind"] == "served" and e["id"] in ids]  # never unlimited
        with Connection(vhost.url) as conn:
            conn.default_channel.queue_delete("rare.limit.limited.rate.20-per-1s")
        wait_for(lambda: len({e["id"] for e in record.all() if e["kind"] == "served" and e["id"] in ids}) == 3,
                 20, 0.2, "the attempts to run once the window can be declared")
        with Connection(vhost.url) as conn:  # deleted while in use: declared again at the next ask
            conn.default_channel.queue_delete("rare.limit.limited.rate.20-per-1s")
        more = {app.limited.delay(f"x{i}").id for i in range(3)}
        wait_for(lambda: len({e["id"] for e in record.all() if e["kind"] == "served" and e["id"] in more}) == 3,
                 20, 0.2, "the attempts after the delete")
        assert wait_for(lambda: vhost.queue_stats().get("rare.limit.limited.rate.20-per-1s") is not None, 10, 0.5,
                        "the window declared again")
    finally:
        worker.stop()


def test_a_pause_another_worker_asked_for_holds_attempts_before_its_note_arrives(app, env, workdir, record, vhost):
    """A request of another worker got ``Retry-After`` a moment ago: its pause is in the service's pause
    queue (``rare.limit.limited.pause``) before its breaker note reaches anyone. Here only the queue says
    so (no note at all): attempts are held while it lasts (3 s), a round every 0.5-1 s, not counted,
    and run once it has passed."""
    from kombu import Producer

    from rare_celery.topology import pause_queue

    worker = Worker("tests.apps.breakers", ["breakers.limited"], env, workdir, name="paused",
                    concurrency=2).wait_ready()
    try:
        with Connection(vhost.url) as conn:
            queue = pause_queue("limited")(conn.default_channel)
            queue.declare()
            paused = time.time()  # before the publish: the pause is at least as long as measured from here
            Producer(conn.default_channel).publish(b"", routing_key=queue.name, expiration=3.0)
        ids = {app.limited.delay(f"p{i}").id for i in range(3)}
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served" and e["id"] in ids])
                          == 3 and s, 30, 0.1, "the three served after the pause")
    finally:
        worker.stop()
    first = min(e["began"] for e in served) - paused
    print(f"pause queue: the first request {first:.2f} s after a 3 s pause began")
    assert first >= 3.0, first
    assert {e["attempt"] for e in served} == {1} and len({e["id"] for e in served}) == len(served) == 3


def test_a_retry_after_of_a_limited_service_is_in_its_pause_queue_at_once(app, env, workdir, record, vhost):
    """A request of a service with limits gets 429 ``Retry-After: 3``: the attempt puts the pause in the
    service's pause queue (for 3 s) before it lets its slot go, and no request reaches the service until
    the 3 s have passed; the 429'd task runs again at attempt 2, the others at attempt 1."""
    from rare_celery import limits_io
    from rare_celery.topology import pause_queue

    worker = Worker("tests.apps.breakers", ["breakers.busy"], env, workdir, name="busy", concurrency=2).wait_ready()
    try:
        Path(app.busy_file("busy")).touch()
        first = app.busy.delay("first").id
        with Connection(vhost.url) as conn:
            wait_for(lambda: limits_io.depth(conn, pause_queue("busy").name) == 1, 20, 0.02, "the pause in its queue")
        [told] = [e for e in record.all() if e["kind"] == "served" and e["id"] == first]
        others = {app.busy.delay(f"o{i}").id for i in range(3)}
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served"
                                            and e["id"] in others | {first}]) == 5 and s, 30, 0.1, "all served")
    finally:
        worker.stop()
    after = [e for e in served if e["answer"] == 200]
    first_after = min(e["began"] for e in after) - told["began"]
    print(f"retry-after on a limited service: the next request {first_after:.2f} s after the 429")
    assert first_after >= 3.0, first_after
    assert {e["id"]: e["attempt"] for e in after}[first] == 2 and all(
        e["attempt"] == 1 for e in after if e["id"] != first)


def test_a_pause_queue_the_broker_refuses_holds_attempts_until_it_can_be_read(app, env, workdir, record, vhost):
    """``rare.limit.busy.pause`` exists with other arguments, so the gate cannot read whether the service
    is paused: attempts wait (1-2 s a round, logged), never run through a pause they cannot see; once
    it is gone they run, once each, at attempt 1."""
    from rare_celery.topology import pause_queue

    name = pause_queue("busy").name
    with Connection(vhost.url) as conn:
        conn.default_channel.queue_delete(name)  # the other test's
        conn.default_channel.queue_declare(name, durable=True, auto_delete=False, arguments={"x-max-length": 7})
    worker = Worker("tests.apps.breakers", ["breakers.busy"], env, workdir, name="unread", concurrency=2).wait_ready()
    try:
        ids = {app.busy.delay(f"u{i}").id for i in range(2)}
        wait_for(lambda: worker.text().count("could not read its pause queue") >= 4, 20, 0.1, "two rounds each")
        assert not [e for e in record.all() if e["kind"] == "served" and e["id"] in ids]
        with Connection(vhost.url) as conn:
            conn.default_channel.queue_delete(name)
        served = wait_for(lambda: len(s := [e for e in record.all() if e["kind"] == "served" and e["id"] in ids])
                          == 2 and s, 20, 0.1, "the attempts to run once it can be read")
    finally:
        worker.stop()
    assert {e["attempt"] for e in served} == {1} and len({e["id"] for e in served}) == 2


def test_a_slot_gone_with_its_connection_is_not_deleted_from_its_new_holder(app, vhost):
    """A pool process's holding connection is lost while it holds a slot: the broker frees the slot, and
    another process takes it. When the first attempt ends it lets go of nothing (its slot went with the
    connection): the other's slot stays held, and the first process's new connection is not broken by
    a refused delete."""
    from rare_celery import limits_io
    from rare_celery.topology import slot_lock_name

    slot = limits_io.take_slot(app.app, "gone", 1)
    assert slot is not None
    limits_io._holder.drop()  # the connection is lost: the broker deletes the slot's exclusive queue
    with Connection(vhost.url) as other:
        take_exclusive(other, slot_lock_name("gone", 0))  # taken by another
        assert limits_io.take_slot(app.app, "gone", 1) is None  # held by the other (on the first's new connection)
        slot.release()
        # the new connection's channel answers the next question (a refused delete, not waited for, would
        # close it under whatever asks next: the wake of the next attempt, or a gate's read)
        assert limits_io.paused(app.app, "gone") is False
        with Connection(vhost.url) as look:
            assert limits_io.held(look.connection, slot_lock_name("gone", 0)) is True  # still the other's
    limits_io._holder.drop()
