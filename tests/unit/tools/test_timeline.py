"""rare_celery.tools.timeline: what a policy does, attempt by attempt, without a broker or a clock."""

from __future__ import annotations

import doctest

from rare_celery.policy import EXHAUSTED, EXPIRED, Policy
from rare_celery.tools import timeline as tl


def build(**kw) -> Policy:
    base = {"max_attempts": 4, "backoff": [1, 5, 30], "expires_in": None, "retry_on": (ConnectionError,)}
    return Policy.build("t", **{**base, **kw})


def test_the_module_doctest_holds():
    assert doctest.testmod(tl).failed == 0


def test_a_timeline_ends_when_the_attempts_run_out():
    t = tl.timeline(build())
    assert [(s.attempt, s.at) for s in t.steps] == [(1, 0.0), (2, 1.0), (3, 6.0), (4, 36.0)]
    assert t.end == EXHAUSTED and t.refused_at is None


def test_a_shelf_life_ends_it_before_the_retry_that_would_start_late():
    t = tl.timeline(build(max_attempts=None, expires_in=10))
    assert [s.attempt for s in t.steps] == [1, 2, 3] and t.end == EXPIRED
    assert t.refused_at == 36.0  # attempt 4 would start at 6 + 30, after the shelf life (10 s)


def test_a_delay_starts_in_the_delay_queue_of_its_grid_value():
    assert tl.first_delay_queue(1.25) == 1200
    assert tl.first_delay_queue(0.0004) is None  # under 1 ms: straight back
