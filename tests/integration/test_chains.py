"""Queue chains (fallback), explicit hops, delayed start, payload handlers and rare signals,
against the real broker and a real worker (tests/apps/chains.py)."""

from __future__ import annotations

import importlib
import time
from datetime import datetime, timedelta, timezone

import pytest

from rare_celery import HopLimit, NoHandler
from rare_celery.topology import delay_queue
from tests.support import UNTYPED_KIND, Worker, wait_for


@pytest.fixture(scope="module")
def chains(env):
    return importlib.import_module("tests.apps.chains")


@pytest.fixture(scope="module", autouse=True)
def chains_worker(chains, env, workdir):
    worker = Worker("tests.apps.chains", chains.QUEUES, env, workdir, name="chains").wait_ready()
    yield worker
    worker.stop()


def runs(events, task_id, task=None):
    return [e for e in events.of(task_id, "run") if task is None or e["task"] == task]


def signals_of(events, task_id, name):
    """The records of a rare signal, waited for: a signal is sent after its ending is published and its
    result stored, so a test that got the result (or the hop's) may look before the record is written."""
    return wait_for(lambda: events.of(task_id, f"signal.rare_{name}"), 10, what=f"the {name} signal")


def test_sms_failing_for_good_falls_back_to_email(chains, events):
    result = chains.send_sms.delay("+15550100", "hi", ["sms"])
    assert result.get(timeout=15) == "email sent to +15550100"
    assert len(runs(events, result.id, "chains.sms")) == 2
    (email,) = runs(events, result.id, "chains.email")
    assert email["args"] == ["+15550100", "hi", ["sms"]] and email["attempt"] == 1  # fresh attempt count
    assert email["queue"] == "chains.email"
    (hop,) = signals_of(events, result.id, "hopped")
    assert (hop["source"], hop["target"], hop["reason"], hop["queue"]) == (
        "chains.sms", "chains.email", "exhausted", "chains.email")


def test_sms_email_push_all_failing_end_in_the_bug_queue_with_three_hops(chains, events, bugs):
    result = chains.send_sms.delay("+15550101", "hi", ["sms", "email", "push"])
    with pytest.raises(ConnectionError, match="push gateway down"):
        result.get(timeout=20)
    message = bugs.find("chains.push.bugs", result.id)
    assert message.headers["x-rare-reason"] == "exhausted"
    history = message.headers["x-rare-hops"]
    assert [(h["task"], h["queue"], h["reason"], h["attempts"]) for h in history] == [
        ("chains.sms", "chains.sms", "exhausted", 2),
        ("chains.email", "chains.email", "exhausted", 2),
        ("chains.push", "chains.push", "exhausted", 2)]
    assert all(h["started"] <= h["left"] for h in history)
    assert [len(runs(events, result.id, f"chains.{c}")) for c in ("sms", "email", "push")] == [2, 2, 2]


def test_billing_retries_with_capped_backoff_until_its_shelf_life_then_notifies(chains, events):
    published = time.time()
    result = chains.charge.delay("sub-42")
    assert result.get(timeout=15) == "disconnect notice for sub-42"
    charges = runs(events, result.id, "chains.charge")
    gaps = [round(b["t"] - a["t"], 2) for a, b in zip(charges, charges[1:])]
    schedule = [0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4]
    assert all(g >= s for g, s in zip(gaps, schedule)), gaps
    deadline = published + 1.45  # the shelf life counts from the publish
    assert charges[-1]["t"] <= deadline  # nothing ran past the shelf life
    # at 0, .1, .3, .7, 1.1 s on an idle machine (5 charges); each retry that could start in time was
    # scheduled, and the one after the last would have started after the deadline
    assert len(charges) >= 4, gaps
    assert all(c["t"] + schedule[i] <= deadline + 0.05 for i, c in enumerate(charges[:-1])), gaps
    assert charges[-1]["t"] + schedule[len(charges) - 1] > deadline - 0.05, gaps
    (notice,) = runs(events, result.id, "chains.notify_disconnect")
    assert notice["args"] == ["sub-42"]  # the original arguments
    assert signals_of(events, result.id, "expired")
    assert signals_of(events, result.id, "hopped")[0]["reason"] == "expired"


def test_explicit_hop_moves_the_work_now_with_new_arguments(chains, events):
    result = chains.charge.delay("sub-43", card_expired=True)
    wait_for(lambda: result.state in ("HOPPED", "SUCCESS"), 10, what="the hop")
    assert result.get(timeout=10) == "disconnect notice for sub-43"
    assert len(runs(events, result.id, "chains.charge")) == 1
    (notice,) = runs(events, result.id, "chains.notify_disconnect")
    assert notice["args"] == ["sub-43"] and notice["kwargs"] == {}
    (hop,) = signals_of(events, result.id, "hopped")
    assert hop["reason"] == "card expired" and hop["target"] == "chains.notify_disconnect"
    assert not events.of(result.id, "signal.rare_routed_to_bugs")


