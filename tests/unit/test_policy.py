"""Policy decisions and validation at class definition (no broker)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery

from rare_celery import Bug, RareTask, backoff
from rare_celery.policy import BUG, EXHAUSTED, EXPIRED, GiveUp, Policy, RetryIn


def policy(**kw):
    base = {"max_attempts": 4, "backoff": [1, 5, 30], "expires_in": None, "retry_on": (ConnectionError,)}
    return Policy.build("t", **{**base, **kw})


def test_retry_follows_the_schedule_until_the_last_attempt():
    p = policy()
    assert [p.decide(n, ConnectionError(), 0, None) for n in (1, 2, 3)] == [RetryIn(1), RetryIn(5), RetryIn(30)]
    assert p.decide(4, ConnectionError(), 0, None) == GiveUp(EXHAUSTED)


def test_bug_and_non_retryable_exceptions_give_up_at_once():
    p = policy()
    assert p.decide(1, Bug("x"), 0, None) == GiveUp(BUG)
    assert p.decide(1, KeyError("x"), 0, None) == GiveUp(BUG)


def test_a_retry_that_would_start_after_the_deadline_is_not_scheduled():
    p = policy(max_attempts=None, expires_in=10)
    assert p.decide(1, ConnectionError(), now=100, deadline=101.5) == RetryIn(1)
    assert p.decide(2, ConnectionError(), now=100, deadline=101.5) == GiveUp(EXPIRED)  # 105 > 101.5


def test_explicit_countdown_and_limit_override_the_policy_once():
    p = policy()
    assert p.decide(1, None, 0, None, countdown=7.5) == RetryIn(7.5)
    assert p.decide(2, None, 0, None, max_attempts=2) == GiveUp(EXHAUSTED)
    assert p.decide(1, None, 0, None, countdown=-3) == RetryIn(0.05)  # never sooner than MIN_DELAY


def test_deadline_counts_from_the_first_publish():
    assert policy(expires_in=timedelta(minutes=30)).deadline(1000.0) == 2800.0
    assert policy().deadline(1000.0) is None


@pytest.mark.parametrize("kw, match", [
    ({"max_attempts": 0}, "max_attempts"),
    ({"max_attempts": 2.5}, "max_attempts"),
    ({"max_attempts": True}, "max_attempts"),
    ({"max_attempts": None}, "expires_in"),
    ({"expires_in": -1}, "expires_in"),
    ({"expires_in": "soon"}, "expires_in"),
    ({"expires_in": timedelta(days=3651 * 3)}, "expires_in"),
    ({"backoff": "fast"}, "backoff"),
    ({"backoff": [1, -1]}, "delays"),
    ({"retry_on": "ConnectionError"}, "retry_on"),
    ({"retry_on": ()}, "retry_on"),
])
def test_invalid_policies_are_refused_with_the_parameter_named(kw, match):
    with pytest.raises(ValueError, match=match):
        policy(**kw)


def test_a_task_class_with_a_bad_policy_fails_when_defined():
    with pytest.raises(ValueError, match=r"SendSms: max_attempts"):
        class SendSms(RareTask):
            max_attempts = 0

    with pytest.raises(ValueError, match=r"cap must be"):
        class Capped(RareTask):
            backoff = backoff.exponential(1, cap=-5)


def test_the_decorator_form_is_validated_at_registration():
    app = Celery("unit", broker="memory://", set_as_current=False)
    with pytest.raises(ValueError, match="expires_in"):
        @app.task(base=RareTask, max_attempts=None, shared=False)
        def forever():
            pass
        assert forever.name  # the app registers tasks lazily: force it

    @app.task(base=RareTask, max_attempts=5, backoff=[1, 5, 30], shared=False)
    def fine():
        pass
    assert fine.rare_policy.backoff.delays(4) == [1, 5, 30, 30]
    assert fine.acks_late and fine.reject_on_worker_lost and fine.serializer == "json"
