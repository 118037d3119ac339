"""The circuit breaker's decisions (rare_celery.breaker): pure, no broker."""

from __future__ import annotations

import itertools
import re
from datetime import timedelta

import pytest

from rare_celery import RareTask
from rare_celery import breaker as br

S = br.Settings(failures=3, within=10, open_for=30, max_open=100)


def fail(state, at, by="w1", task="t"):
    return br.apply(state, br.count_note(state.name, br.FAILURE, state.gen, at, by, task), S)


def test_failures_in_a_row_within_the_window_open_it_for_open_for():
    state = br.State("deepl")
    for at in (100, 101):
        state, change = fail(state, at)
        assert change is None and state.phase == br.CLOSED
    state, change = fail(state, 102, task="third")
    assert change.kind == br.OPENED and change.note["task"] == "third"
    assert (state.phase, state.gen, state.until, state.open_for) == (br.OPEN, 1, 132, 30)


def test_a_success_or_a_gap_longer_than_the_window_starts_the_count_again():
    state = br.State("deepl")
    state, _ = fail(state, 100)
    state, _ = fail(state, 101)
    state, _ = br.apply(state, br.count_note("deepl", br.SUCCESS, 0, 101.5, "w2", "u"), S)
    state, change = fail(state, 102)
    assert change is None and state.failures == (102,)
    state, _ = fail(state, 103)
    state, change = fail(state, 114)  # 100 and 103 are more than 10 s before 114
    assert change is None and state.failures == (114,)


def test_an_attempt_that_started_before_the_breaker_changed_is_not_counted():
    state = br.State("deepl", br.OPEN, 1, until=200, open_for=30, since=170)
    late, change = br.apply(state, br.count_note("deepl", br.FAILURE, 0, 171, "w1", "t"), S)
    assert late is state and change is None


def test_verdicts_run_wait_until_the_probe_time_then_probe():
    assert br.verdict(None, 0) == (br.RUN, None)
    opened = br.State("deepl", br.OPEN, 1, until=200, open_for=30, since=170)
    assert br.verdict(opened, 199.9) == (br.WAIT, 200)
    assert br.verdict(opened, 200).action == br.PROBE
    probing = br.probing(opened, "w1", "t", 200)
    # held attempts wait for the probe's verdict, at most its lease: one round, not one a second (issue 23, 6)
    assert br.verdict(probing, 200.5) == (br.WAIT, 200 + br.PROBE_LEASE)
    assert br.verdict(probing, 200 + br.PROBE_LEASE).action == br.PROBE  # a silent probe: the lock decides


def test_a_failed_probe_opens_it_twice_as_long_up_to_the_cap_and_a_good_one_closes_it():
    state = br.State("deepl", br.OPEN, 1, until=200, open_for=30, since=170)
    periods = []
    for _ in range(4):
        state = br.after_probe(br.probing(state, "w1", "t", state.until), S, failed=True, now=state.until)
        periods.append((state.gen, state.open_for))
    assert periods == [(2, 60), (3, 100), (4, 100), (5, 100)]
    closed = br.after_probe(br.probing(state, "w1", "t", 600), S, failed=False, now=601)
    assert (closed.phase, closed.gen) == (br.CLOSED, 5)


def test_notes_in_any_order_leave_every_worker_in_the_same_state():
    opened = br.State("deepl", br.OPEN, 1, until=200, open_for=30, since=170)
    probe = br.probing(opened, "w1", "t", 200)
    reopened = br.after_probe(probe, S, failed=True, now=201)
    closed = br.after_probe(br.probing(reopened, "w2", "u", 261), S, failed=False, now=262)
    notes = [s.as_note("w", "x") for s in (opened, probe, reopened, closed)]
    finals = set()
    for order in itertools.permutations(notes):
        state = br.State("deepl")
        for note in order:
            state, _ = br.apply(state, note, S)
        finals.add((state.phase, state.gen))
    assert finals == {(br.CLOSED, 2)}


def test_two_trips_of_the_same_period_agree_on_the_later_probe_time():
    a = br.State("deepl", br.OPEN, 1, until=200, open_for=30, since=170).as_note("w1")
    b = br.State("deepl", br.OPEN, 1, until=200.4, open_for=30, since=170.4).as_note("w2")
    for first, second in ((a, b), (b, a)):
        state, _ = br.apply(br.State("deepl"), first, S)
        state, change = br.apply(state, second, S)
        assert state.until == 200.4 and change is None


def test_a_worker_that_missed_a_close_learns_it_from_a_count_note():
    stale = br.State("deepl", br.OPEN, 1, until=200, open_for=30, since=170)
    state, _ = br.apply(stale, br.count_note("deepl", br.FAILURE, 3, 500, "w2", "t"), S)
    assert (state.phase, state.gen, state.failures) == (br.CLOSED, 3, (500,))


