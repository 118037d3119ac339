"""RareTask against the real RabbitMQ and a real prefork worker (tests/apps/core.py)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from celery import chain
from celery.exceptions import NotRegistered
from kombu import Connection

from rare_celery import Bug, Expired
from tests.support import wait_for

pytestmark = pytest.mark.usefixtures("core_worker")


def runs_of(events, task_id):
    return events.of(task_id, "run")


def test_fails_twice_then_succeeds_with_gaps_of_its_schedule(core, events):
    result = core.flaky.apply_async((2,))
    wait_for(lambda: len(events.of(result.id, "task_retry")) == 1, 10, what="the first retry")
    assert result.state == "RETRY"
    assert result.get(timeout=20) == ["ok", 3]
    runs = runs_of(events, result.id)
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    assert [r["retries"] for r in runs] == [0, 1, 2]  # Celery's own counter follows
    gaps = [b["t"] - a["t"] for a, b in zip(runs, runs[1:])]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
    assert gaps[0] < 1.8 and gaps[1] < 2.8, gaps  # came back promptly, too
    retries = events.of(result.id, "task_retry")
    assert [r["reason"] for r in retries] == ["ConnectionError('gateway down (run 1)')",
                                              "ConnectionError('gateway down (run 2)')"]
    # the einfo Celery's task_retry passes: the failed attempt's traceback, the task's own line in it
    assert 'raise ConnectionError(f"gateway down (run {n})")' in retries[0]["traceback"], retries[0]
    assert retries[0]["traceback"].endswith("ConnectionError: gateway down (run 1)\n"), retries[0]
    handled = events.of(result.id, "on_retry")  # the task's own on_retry handler, as with Celery
    assert [(h["exc"], h["args"]) for h in handled] == [("ConnectionError('gateway down (run 1)')", [2]),
                                                      ("ConnectionError('gateway down (run 2)')", [2])]
    assert handled[0]["traceback"] == retries[0]["traceback"]
    assert result.state == "SUCCESS"


def test_waiting_retry_is_held_by_the_broker_not_the_worker(core, events, vhost):
    """A retry due in 60 s sits in rare.wait.1m; the worker holds nothing, and a 1 s retry
    published after it is not held behind it."""
    slow = core.slow.apply_async(queue="core.wait")
    wait_for(lambda: events.of(slow.id, "task_retry"), 10, what="the slow task's retry")
    fast = core.flaky.apply_async((1,), queue="core.wait")

    def parked():
        stats = vhost.queue_stats()
        wait_queue, delayed = stats.get("core.wait", {}), stats.get("rare.wait.1m", {})
        return wait_queue.get("unacked") == 0 and delayed.get("ready") == 1 and stats
    stats = wait_for(parked, 20, 0.2, "the slow retry to be parked in rare.wait.1m with nothing unacked")
    assert stats["core.wait"]["ready"] == 0

    assert fast.get(timeout=10) == ["ok", 2]
    first, second = runs_of(events, fast.id)
    assert 1.0 <= second["t"] - first["t"] < 1.8
    assert second["queue"] == "core.wait"  # came back to the queue it was sent to
    assert len(runs_of(events, slow.id)) == 1


def test_always_fails_ends_in_the_bug_queue_with_its_story(core, events, bugs):
    published = time.time()
    result = core.always.delay()
    with pytest.raises(ConnectionError, match="gateway down for good"):
        result.get(timeout=15)
    assert result.state == "FAILURE"
    assert len(runs_of(events, result.id)) == 3
    assert len(events.of(result.id, "task_failure")) == 1

    message = bugs.find("core.bugs", result.id)
    h = message.headers
    assert h["x-rare-reason"] == "exhausted"
    assert h["x-rare-attempts"] == 3
    assert h["x-rare-exception"] == "builtins.ConnectionError"
    assert h["x-rare-error"] == "gateway down for good"
    assert "raise ConnectionError" in h["x-rare-traceback"]
    assert h["x-rare-task"] == "core.always" and h["x-rare-queue"] == "core"
    assert published <= h["x-rare-first-at"] <= h["x-rare-failed-at"] <= time.time()
    assert h["id"] == result.id and h["task"] == "core.always"
    assert not any(k.startswith(("x-death", "x-first-death")) for k in h)
    assert message.properties["correlation_id"] == result.id
    assert json.loads(message.body)[0] == []


def test_an_argsrepr_the_caller_chose_stays_through_retries_and_the_bug_queue(core, bugs):
    """Celery shows argsrepr (Flower, inspect, logs) instead of the arguments: a caller hides a card
    number there. The retry copies and the bug-queue copy keep what the caller chose."""
    result = core.always.apply_async(argsrepr="(<card>,)", kwargsrepr="{<hidden>}")
    with pytest.raises(ConnectionError):
        result.get(timeout=15)
    h = bugs.find("core.bugs", result.id).headers
    assert (h["argsrepr"], h["kwargsrepr"]) == ("(<card>,)", "{<hidden>}")
    assert h["x-rare-attempts"] == 3  # through two retries


def test_shelf_life_stops_retries_at_the_deadline(core, events, bugs):
    result = core.shelf.delay()
    with pytest.raises(TimeoutError):
        result.get(timeout=15)
    runs = runs_of(events, result.id)
    assert len(runs) == 3  # at 0, 1 and 2 s; a 4th at 3 s would start after the 2.5 s shelf life
    message = bugs.find("core.bugs", result.id)
    assert message.headers["x-rare-reason"] == "expired"
    assert message.headers["x-rare-deadline"] == pytest.approx(message.headers["x-rare-first-at"] + 2.5)
    assert message.headers["x-rare-failed-at"] < message.headers["x-rare-deadline"]


def test_message_arriving_after_its_deadline_is_not_run(core, events, bugs):
    result = core.flaky.apply_async((0,), expires=-1)  # Celery's expires becomes the deadline
    with pytest.raises(Expired):
        result.get(timeout=10)
    assert runs_of(events, result.id) == []
    assert bugs.find("core.bugs", result.id).headers["x-rare-reason"] == "expired"


@pytest.mark.parametrize("task, error", [("buggy", Bug), ("picky", KeyError)])
def test_bug_and_non_retryable_errors_go_to_the_bug_queue_after_one_run(core, events, bugs, task, error):
    result = getattr(core, task).apply_async(("+1555",) if task == "buggy" else ())
    with pytest.raises(error):
        result.get(timeout=10)
    assert len(runs_of(events, result.id)) == 1
    message = bugs.find("core.bugs", result.id)
    assert message.headers["x-rare-reason"] == "bug"
    assert message.headers["x-rare-attempts"] == 1


def test_wrong_arguments_are_a_bug_not_a_retry(core, events, bugs):
    result = core.app.send_task("core.typed", args=[1], queue="core")  # Celery's own check bypassed
    with pytest.raises(TypeError, match="wrong arguments for core.typed"):  # what Celery users catch
        result.get(timeout=10)
    headers = bugs.find("core.bugs", result.id).headers
    assert headers["x-rare-reason"] == "bug" and headers["x-rare-exception"] == "builtins.TypeError"
    assert headers["x-rare-error"].startswith("wrong arguments for core.typed: ")
    assert len(runs_of(events, result.id)) == 1


def test_autoretry_for_goes_through_the_delay_queues(core, events):
    result = core.auto.delay()
    assert result.get(timeout=15) == "auto ok"
    assert [r["attempt"] for r in runs_of(events, result.id)] == [1, 2, 3]


def test_explicit_countdown_off_the_grid_is_never_early(core, events):
    result = core.countdown.delay(1.234)  # waits 1.2 s in rare.wait.1200ms, then 34 ms more
    assert result.get(timeout=15) == "done"
    first, second = runs_of(events, result.id)
    assert second["t"] - first["t"] >= 1.234
    assert second["t"] - first["t"] < 1.8


def test_canvas_chain_through_a_retrying_rare_task(core, events):
    result = chain(core.step_a.s(1), core.step_b.s(), core.step_c.s()).apply_async()
    assert result.get(timeout=20) == 120
    b, a = result.parent, result.parent.parent
    assert len(runs_of(events, a.id)) == 1
    assert len(runs_of(events, b.id)) == 3
    assert len(runs_of(events, result.id)) == 1


def test_unregistered_task_on_a_rare_queue_lands_in_the_bug_queue(core, bugs):
    result = core.app.send_task("core.nope", args=[1], queue="core")
    with pytest.raises(NotRegistered):
        result.get(timeout=10)
    message = bugs.find("core.bugs", result.id)
    assert message.headers["x-rare-reason"] == "unregistered"
    assert message.headers["x-rare-task"] == "core.nope"
    assert json.loads(message.body)[0] == [1]


def _publish_raw(url, body, content_type, headers):
    with Connection(url) as conn:
        conn.Producer().publish(body, exchange="", routing_key="core", content_type=content_type,
                                content_encoding="utf-8" if content_type != "application/x-python-serialize"
                                else "binary", headers=headers, delivery_mode=2)


@pytest.mark.parametrize("body, content_type, headers, reason", [
    (b'[[1, 2], {}, {"callbacks": nul', "application/json", "celery", "rejected"),
    (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94.", "application/x-python-serialize", "celery", "rejected"),
    (b'{"hello": "from another producer"}', "application/json", None, "rejected"),
])
def test_bad_input_on_a_rare_queue_is_kept_in_the_bug_queue(core, vhost, bugs, body, content_type, headers, reason):
    task_id = str(uuid.uuid4())
    if headers == "celery":
        headers = {"task": "core.typed", "id": task_id, "lang": "py", "root_id": task_id}
    _publish_raw(vhost.url, body, content_type, headers)
    key = task_id if headers else ""
    message = bugs.find("core.bugs", key)
    assert message.headers["x-rare-reason"] == reason
    raw = message.body if isinstance(message.body, bytes) else message.body.encode()
    assert raw == body  # kept byte for byte for whoever fixes it
    assert message.properties["content_type"] == content_type
    assert message.headers["x-rare-error"]


def test_nonsense_rare_headers_are_rejected_not_run(core, events, bugs):
    result = core.flaky.apply_async((0,), headers={"x-rare-attempt": -5})
    with pytest.raises(ValueError, match="x-rare-attempt"):
        result.get(timeout=10)
    assert runs_of(events, result.id) == []
    assert bugs.find("core.bugs", result.id).headers["x-rare-reason"] == "rejected"


def test_a_killed_pool_process_loses_nothing_the_task_runs_again(core, events):
    result = core.poison.delay(1)
    assert result.get(timeout=20) == "survived"
    assert [r["attempt"] for r in runs_of(events, result.id)] == [1, 2]


def test_a_poison_message_ends_in_the_bug_queue_as_worker_lost(core, events, bugs):
    result = core.poison.delay(99)
    message = bugs.find("core.bugs", result.id, timeout=30)
    assert message.headers["x-rare-reason"] == "worker_lost"
    assert message.headers["x-rare-attempts"] == 3
    assert message.headers["x-rare-exception"] == "rare_celery.exceptions.WorkerLost"
    assert len(runs_of(events, result.id)) == 3  # each attempt ran once, then no more
    with pytest.raises(Exception, match="never acked"):
        result.get(timeout=10)


def test_retries_send_celerys_task_retried_event_for_flower(core, vhost):
    """Dashboards that read Celery events (Flower) see each broker-side retry as a retry."""
    seen = []
    conn = core.app.connection_for_read()
    receiver = core.app.events.Receiver(conn, handlers={"*": seen.append})

    def capture():
        with conn:
            receiver.capture(limit=None, timeout=None, wakeup=False)
    threading.Thread(target=capture, daemon=True).start()

    def listening():
        with core.app.events.default_dispatcher() as dispatcher:
            dispatcher.send("rare-test-ping")
        return any(e["type"] == "rare-test-ping" for e in seen)
    wait_for(listening, 10, 0.2, "the event receiver to listen")
    result = core.flaky.apply_async((1,))
    assert result.get(timeout=15) == ["ok", 2]
    kinds = lambda: [e["type"] for e in seen if e.get("uuid") == result.id]
    wait_for(lambda: "task-succeeded" in kinds(), 10, what="the task's events")
    receiver.should_stop = True
    assert kinds().count("task-retried") == 1
    retried = next(e for e in seen if e.get("uuid") == result.id and e["type"] == "task-retried")
    assert retried["exception"] == "ConnectionError('gateway down (run 1)')"  # what Flower shows
    assert 'raise ConnectionError(f"gateway down (run {n})")' in retried["traceback"], retried
    assert kinds().count("task-received") == 2  # the first run and the retry: same task id
