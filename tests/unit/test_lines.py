"""A service's line (rare_celery.topology.line_queue, endings.line, limits_io.from_line) and how a
worker wakes it (rare_celery.worker.lines): what is decided, without a broker (the real-broker tests
are in tests/integration/test_limits.py)."""

from __future__ import annotations

import time

import pytest
from celery import Celery
from kombu import Message

from rare_celery import RareTask, endings, events, limits_io
from rare_celery import headers as hdr
from rare_celery.breaker import Settings
from rare_celery.message import Delivery
from rare_celery.topology import (
    DELAY_EXCHANGE,
    LINE_HEAD_PRIORITY,
    RETURN_EXCHANGE,
    free_slots_queue,
    line_queue,
    pause_queue,
)
from rare_celery.worker import lines

app = Celery("lines-unit", broker="memory://", set_as_current=False)


@app.task(base=RareTask, bind=True, name="lines-unit.t", breaker="gw", service_concurrency=2)
def t(self):
    return None


def held(headers: dict | None = None, **properties) -> Delivery:
    message = Message(body=b'[[], {}, {"callbacks": null}]', content_type="application/json",
                      content_encoding="utf-8", headers={"id": "id-1", "task": t.name, "retries": 0, **(headers or {})},
                      properties=properties)
    return Delivery.received(app, t, message, "work")


def test_a_line_is_left_like_a_delay_queue_but_has_no_ttl():
    classic, quorum = line_queue("gw"), line_queue("gw", "quorum")
    assert (classic.name, quorum.name) == ("rare.limit.gw.line", "rare.limit.gw.line.quorum")
    assert classic.exchange.name == DELAY_EXCHANGE.name and classic.routing_key == "amq.rare.limit.gw.line"
    assert classic.queue_arguments == {"x-queue-type": "classic", "x-dead-letter-exchange": RETURN_EXCHANGE.name,
                                       "x-max-priority": 1}  # two priorities: the head for an attempt sent back
    assert quorum.queue_arguments["x-dead-letter-strategy"] == "at-least-once"
    assert "x-max-priority" not in quorum.queue_arguments  # refused by quorum queues (4.x have two priorities)
    assert "x-message-ttl" not in quorum.queue_arguments
    hints = free_slots_queue("gw", 3)
    assert hints.name == "rare.limit.gw.free.3" and hints.queue_arguments["x-max-length"] == 3
    paused = pause_queue("gw")  # a pause's message lives as long as the pause (its expiration); none is lost by TTL
    assert paused.name == "rare.limit.gw.pause" and "x-message-ttl" not in paused.queue_arguments


def test_an_attempt_sent_to_the_line_waits_unrun_until_woken_or_its_shelf_life_ends():
    now = time.time()
    state = hdr.Attempt(2, now - 5, deadline=now + 30, due=now - 1)
    ending = endings.line(held({hdr.ATTEMPT: 2, hdr.ERROR: "boom"}), state, "gw", "concurrency", now=now)
    copy = ending.copy
    assert ending.kind == endings.WAIT and copy.exchange == DELAY_EXCHANGE.name and copy.routing_key == "work"
    assert copy.headers["BCC"] == ["amq.rare.limit.gw.line"] and copy.returns_to == "work"
    assert copy.headers[hdr.ATTEMPT] == 2 and hdr.DUE not in copy.headers  # woken at any time: never early
    assert copy.headers[hdr.ERROR] == "boom"  # the last error stays with it
    assert copy.properties["expiration"] == pytest.approx(30, abs=0.01)  # back (and ended) when its shelf life ends
    assert ending.fields == {"line": "gw", "limit": "concurrency", "breaker": "gw"}
    no_deadline = endings.line(held(), hdr.Attempt(1, now), "gw", "rate", now=now)
    assert "expiration" not in no_deadline.copy.properties
    assert "priority" not in copy.properties  # at the end of the line
    back = endings.line(held({hdr.WOKEN: "rare.limit.gw.line"}), state, "gw", "concurrency", head=True, now=now)
    assert back.copy.properties["priority"] == LINE_HEAD_PRIORITY  # woken, and the slot was taken: the head


