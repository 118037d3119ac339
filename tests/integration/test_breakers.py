"""Circuit breakers against the real broker: real workers, a fake downstream that goes down and up.

tests/apps/breakers.py: breaker ``svc`` trips after 3 failures in a row, stays open 2 s, then 4 s
(its cap) after each failed probe; breaker ``slow`` trips at the first failure and stays open 60 s,
longer than its task's 4 s shelf life.
"""

from __future__ import annotations

import importlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from kombu import Connection

from rare_celery.breaker import PROBE_LEASE
from tests.support import BugQueues, Events, Worker, wait_for

PROCESSES = 4  # two workers, -c 2 each
NOTE_LATENCY = 0.1  # s: how much earlier one worker's probe time may be than the signalling worker's


@pytest.fixture(scope="module")
def app(env):
    return importlib.import_module("tests.apps.breakers")


@pytest.fixture(scope="module")
def record(workdir):
    return Events(Path(workdir) / "breaker-events.jsonl")


def rare_waits(app, vhost) -> tuple[list[dict], Callable[[], None]]:
    """The ``rare-wait`` events the workers send from now on (a list that fills), and how to stop listening."""
    waits: list[dict] = []
    conn = Connection(vhost.url)
    receiver = app.app.events.Receiver(conn, handlers={"rare-wait": waits.append})
    listening = threading.Event()
    receiver.on_iteration = listening.set
    threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True).start()
    assert listening.wait(10)

    def stop() -> None:
        receiver.should_stop = True
        conn.release()
    return waits, stop


def kinds(record, kind, **match):
    return [e for e in record.all() if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]


def test_an_outage_trips_the_breaker_one_probe_per_open_period_and_a_good_probe_lets_all_run(app, env, workdir,
                                                                                               record, vhost):
    down = Path(app.down_file("svc"))
    down.touch()
    waits, stop_listening = rare_waits(app, vhost)  # each rare-wait: one round of a held attempt
    workers = [Worker("tests.apps.breakers", ["breakers"], env, workdir, name=f"bk{i}") for i in (1, 2)]
    try:
        for w in workers:
            w.wait_ready()
        ids = [app.translate.delay(f"k{i}").id for i in range(40)]
        wait_for(lambda: kinds(record, "breaker-open", breaker="svc", gen=3), 40, 0.1, "two failed probes")
        down.unlink()
        close = wait_for(lambda: kinds(record, "breaker-close", breaker="svc"), 30, 0.1, "the probe that closes it")
        def all_done():
            done = Counter(e["id"] for e in kinds(record, "done", service="svc"))
            return done if set(done) >= set(ids) else None
        done = wait_for(all_done, 30, 0.2, "every task done")
    finally:
        for w in workers:
            w.stop()
        down.unlink(missing_ok=True)
        stop_listening()

    events = record.all()
    requests = [e for e in events if e["kind"] == "request" and e["service"] == "svc"]
    opens = sorted(kinds(record, "breaker-open", breaker="svc"), key=lambda e: e["gen"])
    assert [e["gen"] for e in opens] == list(range(1, len(opens) + 1)), "one open signal per open period"
    assert [round(e["open_for"]) for e in opens[:3]] == [2, 4, 4] and [e["reopened"] for e in opens[:3]] == [
        False, True, True]
    # before the trip: the 3 failures that trip it, plus attempts that had already started
    before = [r for r in requests if r["t"] < opens[0]["t"]]
    assert 3 <= len(before) <= 3 + PROCESSES, before
    # while open: exactly one request per open period (the probe), never before its probe time
    for period, after in zip(opens, opens[1:]):
        inside = [r for r in requests if period["t"] < r["t"] <= after["t"]]
        assert len(inside) == 1 and not inside[0]["up"], f"open period {period['gen']}: {inside}"
        # each worker counts the period on its own clock from when it heard the note (issue 24): across workers
        # the probe time differs by the note's way through the broker (milliseconds), never by a clock's error
        assert inside[0]["t"] >= period["until"] - NOTE_LATENCY, "a probe before its time"
    good = min((r for r in requests if r["t"] > opens[-1]["t"]), key=lambda r: r["t"])
    assert good["up"] and good["t"] >= opens[-1]["until"] - NOTE_LATENCY and good["id"] == close[0]["id"]
    probes = kinds(record, "breaker-probe", breaker="svc")
    assert len(probes) == len(opens) and len({p["gen"] for p in probes}) == len(probes)
    # every task ended once; the attempts counted are the requests made (waiting counts none)
    assert set(done) == set(ids) and max(done.values()) == 1
    for task_id in ids:
        mine = [r for r in requests if r["id"] == task_id]
        assert [r["attempt"] for r in mine] == list(range(1, len(mine) + 1)), mine
    last = max(e["t"] for e in events if e["kind"] == "done" and e["id"] in ids)
    # held attempts wait for a probe's verdict (at most its lease), not a second at a time
    assert last - close[0]["t"] < PROBE_LEASE + 3.0, "a closed breaker lets the waiting tasks run within the lease"
    # issue 23, 6: rounds through a delay queue per held attempt and open period (one a second while a probe
    # ran, before): at most 2, one until the probe time and one for the probe's verdict
    rounds = Counter(w["uuid"] for w in waits if w.get("breaker") == "svc")
    periods = len(opens)  # the last one ends with the good probe
    print(f"breaker rounds: {sum(rounds.values())} for {len(rounds)} held tasks, {periods} open periods; "
          f"most for one task {max(rounds.values())}, per task and period {sum(rounds.values()) / len(rounds) / periods:.2f}")
    assert max(rounds.values()) <= 2 * periods, rounds.most_common(3)
    stats = vhost.queue_stats()
    assert stats["breakers"]["ready"] + stats["breakers"]["unacked"] == 0
    assert stats.get("breakers.bugs", {"ready": 0})["ready"] == 0


