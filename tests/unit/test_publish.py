"""rare_celery.publish.shielded: a soft time limit never interrupts an ending half-way."""

from __future__ import annotations

import os
import signal

from rare_celery.publish import shielded


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
