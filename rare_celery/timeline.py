"""A task's retry timeline, computed from its policy alone (no broker, no clock).

Attempt 1 runs at 0; each failed attempt is followed by the policy's decision, exactly as the worker
takes it (:meth:`rare_celery.policy.Policy.decide`), assuming every run takes no time.

>>> from rare_celery.policy import Policy
>>> t = timeline(Policy.build("t", 3, [1, 5], None, Exception))
>>> [(s.attempt, s.at, s.delay_ms) for s in t.steps], t.end
([(1, 0.0, None), (2, 1.0, 1000), (3, 6.0, 5000)], 'exhausted')
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import EXHAUSTED, EXPIRED, GiveUp, Policy
from .topology import MAX_DELAY_MS, grid_floor

MAX_STEPS = 100_000  # a timeline longer than this is reported as "at least" that long
UNBOUNDED = "unbounded"


@dataclass(frozen=True)
class Step:
    """One attempt: when it starts after the first, after which wait, via which delay queue."""

    attempt: int
    at: float
    wait: float = 0.0
    delay_ms: int | None = None  # grid value of the delay queue the wait starts in; None: none


@dataclass(frozen=True)
class Timeline:
    steps: tuple[Step, ...]
    end: str  # EXHAUSTED, EXPIRED, or UNBOUNDED when MAX_STEPS attempts did not reach an end
    refused_at: float | None  # EXPIRED: when the retry that was not scheduled would have started
    shelf_life: float | None
    random: bool  # the backoff has jitter: the waits shown are one sample


def first_hop(delay: float) -> int | None:
    """The grid value of the delay queue a wait of ``delay`` seconds starts in (see publish.send_delayed)."""
    ms = min(int(delay * 1000), MAX_DELAY_MS)
    return grid_floor(ms) if ms >= 1 else None


def timeline(policy: Policy) -> Timeline:
    """Every attempt of ``policy`` until it gives up (at most :data:`MAX_STEPS`)."""
    steps, at = [Step(1, 0.0)], 0.0
    while len(steps) < MAX_STEPS:
        attempt = steps[-1].attempt
        decision = policy.decide(attempt, None, at, policy.expires_in)
        if isinstance(decision, GiveUp):
            refused = at + policy.backoff(attempt) if decision.reason == EXPIRED else None
            return Timeline(tuple(steps), decision.reason, refused, policy.expires_in, is_random(policy))
        at += decision.delay
        steps.append(Step(attempt + 1, at, decision.delay, first_hop(decision.delay)))
    return Timeline(tuple(steps), UNBOUNDED, None, policy.expires_in, is_random(policy))


def is_random(policy: Policy, sample: int = 30) -> bool:
    """Whether the backoff gives other waits when asked twice (jitter)."""
    return policy.backoff.delays(sample) != policy.backoff.delays(sample)


def delay_values(policy: Policy) -> set[int]:
    """Grid values (ms) of the delay queues the policy's retries start in; empty for a random backoff."""
    if is_random(policy):
        return set()
    return {s.delay_ms for s in timeline(policy).steps if s.delay_ms is not None}


def grid_values() -> list[int]:
    """Every grid value (ms) a delay queue can have: 1..99 ms, then two significant digits up to 10 years."""
    values = list(range(1, 100))
    for power in range(1, 11):
        values += [m * 10**power for m in range(10, 100) if m * 10**power <= MAX_DELAY_MS]
    return values


__all__ = ["EXHAUSTED", "EXPIRED", "UNBOUNDED", "Step", "Timeline", "delay_values", "first_hop", "grid_values", "timeline"]