def test_a_hop_loop_ends_in_the_bug_queue_with_hop_limit(chains, events, bugs):
    result = chains.loop_a.delay(0)
    with pytest.raises(HopLimit, match="hop loop: chains.loop_a -> chains.loop_b -> chains.loop_a"):
        result.get(timeout=10)
    assert [r["task"] for r in runs(events, result.id)] == ["chains.loop_a", "chains.loop_b"]
    message = bugs.find("chains.loop.bugs", result.id)
    assert message.headers["x-rare-reason"] == "hop_limit"
    assert [h["task"] for h in message.headers["x-rare-hops"]] == ["chains.loop_a", "chains.loop_b"]


def test_delayed_start_waits_in_the_broker_never_early(chains, events, vhost):
    published = time.time()
    slow = chains.later.apply_async(("in 90 s",), countdown=90)
    far = chains.later.apply_async(("in 30 days",), countdown=30 * 86400)
    soon = chains.later.apply_async(("soon",), countdown=1.5)
    at = chains.later.apply_async(("at",), eta=datetime.now(timezone.utc) + timedelta(seconds=1.25))

    minute, month = (delay_queue(ms, UNTYPED_KIND).name for ms in (90_000, 30 * 86_400_000))

    def parked():
        stats = vhost.queue_stats()
        return (stats.get(minute, {}).get("ready") == 1 and stats.get(month, {}).get("ready") == 1
                and stats["chains.later"]["unacked"] == 0
                and stats["chains.later"]["ready"] == 0)
    wait_for(parked, 20, 0.2, f"the 90 s start to wait in {minute} with nothing unacked")

    assert soon.get(timeout=10) == "soon"
    assert at.get(timeout=10) == "at"
    (run_soon,) = runs(events, soon.id)
    (run_at,) = runs(events, at.id)
    assert 1.5 <= run_soon["t"] - published < 2.5  # not held behind the 90 s one
    assert 1.25 <= run_at["t"] - published < 2.2
    assert run_soon["attempt"] == 1 and run_at["attempt"] == 1  # a delayed start counts toward nothing
    assert runs(events, slow.id) == [] and runs(events, far.id) == []


def test_short_countdown_of_100_ms(chains, events):
    published = time.time()
    result = chains.later.apply_async(("tenth",), countdown=0.1)
    assert result.get(timeout=10) == "tenth"
    assert runs(events, result.id)[0]["t"] - published >= 0.1


def test_payload_handlers_dispatch_with_their_own_policy(chains, events):
    ok = chains.notify.delay({"kind": "email", "to": "a@example.com", "id": "h1"})
    assert ok.get(timeout=10) == "email to a@example.com"
    flaky = chains.notify.delay({"kind": "sms", "to": "+1555", "id": "h2", "fail": True})
    with pytest.raises(ConnectionError):
        flaky.get(timeout=10)
    tries = events.of("h2", "handler")
    assert len(tries) == 2  # the sms handler's max_attempts, not the task's 4
    assert tries[1]["t"] - tries[0]["t"] >= 0.3  # the sms handler's backoff


@pytest.mark.parametrize("payload", [{"kind": "fax", "to": "x"}, {"to": "no kind"}, ["not", "a", "dict"]])
def test_payload_without_a_handler_goes_to_the_bug_queue_at_once(chains, bugs, payload):
    result = chains.notify.delay(payload)
    with pytest.raises(NoHandler):
        result.get(timeout=10)
    message = bugs.find("chains.notify.bugs", result.id)
    assert message.headers["x-rare-reason"] == "no_handler"
    assert message.headers["x-rare-attempts"] == 1


def test_signals_fire_with_their_documented_arguments(chains, events):
    result = chains.notify.delay({"kind": "sms", "to": "+1556", "id": "s1", "fail": True})
    with pytest.raises(ConnectionError):
        result.get(timeout=10)
    (scheduled,) = signals_of(events, result.id, "retry_scheduled")
    assert scheduled["attempt"] == 1 and scheduled["delay"] == 0.3
    assert "sms down" in scheduled["exception"]
    (routed,) = signals_of(events, result.id, "routed_to_bugs")
    assert (routed["reason"], routed["attempts"], routed["queue"]) == ("exhausted", 2, "chains.notify.bugs")

    expired = chains.charge.delay("sub-44")  # hopped and expired are covered above; expired here
    expired.get(timeout=15)
    (signal,) = signals_of(events, expired.id, "expired")
    assert signal["deadline"] == pytest.approx(signal["t"], abs=2) and signal["attempts"] == 5
