"""Durations and times as rare_celery takes them from users and messages: one validator, one parser."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

MAX_DELAY = 315_360_000.0  # seconds: RabbitMQ's largest TTL (10 years), the longest wait anything can ask for
EPOCH_MAX = 32_503_680_000.0  # year 3000: a time later than this is nonsense


def seconds(name: str, value: object, *, positive: bool = True, at_most: float = MAX_DELAY,
            limit_text: str = "10 years") -> float:
    """``value`` (a number of seconds or a ``timedelta``) as float seconds, or ``ValueError`` naming
    ``name`` and saying what it must be."""
    if isinstance(value, timedelta):
        secs = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            secs = float(value)
        except OverflowError:  # an int too large for a float
            secs = math.inf
    else:
        raise ValueError(f"{name} must be a number of seconds or a timedelta, got {value!r:.80}")  # noqa: TRY004
    if math.isnan(secs) or (math.isinf(secs) and isinstance(value, float)):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r:.80}")
    if secs < 0 or (positive and secs == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number of seconds, "
                         f"got {value!r:.80}")
    if secs > at_most:
        raise ValueError(f"{name} must be at most {limit_text} ({at_most:.0f} s), got {value!r:.80}")
    return secs


def epoch(when: object, now: float) -> float:
    """A Celery ``eta``/``expires`` (seconds from ``now``, a datetime, or an ISO 8601 string; naive
    means UTC) as seconds since the epoch. ``ValueError``/``TypeError`` for anything else."""
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return now + when
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if not isinstance(when, datetime):
        raise TypeError(f"not a time: {when!r:.80}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def iso(at: float) -> str:
    """Seconds since the epoch as an ISO 8601 UTC time, to the second."""
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")
