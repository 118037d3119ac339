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