def test_the_head_of_the_line_is_only_the_lines_every_later_copy_has_the_messages_own_priority():
    """A line copy sent to the head keeps the message's own priority in ``x-rare-own-priority``; a copy made
    of it (woken and failed: the retry; or expired: the bug queue) has that one again, not the head's."""
    now = time.time()
    state = hdr.Attempt(1, now)
    plain = endings.line(held({hdr.WOKEN: "rare.limit.gw.line"}), state, "gw", "rate", head=True, now=now).copy
    assert plain.properties["priority"] == LINE_HEAD_PRIORITY and plain.headers[hdr.OWN_PRIORITY] == 0
    mine = endings.line(held(priority=3), state, "gw", "rate", head=True, now=now).copy
    assert mine.properties["priority"] == LINE_HEAD_PRIORITY and mine.headers[hdr.OWN_PRIORITY] == 3
    woken = held({hdr.OWN_PRIORITY: 0}, priority=LINE_HEAD_PRIORITY)  # as a woken head copy arrives
    retry = endings.wait(woken, state, now + 5).copy
    assert "priority" not in retry.properties and hdr.OWN_PRIORITY not in retry.headers
    again = endings.line(held({hdr.OWN_PRIORITY: 3}, priority=LINE_HEAD_PRIORITY), state, "gw", "rate", now=now).copy
    assert again.properties["priority"] == 3  # at the end of the line, with its own priority


def test_a_wait_in_a_line_is_a_task_waiting_event_without_an_eta():
    sent = []
    events.send(lambda kind, **f: sent.append((kind, f)), events.WAIT, "id-1", "t", queue="work", line="gw",
                limit="rate")
    assert [kind for kind, _ in sent] == [events.WAIT, events.WAITING_EVENT]
    assert "eta" not in sent[1][1] and sent[1][1]["line"] == "gw"


@pytest.mark.parametrize(("headers", "woken"), [
    ({hdr.WOKEN: "rare.limit.gw.line"}, True),
    ({hdr.WOKEN: "rare.limit.gw.line.quorum"}, True),
    ({hdr.WOKEN: "rare.limit.other.line"}, False),
    ({"x-death": [{"queue": "rare.limit.gw.line"}]}, False),  # dead-lettered at its deadline: not woken
    ({hdr.WOKEN: ["rare.limit.gw.line"]}, False),
    ({}, False),
    (None, False),
])
def test_an_attempt_woken_from_its_line_is_known_by_the_header_its_waker_wrote(headers, woken):
    assert limits_io.from_line(headers, "gw") is woken


class FakeBroker:
    """What Line.look reads, and the wakes it makes."""

    def __init__(self, waiting: int, in_flight: int = 0, hints: int = 0, in_window: int = 0) -> None:
        self.waiting, self.in_flight, self.hints, self.in_window, self.woken = waiting, in_flight, hints, in_window, 0

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(limits_io, "depth", lambda conn, name: self.hints if ".free." in name
                            else self.waiting if name.endswith(".line") else 0)
        monkeypatch.setattr(limits_io, "in_flight", lambda conn, service, slots: self.in_flight)
        monkeypatch.setattr(limits_io, "in_window", lambda conn, service, rate: self.in_window)

        def wake(conn, service, kind, count=1, channel=None):
            n = min(count, self.waiting)
            self.waiting -= n
            self.woken += n
            return n
        monkeypatch.setattr(limits_io, "wake", wake)


def test_a_worker_wakes_the_free_slots_that_no_woken_attempt_is_on_its_way_to(monkeypatch):
    line = lines.Line("gw", Settings(concurrency=3), {"classic"})
    broker = FakeBroker(waiting=10, in_flight=1, hints=1)  # one slot free for an attempt on its way, one lost
    broker.install(monkeypatch)
    assert line.look(None, 100.0) == ("start", 10)
    assert broker.woken == 1
    broker.hints = 2  # both free slots are some woken attempt's: nothing to do
    assert line.look(None, 101.0) is None and broker.woken == 1


def test_a_rate_only_service_wakes_as_many_as_its_window_has_places(monkeypatch):
    line = lines.Line("gw", Settings(rate=(5, 1.0)), {"classic"})
    broker = FakeBroker(waiting=20, in_window=2)
    broker.install(monkeypatch)
    line.look(None, 100.0)
    assert broker.woken == 3


def test_a_service_stops_limiting_once_its_line_has_been_empty_a_while(monkeypatch):
    line = lines.Line("gw", Settings(concurrency=1), {"classic"})
    broker = FakeBroker(waiting=1, in_flight=1)
    broker.install(monkeypatch)
    assert line.look(None, 100.0) == ("start", 1)
    broker.waiting = 0
    assert line.look(None, 101.0) is None
    assert line.look(None, 101.0 + lines.STOP_AFTER - 0.5) is None
    assert line.look(None, 101.0 + lines.STOP_AFTER) == ("stop", 0)
    assert line.look(None, 200.0) is None


def test_a_line_the_broker_cannot_read_changes_nothing(monkeypatch):
    line = lines.Line("gw", Settings(concurrency=1), {"classic"})
    broker = FakeBroker(waiting=3)
    broker.install(monkeypatch)
    assert line.look(None, 100.0) == ("start", 3)
    monkeypatch.setattr(limits_io, "depth", lambda conn, name: None)
    assert line.look(None, 200.0) is None and line.limiting  # not taken for an empty line
