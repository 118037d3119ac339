"""RetryAfter: what a service's Retry-After makes of an attempt (rare_celery.exceptions, policy)."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import format_datetime

import pytest

from rare_celery import RetryAfter
from rare_celery.exceptions import MAX_PAUSE, retry_after_seconds
from rare_celery.headers import Attempt
from rare_celery.policy import GiveUp, Policy, RetryIn


class Response:  # what requests and httpx give: .status_code, .headers (a case-insensitive mapping)
    def __init__(self, status: int, headers: dict) -> None:
        self.status_code, self.headers = status, headers


def test_the_header_in_seconds_or_as_an_http_date():
    now = 1_800_000_000.0
    assert retry_after_seconds("120", now) == 120.0 and retry_after_seconds(" 5 ", now) == 5.0
    date = format_datetime(datetime.fromtimestamp(now + 90, timezone.utc), usegmt=True)
    assert retry_after_seconds(date, now) == pytest.approx(90)
    past = format_datetime(datetime.fromtimestamp(now - 90, timezone.utc), usegmt=True)
    assert retry_after_seconds(past, now) == 0.0
    assert retry_after_seconds(str(10**12), now) == MAX_PAUSE
    for junk in (None, "", "soon", "-5", "1.5e3", b"\xff", [], True):
        assert retry_after_seconds(junk, now) is None


def test_of_a_response_reads_the_header_or_takes_the_default():
    ra = RetryAfter.of(Response(429, {"retry-after": "30"}))
    assert ra.seconds == 30.0 and str(ra) == "HTTP 429: Retry-After: 30 (a pause of 30 s)"
    assert RetryAfter.of(Response(503, {"Retry-After": "tomorrow"}), default=45).seconds == 45.0
    assert RetryAfter.of({}, default=7).seconds == 7.0
    with pytest.raises(ValueError, match="seconds must be a number"):
        RetryAfter(-1)
    with pytest.raises(ValueError, match="seconds must be a number"):
        RetryAfter(float("nan"))


def test_the_next_attempt_waits_what_the_service_said_whatever_backoff_and_retry_on_say():
    policy = Policy.build("t", max_attempts=3, backoff=[1], expires_in=None, retry_on=(KeyError,))
    assert policy.decide(Attempt(1, 100.0), exc=RetryAfter(40), now=100.0) == RetryIn(40.0)
    assert policy.decide(Attempt(1, 100.0), exc=RetryAfter(40), now=100.0, countdown=5) == RetryIn(5.0)
    assert policy.decide(Attempt(3, 100.0), exc=RetryAfter(40), now=100.0) == GiveUp("exhausted")
    short = Policy.build("t", max_attempts=3, backoff=[1], expires_in=30, retry_on=(KeyError,))
    state = Attempt(1, 100.0, deadline=130.0)
    assert short.decide(state, exc=RetryAfter(40), now=100.0) == GiveUp("expired")  # past the shelf life
