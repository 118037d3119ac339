"""rare_celery.publish: a soft time limit never interrupts an ending half-way (shielded); a copy for a
delay queue carries the queue's TTL as its expiration, exactly (to_delay)."""

from __future__ import annotations

import os
import signal

from rare_celery.publish import shielded, to_delay
from rare_celery.topology import CLASSIC, QUORUM, grid_values


def test_a_soft_time_limit_inside_a_shield_is_noted_not_raised_and_the_handler_comes_back():
    def soft_limit(signum, frame):
        raise TimeoutError("soft time limit")
    before = signal.signal(signal.SIGUSR1, soft_limit)
    try:
        with shielded() as fired:
            with shielded() as inner:  # nested (retry() inside the failed attempt's shield): the outer one holds
                assert inner is fired
                os.kill(os.getpid(), signal.SIGUSR1)
            assert signal.getsignal(signal.SIGUSR1) is not soft_limit  # still shielded after the inner one
            os.kill(os.getpid(), signal.SIGUSR1)
        assert len(fired) == 2
        assert signal.getsignal(signal.SIGUSR1) is soft_limit
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_delay_copy_carries_its_queues_ttl_as_expiration_to_the_millisecond():
    props = {"content_type": "application/json", "content_encoding": "utf-8"}
    for kind in (CLASSIC, QUORUM):
        for ms in grid_values():
            copy = to_delay("sms", ms / 1000, kind, "{}", {}, props)
            ttl = copy.target.queue_arguments["x-message-ttl"]
            assert ttl == ms
            assert str(int(copy.properties["expiration"] * 1000)) == str(ms)  # what kombu writes on the wire
    assert "expiration" not in props  # the caller's properties are not changed
    assert "expiration" not in to_delay("sms", 0.0001, QUORUM, "{}", {}, props).properties  # straight back: none


class _Channel:
    """What rare_celery.publish.write asks of a channel: the message it prepares and where it is written."""

    def __init__(self) -> None:
        self.written: list = []

    def prepare_message(self, body, priority, content_type, content_encoding, headers, properties):
        return {"body": body, "priority": priority, "content_type": content_type,
                "content_encoding": content_encoding, "headers": headers, **properties}

    def basic_publish(self, message, **where):
        self.written.append((message, where))


def test_write_makes_the_message_kombus_producer_makes():
    """The pipeline's publish (one per retry, in the worker's busiest process) writes what kombu's
    Producer.publish wrote for the same copy: the body encoded (JSON), persistent, mandatory, the
    expiration in whole milliseconds, priority 0 unless the copy has one."""
    from kombu import Producer

    from rare_celery.publish import encoded, write

    copy = to_delay("sms", 5.0, CLASSIC, ((1,), {}, {"chain": None}), {"id": "t1", "x-rare-attempt": 2},
                    {"correlation_id": "t1", "reply_to": "r", "priority": 3})
    mine, kombus = _Channel(), _Channel()
    write(mine, copy)
    Producer(kombus, auto_declare=False).publish(copy.body, exchange=copy.exchange, routing_key=copy.routing_key,
                                                 headers=copy.headers, mandatory=True, delivery_mode=2,
                                                 **copy.properties)
    [(message, where)], [(expected, kombu_where)] = mine.written, kombus.written
    assert message == {**expected, "body": expected["body"].encode()}  # py-amqp encodes kombu's text the same way
    assert message["expiration"] == "5000" and message["delivery_mode"] == 2 and message["priority"] == 3
    assert message["content_type"] == "application/json" and message["body"] == b'[[1], {}, {"chain": null}]'
    assert where == {"exchange": copy.exchange, "routing_key": copy.routing_key, "mandatory": True,
                     "timeout": where["timeout"]}
    assert kombu_where["mandatory"] is True
    # encoded once, in the pool process: the same message; a body already encoded is not encoded again
    once = encoded(copy)
    assert encoded(once) is once
    again = _Channel()
    write(again, once)
    assert again.written[0][0] == message
    without = to_delay("sms", 5.0, CLASSIC, b"raw", {}, {"content_type": "text/plain", "content_encoding": "utf-8"})
    plain = _Channel()
    write(plain, without)
    assert plain.written[0][0]["body"] == b"raw" and plain.written[0][0]["priority"] == 0