def test_attempts_held_while_a_long_probe_runs_wait_for_its_verdict_not_a_second_at_a_time(app, env, workdir, record,
                                                                                          vhost):
    """Issue 23, item 6. The probe takes 6 s to fail; 20 attempts are held meanwhile. Each waits for the
    probe's verdict (at most its lease) in one round through a delay queue: at most 2 rounds per held
    attempt and open period (before: one round a second while the probe ran, ~8 in that period)."""
    down = Path(app.down_file("slowp"))
    down.touch()
    waits, stop_listening = rare_waits(app, vhost)
    worker = Worker("tests.apps.breakers", ["breakers.slowprobe"], env, workdir, name="slowp")
    try:
        worker.wait_ready()
        first = app.slowprobe.delay("trip")  # trips it (one failure), then its retries are held
        wait_for(lambda: kinds(record, "breaker-open", breaker="slowp", gen=1), 20, 0.1, "the trip")
        ids = [first.id] + [app.slowprobe.delay(f"held{i}").id for i in range(20)]
        wait_for(lambda: kinds(record, "breaker-open", breaker="slowp", gen=2), 30, 0.1, "the slow probe to fail")
        down.unlink()
        wait_for(lambda: {e["id"] for e in kinds(record, "done", service="slowp")} >= set(ids), 60, 0.2,
                 "every task done")
    finally:
        worker.stop()
        down.unlink(missing_ok=True)
        stop_listening()
    periods = len(kinds(record, "breaker-open", breaker="slowp"))
    rounds = Counter(w["uuid"] for w in waits if w.get("breaker") == "slowp" and w["uuid"] in ids)
    print(f"slow probe: {sum(rounds.values())} rounds for {len(rounds)} held tasks, {periods} open periods; "
          f"most for one task {max(rounds.values())}")
    assert max(rounds.values()) <= 2 * periods, rounds.most_common(3)


def test_a_shelf_life_ending_while_the_breaker_holds_it_ends_expired_and_a_late_worker_knows_it_is_open(
        app, env, workdir, record, vhost):
    down = Path(app.down_file("slow"))
    down.touch()
    bugs = BugQueues(vhost.url)
    try:
        first = Worker("tests.apps.breakers", ["breakers.short"], env, workdir, name="early").wait_ready()
        try:
            tripper = app.short.delay("s1")
            opened = wait_for(lambda: kinds(record, "breaker-open", breaker="slow"), 20, 0.1, "the trip")[0]
            message = bugs.find("breakers.short.bugs", tripper.id, timeout=20)
        finally:
            first.stop()
        headers = message.headers
        assert headers["x-rare-reason"] == "expired"
        assert headers["x-rare-failed-at"] >= headers["x-rare-deadline"]  # at its deadline, not before
        assert headers["x-rare-attempt"] == 2  # attempt 1 failed and tripped it; attempt 2 never ran
        assert len([e for e in record.all() if e["kind"] == "request" and e["id"] == tripper.id]) == 1
        assert opened["until"] > headers["x-rare-deadline"]

        late = Worker("tests.apps.breakers", ["breakers.short"], env, workdir, name="late").wait_ready()
        try:
            assert re.search(r"rare_celery: breakers .*\bslow open\b", late.text())  # read from the broker at start
            sent = time.time()
            held = app.short.delay("s2")
            foreign = app.app.send_task("breakers.short", args=["s3"], queue="breakers.short")  # no x-rare-first-at
            message = bugs.find("breakers.short.bugs", held.id, timeout=20)
            other = bugs.find("breakers.short.bugs", foreign.id, timeout=20)  # its shelf life runs from its arrival
        finally:
            late.stop()
        assert message.headers["x-rare-reason"] == "expired" == other.headers["x-rare-reason"]
        assert message.headers["x-rare-failed-at"] >= sent + 4 - 0.01
        assert not [e for e in record.all() if e["kind"] == "request" and e["id"] in (held.id, foreign.id)], \
            "the late worker sent a request to a service whose breaker is open"
    finally:
        down.unlink(missing_ok=True)