@pytest.mark.parametrize("note, problem", [
    ([], "not a JSON object"),
    ({"breaker": "a.b", "kind": "open", "gen": 1, "at": 1}, "no valid breaker name"),
    ({"breaker": "a", "kind": "explode", "gen": 1, "at": 1}, "unknown kind"),
    ({"breaker": "a", "kind": "failure", "gen": True, "at": 1}, "no valid gen"),
    ({"breaker": "a", "kind": "failure", "gen": 1, "at": float("nan")}, "no valid time"),
    ({"breaker": "a", "kind": "open", "gen": 1, "at": 1}, "an open note without until and open_for"),
    ({"breaker": "a", "kind": "close", "gen": 1, "at": 1, "by": ["x"]}, "no valid by"),
])
def test_anything_on_the_exchange_that_is_not_a_note_is_named_and_ignored(note, problem):
    assert br.note_problem(note).startswith(problem)


def test_settings_are_checked_when_the_class_is_defined():
    class Translate(RareTask):
        name = "unit.breaker.translate"
        breaker = "deepl"
        breaker_open = timedelta(seconds=45)

    assert Translate.rare_breaker == br.Settings(failures=5, within=60, open_for=45, max_open=300)
    assert RareTask.rare_breaker is None

    bad = [({"breaker": "deep l"}, "breaker must be a name"),
           ({"breaker": "deepl", "breaker_failures": 0}, "breaker_failures must be a whole number from 1"),
           ({"breaker": "deepl", "breaker_open": -1}, "breaker_open must be a number of seconds"),
           ({"breaker": "deepl", "breaker_open": 600}, "breaker_max_open (300) is shorter than breaker_open")]
    for attrs, text in bad:
        with pytest.raises(ValueError, match="^" + re.escape(f"unit.breaker.bad: {text}")):
            type("Bad", (RareTask,), {"name": "unit.breaker.bad", **attrs})


# -- issue 24, item 6: notes are validated and read on the receiver's clock ------------------------------

def watch(tmp_path):
    from rare_celery.breaker_io import Board, Watch

    return Watch({"deepl": S}, Board(str(tmp_path / "board.json")))


@pytest.mark.parametrize("bad", ["30", None, [], float("inf"), -1, 10**12])
def test_a_probe_note_with_a_bad_open_for_is_dropped_and_a_failed_probe_still_reopens(tmp_path, caplog, bad):
    import time

    w = watch(tmp_path)
    now = time.time()
    w.hear({"breaker": "deepl", "kind": "open", "gen": 1, "at": now, "until": now + 30, "open_for": 30, "by": "w1"})
    caplog.clear()
    w.hear({"breaker": "deepl", "kind": "probe", "gen": 1, "at": now, "open_for": bad, "by": "w2", "task": "t"})
    if bad is not None:
        assert w.states["deepl"].phase == br.OPEN
        assert len(caplog.records) == 1 and "ignored a breaker note" in caplog.text
    after = br.after_probe(w.states["deepl"], S, failed=True, now=now)  # what a failed probe announces
    assert after.phase == br.OPEN and after.open_for == 60


def test_a_sender_with_a_fast_clock_does_not_stretch_the_open_period(tmp_path):
    import time

    w = watch(tmp_path)
    ahead = time.time() + 3600  # the sender's clock is an hour ahead
    w.hear({"breaker": "deepl", "kind": "open", "gen": 1, "at": ahead, "until": ahead + 30, "open_for": 30, "by": "w1"})
    state = w.states["deepl"]
    assert state.phase == br.OPEN and abs(state.until - (time.time() + 30)) < 2
    assert br.verdict(state, time.time() + 31).action == br.PROBE
    # and a failure note from the future counts now: the window is this worker's
    w.hear({"breaker": "deepl", "kind": "close", "gen": 1, "at": ahead, "by": "w1"})
    w.hear(br.count_note("deepl", br.FAILURE, 1, ahead + 100, "w1", "t"))
    assert abs(w.states["deepl"].failures[-1] - time.time()) < 2


# -- issue 24, item 7: the board is at a private path nobody can take first ------------------------------

def test_the_board_is_in_a_private_directory_and_a_squatted_old_path_does_not_stop_it(tmp_path, monkeypatch):
    import os
    import stat
    import tempfile

    from rare_celery.breaker_io import Board

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    os.mkdir(tmp_path / f"rare-celery-breakers-{os.getpid()}.json")  # another user got there first
    board = Board.for_this_worker()
    board.write({"deepl": br.State("deepl", br.OPEN, 1, until=1.0, open_for=30.0)})
    assert board.read()["deepl"].phase == br.OPEN
    directory = os.path.dirname(board.path)
    assert directory != str(tmp_path) and stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert Board.for_this_worker().path != board.path
    board.remove()
    assert not os.path.exists(directory)


