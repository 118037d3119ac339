"""The task events rare_celery sends beside its own, as an event consumer that keeps task state
(Flower, ``celery.events.state.State``) reads them: the row says where a hop went and when a wait ends."""

from __future__ import annotations

import time
from datetime import datetime

from celery.events.state import State

from rare_celery import events


def consumed(*sent: tuple[str, dict]) -> State:
    state = State()
    clock = time.time()
    for i, (kind, fields) in enumerate(sent):
        state.event({"type": kind, "timestamp": clock + i, "local_received": clock + i, "clock": i,
                     "hostname": "w1", **fields})
    return state


def sent_by(kind: str, name: str, **fields) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    events.send(lambda type_, **f: out.append((type_, f)), kind, "id-1", name, **fields)
    return out


def test_a_hop_row_takes_the_targets_name_and_queue_whichever_event_comes_first():
    hop = sent_by(events.HOP, "sms.send", target="email.send", reason="exhausted", queue="email", hops=1)
    assert [k for k, _ in hop] == [events.HOP, events.HOPPED_EVENT]
    started = ("task-started", {"uuid": "id-1", "hostname": "w1"})
    received = ("task-received", {"uuid": "id-1", "name": "sms.send", "hostname": "w1"})
    for order in ([received, started, *hop], [received, started, hop[1]]):
        task = consumed(*order).tasks["id-1"]
        assert (task.state, task.name, task.routing_key) == ("HOPPED", "email.send", "email")
        assert task.exception is None


def test_a_wait_row_shows_when_the_message_comes_back():
    due = time.time() + 30
    wait = sent_by(events.WAIT, "sms.send", due=due, queue="sms", waits=30.0)
    task = consumed(*wait).tasks["id-1"]  # a delayed start: the first the consumer hears of it
    assert (task.state, task.name) == ("WAITING", "sms.send")
    assert abs(datetime.fromisoformat(task.eta).timestamp() - due) < 0.001
    assert datetime.fromisoformat(task.eta).utcoffset().total_seconds() == 0  # UTC, as Celery's own eta