def test_the_probe_lock_is_held_by_one_connection_and_goes_with_it(app):
    from rare_celery import breaker_io

    first, _ = breaker_io.try_probe(app.app, "lock-test")
    assert first is not None
    try:
        second, state = breaker_io.try_probe(app.app, "lock-test")
        assert second is None and state is None  # RESOURCE_LOCKED: the other attempt waits
    finally:
        first.release()
    # released with its connection: the broker deletes the exclusive queue once it sees the connection
    # gone, a moment after its close-ok (a declare in that moment is refused; found by CI on 4.3)
    third = wait_for(lambda: breaker_io.try_probe(app.app, "lock-test")[0], 10, 0.05, "the lock released")
    third.release()


def test_hard_time_limits_trip_it_and_a_probe_lost_with_its_process_opens_it_again(app, env, workdir, record):
    down = Path(app.down_file("hang"))
    down.touch()
    worker = Worker("tests.apps.breakers", ["breakers.hang"], env, workdir, name="hang").wait_ready()
    try:
        ids = [app.hang.delay(f"h{i}").id for i in range(3)]
        wait_for(lambda: kinds(record, "breaker-open", breaker="hang", gen=2), 40, 0.1, "a lost probe")
        down.unlink()
        wait_for(lambda: {e["id"] for e in kinds(record, "done", service="hang")} >= set(ids), 30, 0.2,
                 "every task done")
    finally:
        worker.stop()
        down.unlink(missing_ok=True)
    opens = sorted(kinds(record, "breaker-open", breaker="hang"), key=lambda e: e["gen"])
    assert opens[0]["reopened"] is False and opens[1]["reopened"] is True and opens[1]["open_for"] == 2
    stuck = [e for e in record.all() if e["kind"] == "request" and e["service"] == "hang" and not e["up"]]
    assert 2 <= len(stuck) <= 2 + 2 + len(opens) - 1, stuck  # the 2 that trip it, those under way, one per probe


def test_a_note_from_a_fast_clock_or_with_a_bad_period_does_not_hold_the_breaker(app, env, workdir, record, vhost):
    """Issue 24, item 6, on the real broker. A worker whose clock is an hour ahead announces ``svc`` open
    for 2 s; another note, a probe whose ``open_for`` is not a number, follows. The workers count the 2 s on
    their own clock (before: an hour), drop the bad note with one log line, and the next attempt probes
    and runs within seconds."""
    from tests.integration.test_cli import breaker_notes

    worker = Worker("tests.apps.breakers", ["breakers"], env, workdir, name="clock").wait_ready()
    try:
        with breaker_notes(vhost.url, "svc") as announce:
            ahead = time.time() + 3600
            announce({"breaker": "svc", "kind": "open", "gen": 50, "at": ahead, "until": ahead + 2, "open_for": 2,
                      "by": "fast-clock@host", "task": "t-fast"})
            announce({"breaker": "svc", "kind": "probe", "gen": 50, "at": ahead, "open_for": "two", "by": "bad@host",
                      "task": "t-bad"})
            def heard():  # the notes were confirmed, so they reached the worker's queue; now it has them
                stats = vhost.queue_stats()
                mine = [s for q, s in stats.items() if q.startswith("rare.breakers.clock-")]
                return mine and all(s["ready"] == 0 and s["unacked"] == 0 for s in mine)
            wait_for(heard, 10, 0.1, "the worker to hear the notes")
            sent = time.time()
            result = app.translate.delay("after-the-clock")
            done = wait_for(lambda: kinds(record, "done", id=result.id), 20, 0.1, "the attempt to run")
            assert done[0]["t"] - sent < 15
            assert worker.text().count("ignored a breaker note that is not one (no valid open_for)") == 1
    finally:
        worker.stop()


# -- held on purpose: an operator's pause, a service's Retry-After ---------------------------------