# -- held open on purpose: an operator's pause, a service's Retry-After ---------------------------

def test_a_pause_is_a_new_open_period_every_worker_holds_and_a_resume_closes_it():
    state, _ = fail(br.State("deepl"), 100)  # closed, one failure counted
    held = br.paused(state, 600, "paused: provider maintenance", now=200)
    assert (held.phase, held.gen, held.until, held.open_for, held.why) == (br.OPEN, 1, 800, 600,
                                                                           "paused: provider maintenance")
    note = held.as_note("anna@ops")
    assert br.note_problem(note) is None and note["why"] == "paused: provider maintenance"
    elsewhere, change = br.apply(br.State("deepl"), br.localize(note, 300), S)  # heard by another worker
    assert change.kind == br.OPENED and elsewhere.why == held.why and elsewhere.until == 900
    assert br.verdict(elsewhere, 310) == (br.WAIT, 310 + br.HELD_STEP)  # looks again within a minute
    assert br.verdict(elsewhere, 880) == (br.WAIT, 900) and br.verdict(elsewhere, 900).action == br.RUN  # no probe
    after, change = fail(elsewhere, 901)  # from its end on it counts failures again, as a closed one
    assert change is None and (after.phase, after.gen, after.failures) == (br.CLOSED, 1, (901,))
    closed, change = br.apply(elsewhere, br.localize(br.resumed(held, 400).as_note("bob@ops"), 400), S)
    assert change.kind == br.CLOSE and closed.phase == br.CLOSED and br.verdict(closed, 401).action == br.RUN


def test_a_trip_keeps_its_wait_until_the_probe_time_and_two_holds_agree_on_the_later_end():
    tripped = br.State("deepl", br.OPEN, 3, until=1000, open_for=900, since=100)
    assert br.verdict(tripped, 110) == (br.WAIT, 1000)  # no why: one round to the probe time
    a = br.paused(tripped, 30, "Retry-After 30 s (t)", now=120)
    b = br.paused(tripped, 60, "Retry-After 60 s (t)", now=121)
    for first, second in ((a, b), (b, a)):
        state, _ = br.apply(tripped, first.as_note("w1"), S)
        state, _ = br.apply(state, second.as_note("w2"), S)
        assert (state.gen, state.until, state.why) == (4, 181, "Retry-After 60 s (t)")


@pytest.mark.parametrize("why", [7, "x" * (br.MAX_TEXT + 1)])
def test_a_note_with_a_bad_why_is_dropped(why):
    note = br.paused(br.State("deepl"), 10, "ok", now=100).as_note("w1")
    assert br.note_problem({**note, "why": why}) == "no valid why"


# -- a service's limits: settings (the broker side is tests/integration/test_limits.py) -------------

@pytest.mark.parametrize(("text", "parsed"), [("30/s", (30, 1.0)), ("1000/h", (1000, 3600.0)), (" 5 / 10s ", (5, 10.0)),
                                              ("2/m", (2, 60.0)), ("100000/d", (100_000, 86_400.0))])
def test_a_rate_is_attempts_in_a_window(text, parsed):
    assert br.parse_rate(text) == parsed


@pytest.mark.parametrize("bad", ["30", "0/s", "30/w", "30/2d", "100001/s", "-1/s", 30, "1.5/s"])
def test_a_bad_rate_or_concurrency_is_refused_when_the_class_is_defined(bad):
    with pytest.raises(ValueError, match="service_rate"):
        class Bad(RareTask):
            name = "u.bad"
            breaker = "deepl"
            service_rate = bad
    for concurrency in (0, 101, True, 2.5):
        with pytest.raises(ValueError, match="service_concurrency must be a whole number"):
            class AlsoBad(RareTask):
                name = "u.alsobad"
                breaker = "deepl"
                service_concurrency = concurrency
    with pytest.raises(ValueError, match="name it with breaker"):
        class Unnamed(RareTask):
            name = "u.unnamed"
            service_rate = "10/s"


def test_the_window_queue_refuses_one_past_the_limit_and_keeps_each_place_a_little_over_the_window():
    from rare_celery.topology import rate_window_queue

    q = rate_window_queue("deepl", 50, 1.0)
    assert q.name == "rare.limit.deepl.rate.50-per-1s" and q.durable
    assert q.queue_arguments == {"x-queue-type": "classic", "x-max-length": 50, "x-overflow": "reject-publish",
                                 "x-message-ttl": 1060}
    assert rate_window_queue("deepl", 1000, 3600.0).name == "rare.limit.deepl.rate.1000-per-1h"
