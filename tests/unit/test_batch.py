"""rare_celery.batch: which publishes of a bulk block the broker confirmed (delivery tags, acks, nacks)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

from rare_celery.batch import Bulk


class Channel:
    def __init__(self):
        self.events = defaultdict(set)
        self.connection = None

    def basic_publish(self, message, *args, **kwargs):
        return None

    def answer(self, kind, tag, multiple=False):
        for callback in self.events[kind]:
            callback(tag, multiple)


def published(n, events=()):
    channel = Channel()
    state = Bulk(SimpleNamespace(amqp=SimpleNamespace(Producer=lambda channel: None)), channel)
    for i in range(1, n + 1):
        headers = {} if i in events else {"id": f"t{i}"}
        channel.basic_publish(SimpleNamespace(properties={"application_headers": headers}))
    return state, channel


def test_acks_one_by_one_out_of_order_and_multiple():
    state, channel = published(6)
    channel.answer("basic_ack", 2)
    assert state.answered == 0 and state.unconfirmed() == ["t1", "t3", "t4", "t5", "t6"]
    channel.answer("basic_ack", 1)
    assert state.answered == 2
    channel.answer("basic_ack", 5, multiple=True)
    assert state.answered == 5 and state.unconfirmed() == ["t6"]


def test_nacked_tags_are_unconfirmed_and_still_answered():
    state, channel = published(5)
    channel.answer("basic_ack", 1)
    channel.answer("basic_nack", 3, multiple=True)
    channel.answer("basic_ack", 5, multiple=True)
    assert state.answered == 5
    assert state.unconfirmed() == ["t2", "t3"]


def test_publishes_that_are_not_tasks_take_a_tag_but_are_not_named():
    state, channel = published(3, events={2})  # a task-sent event on the same channel
    channel.answer("basic_nack", 3, multiple=True)
    assert state.unconfirmed() == ["t1", "t3"]