def test_a_retry_after_from_one_request_pauses_the_service_for_every_worker(app, env, workdir, record):
    """One request gets HTTP 429 with Retry-After: 3. No request of any worker reaches the service
    until those 3 s have passed; then every task runs once, the 429'd one at attempt 2."""
    workers = [Worker("tests.apps.breakers", ["breakers.gateway"], env, workdir, name=f"gw{i}").wait_ready()
               for i in range(2)]
    try:
        Path(app.busy_file("gateway")).touch()
        first = app.gateway.delay("first")
        [opened] = wait_for(lambda: kinds(record, "breaker-open", breaker="gateway"), 20, 0.05, "the pause")
        assert opened["why"].startswith("Retry-After 3 s") and opened["reopened"] is False
        [asked] = [e for e in record.all() if e["kind"] == "request" and e["id"] == first.id]
        others = [app.gateway.delay(f"k{i}") for i in range(6)]
        ids = {first.id, *(r.id for r in others)}
        done = wait_for(lambda: (found := [e for e in record.all() if e["kind"] == "done" and e["id"] in ids])
                        and len(found) == len(ids) and found, 40, 0.1, "every task to get through")
        requests = [e for e in record.all() if e["kind"] == "request" and e["id"] in ids and e != asked]
        during = [e for e in requests if e["t"] < asked["t"] + 3]
        assert not during, f"{len(during)} requests reached the service during its Retry-After"
        assert sorted(Counter(e["id"] for e in done).values()) == [1] * len(ids)  # each once
        assert {e["id"]: e["attempt"] for e in done}[first.id] == 2  # the 429 counted as an attempt
        assert all(e["attempt"] == 1 for e in done if e["id"] != first.id)  # held, not counted
    finally:
        for w in workers:
            w.stop()


def test_an_operator_pauses_a_service_fleet_wide_and_resumes_it(app, env, workdir, record, vhost):
    """``rare-celery pause``: every worker holds the service's attempts (in delay queues, counting
    nothing) until the pause ends; ``resume`` lets the next ones run at once. (That an attempt held
    before a resume looks again within a minute is breaker.verdict's, unit-tested.)"""
    from tests.integration.test_cli import cli

    def held_in_delay_queues() -> int:
        return sum(q["ready"] for name, q in vhost.queue_stats().items() if name.startswith("rare.wait."))

    def requests(ids) -> list[dict]:
        return [e for e in record.all() if e["kind"] == "request" and e["id"] in ids]

    workers = [Worker("tests.apps.breakers", ["breakers.gateway"], env, workdir, name=f"gp{i}").wait_ready()
               for i in range(2)]
    try:
        before = time.time()
        paused = cli("-A", "tests.apps.breakers", "pause", "gateway", "--for", "4s", "--why", "provider maintenance",
                     "--by", "anna")
        assert paused.code == 0 and paused.out.startswith("paused gateway until ") and "provider maintenance" in paused.out
        shown = cli("-A", "tests.apps.breakers", "status", "breakers.gateway").out
        assert re.search(r"gateway +open until .*\(paused: provider maintenance\)", shown), shown
        assert "opened by anna" in shown
        for worker in workers:  # every worker heard it
            wait_for(lambda w=worker: "breaker gateway held open by 'anna': 'paused: provider maintenance'" in w.text(),
                     10, 0.1, "the pause in each worker's log")
        held = {app.gateway.delay(f"p{i}").id for i in range(4)}
        wait_for(lambda: held_in_delay_queues() >= 4, 10, 0.1, "the four attempts held in delay queues")
        done = wait_for(lambda: len(found := [e for e in record.all() if e["kind"] == "done" and e["id"] in held])
                        == len(held) and found, 30, 0.2, "the held attempts to run when the pause ends")
        assert min(e["t"] for e in requests(held)) >= before + 4  # none during the pause
        assert all(e["attempt"] == 1 for e in done)  # a pause counts no attempt

        assert cli("-A", "tests.apps.breakers", "pause", "gateway", "--for", "10m").code == 0
        waiting = app.gateway.delay("waits").id
        wait_for(lambda: held_in_delay_queues() >= 1, 10, 0.1, "an attempt held by the second pause")
        resumed = cli("-A", "tests.apps.breakers", "resume", "gateway", "--by", "bob")
        assert resumed.code == 0 and resumed.out.strip() == "resumed gateway"
        for worker in workers:
            wait_for(lambda w=worker: "breaker gateway closed by 'bob'" in w.text(), 10, 0.1, "the resume heard")
        after = app.gateway.delay("after").id
        wait_for(lambda: [e for e in record.all() if e["kind"] == "done" and e["id"] == after], 10, 0.1,
                 "an attempt after the resume to run at once")
        assert not requests({waiting})  # held until it looks again (within a minute): not lost, not run twice
        assert cli("-A", "tests.apps.breakers", "resume", "gateway").out.strip() == \
            "gateway was not held: nothing to resume"
        refused = cli("-A", "tests.apps.breakers", "pause", "nosuch", "--for", "1m")
        assert refused.code == 2 and "no rare task of the app names the service 'nosuch'" in refused.err
    finally:
        for w in workers:
            w.stop()
