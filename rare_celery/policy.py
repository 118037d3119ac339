"""What happens next to a task whose attempt failed: pure decisions, no broker.

A :class:`Policy` is built (and validated) when a RareTask class is defined; :meth:`Policy.decide`
turns (attempt state, exception, clock) into a :class:`RetryIn` or a :class:`GiveUp`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import backoff as _backoff
from . import durations
from .exceptions import Bug, RetryAfter
from .headers import Attempt
from .reasons import BUG, EXHAUSTED, EXPIRED, WORKER_LOST

# The shortest wait before a retry: Celery stores RETRY just after the retry is published, and the
# next attempt must not finish (and store SUCCESS) before that.
MIN_DELAY = 0.05


@dataclass(frozen=True)
class RetryIn:
    """Run again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class GiveUp:
    """Stop: route the message to the bug queue with ``reason``."""

    reason: str


@dataclass(frozen=True)
class HopTo:
    """Stop here: move the work to the fallback task ``target`` (a task name or class) for ``reason``."""

    target: object
    reason: str


def _duration(name: str, value: object) -> float | None:
    return None if value is None else durations.seconds(name, value)


def _retry_on(value: object) -> tuple[type[BaseException], ...]:
    kinds = value if isinstance(value, (tuple, list)) else (value,)
    if not kinds or not all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
        raise ValueError(f"retry_on must be an exception class or a tuple of them, got {value!r}")
    return tuple(kinds)


@dataclass(frozen=True)
class Policy:
    """A task's retry policy: attempt limit, backoff schedule, shelf life, retryable exceptions,
    and the fallback task that takes over when attempts or shelf life run out."""

    max_attempts: int | None
    backoff: _backoff.Backoff
    expires_in: float | None
    retry_on: tuple[type[BaseException], ...]
    fallback: object = None

    @classmethod
    def build(cls, owner: str, *, max_attempts: object, backoff: object, expires_in: object,
              retry_on: object, fallback: object = None) -> Policy:
        """Validate a task's settings; ``ValueError`` names the task and the parameter."""
        try:
            if max_attempts is not None and (
                    not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1):
                raise ValueError(f"max_attempts must be a whole number >= 1 or None, got {max_attempts!r}")
            expires = _duration("expires_in", expires_in)
            if max_attempts is None and expires is None:
                raise ValueError("max_attempts=None needs an expires_in (a shelf life), "
                                 "or the task could retry for ever")
            try:
                schedule = _backoff.as_backoff(backoff)
            except TypeError as exc:
                raise ValueError(f"backoff: {exc}") from None
            if fallback is not None and not isinstance(fallback, str) and not hasattr(fallback, "name"):
                raise ValueError(f"fallback must be a task name or a task (class), got {fallback!r}")
            return cls(max_attempts, schedule, expires, _retry_on(retry_on), fallback)
        except ValueError as exc:
            raise ValueError(f"{owner}: {exc}") from None

    def deadline(self, first_at: float) -> float | None:
        return None if self.expires_in is None else first_at + self.expires_in

    def decide(self, state: Attempt, *, exc: BaseException | None, now: float, countdown: float | None = None,
               max_attempts: int | None = None) -> RetryIn | GiveUp | HopTo:
        """After the failed attempt ``state`` (its ``number``, 1-based, and its ``deadline``): retry, or
        give up and say why.

        ``exc=None`` means the task asked for a retry itself. ``countdown`` overrides the backoff
        schedule, ``max_attempts`` the policy's limit, for this one decision; a :class:`RetryAfter`
        is retried after its ``seconds`` whatever ``retry_on`` says.
        A retry that would start after the deadline is not scheduled (not clamped to it).
        With a ``fallback``, running out of attempts or time hops there instead of giving up.
        """
        if isinstance(exc, Bug):
            return GiveUp(getattr(exc, "rare_reason", BUG))
        if isinstance(exc, RetryAfter):  # the service said when: retried then, whatever retry_on says
            countdown = exc.seconds if countdown is None else countdown
        elif exc is not None and not isinstance(exc, self.retry_on):
            return GiveUp(BUG)
        limit = self.max_attempts if max_attempts is None else max_attempts
        if limit is not None and state.number >= limit:
            return self.out_of(EXHAUSTED)
        delay = max(MIN_DELAY, self.backoff(state.number) if countdown is None else float(countdown))
        if state.deadline is not None and now + delay > state.deadline:
            return self.out_of(EXPIRED)
        return RetryIn(delay)

    def after_loss(self, state: Attempt, *, now: float, reason: str = WORKER_LOST) -> RetryIn | GiveUp | HopTo:
        """The attempt ``state`` started and never finished (the process running it died, or a hard
        time limit ended it): it counts as failed whatever ``retry_on`` says; when it was the last
        one, the message ends with ``reason`` (``worker_lost`` or ``time_limit``)."""
        decision = self.decide(state, exc=None, now=now)
        if not isinstance(decision, RetryIn) and decision.reason == EXHAUSTED:
            return self.out_of(reason)
        return decision

    def out_of(self, reason: str) -> GiveUp | HopTo:
        """Attempts or shelf life ran out: the fallback if there is one, else the bug queue."""
        return GiveUp(reason) if self.fallback is None else HopTo(self.fallback, reason)


EARLY_SLEEP = 0.02  # a message this close to its due time waits in the worker instead of going round again


def slack(rest: float) -> float:
    """How late an early arrival may come back to save a round through one more delay queue: 1% of
    the rest, between 20 ms and 1 s (a 90 s start seen 10 ms after its publish waits in rare.wait.90s
    and runs 10 ms late, instead of 89 s in rare.wait.89s and again 990 ms in rare.wait.990ms)."""
    return min(max(EARLY_SLEEP, rest / 100), 1.0)
