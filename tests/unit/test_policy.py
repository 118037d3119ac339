"""Policy decisions and validation at class definition (no broker)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery

from rare_celery import Bug, RareTask, backoff
from rare_celery.headers import Attempt
from rare_celery.policy import BUG, EXHAUSTED, EXPIRED, GiveUp, Policy, RetryIn


def at(number: int, deadline: float | None = None) -> Attempt:
    return Attempt(number, 0.0, deadline)


def policy(**kw):
    base = {"max_attempts": 4, "backoff": [1, 5, 30], "expires_in": None, "retry_on": (ConnectionError,)}
    return Policy.build("t", **{**base, **kw})


def test_retry_follows_the_schedule_until_the_last_attempt():
    p = policy()
    assert [p.decide(at(n), exc=ConnectionError(), now=0) for n in (1, 2, 3)] == [RetryIn(1), RetryIn(5), RetryIn(30)]
    assert p.decide(at(4), exc=ConnectionError(), now=0) == GiveUp(EXHAUSTED)


def test_bug_and_non_retryable_exceptions_give_up_at_once():
    p = policy()
    assert p.decide(at(1), exc=Bug("x"), now=0) == GiveUp(BUG)
    assert p.decide(at(1), exc=KeyError("x"), now=0) == GiveUp(BUG)


def test_a_retry_that_would_start_after_the_deadline_is_not_scheduled():
    p = policy(max_attempts=None, expires_in=10)
    assert p.decide(at(1, 101.5), exc=ConnectionError(), now=100) == RetryIn(1)
    assert p.decide(at(2, 101.5), exc=ConnectionError(), now=100) == GiveUp(EXPIRED)  # 105 > 101.5


def test_explicit_countdown_and_limit_override_the_policy_once():
    p = policy()
    assert p.decide(at(1), exc=None, now=0, countdown=7.5) == RetryIn(7.5)
    assert p.decide(at(2), exc=None, now=0, max_attempts=2) == GiveUp(EXHAUSTED)
    assert p.decide(at(1), exc=None, now=0, countdown=-3) == RetryIn(0.05)  # never sooner than MIN_DELAY


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


@pytest.mark.parametrize("attrs, match", [
    ({"bug_queue": "q" * 300}, "bug_queue: queue name 'qqqq"),
    ({"bug_queue": ""}, "bug_queue: a queue name must be a non-empty string"),
    ({"max_hops": -1}, "max_hops must be a whole number from 0 to 40"),
    ({"max_hops": 41}, "max_hops"),
    ({"max_hops": True}, "max_hops"),
    ({"dispatch_on": ""}, "dispatch_on must be a payload key"),
    ({"dispatch_on": 3}, "dispatch_on"),
])
def test_routing_options_are_checked_when_the_class_is_defined(attrs, match):
    with pytest.raises(ValueError, match=f"Routed: {match}"):
        type("Routed", (RareTask,), dict(attrs))


def test_valid_routing_options_are_kept():
    cls = type("Routed", (RareTask,), {"bug_queue": "sms.dead", "max_hops": 0, "dispatch_on": "channel"})
    assert (cls.bug_queue, cls.max_hops, cls.dispatch_on) == ("sms.dead", 0, "channel")
