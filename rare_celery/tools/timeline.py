"""A task's retry timeline, computed from its policy alone (no broker, no clock).

Attempt 1 runs at 0; each failed attempt is followed by the policy's decision, exactly as the worker
takes it (:meth:`rare_celery.policy.Policy.decide`), assuming every run takes no time. The timeline
ends in the bug queue, or with a hop to the policy's ``fallback`` task.

>>> from rare_celery.policy import Policy
>>> t = timeline(Policy.build("t", max_attempts=3, backoff=[1, 5], expires_in=None, retry_on=Exception))
>>> [(s.attempt, s.at, s.delay_ms) for s in t.steps], t.end
([(1, 0.0, None), (2, 1.0, 1000), (3, 6.0, 5000)], 'exhausted')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from .. import hops
from ..headers import Attempt
from ..policy import MIN_DELAY, Policy, RetryIn
from ..reasons import EXHAUSTED, EXPIRED
from ..topology import MAX_DELAY_MS, delay_queue, grid_floor
from . import durations

if TYPE_CHECKING:
    from ..inventory import RareTaskInfo

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
    fallback: object = None  # the task (name or class) the work hops to at the end; None: the bug queue


def first_delay_queue(delay: float) -> int | None:
    """The grid value of the delay queue a wait of ``delay`` seconds starts in (see publish.to_delay)."""
    ms = min(int(delay * 1000), MAX_DELAY_MS)
    return grid_floor(ms) if ms >= 1 else None


def timeline(policy: Policy) -> Timeline:
    """Every attempt of ``policy`` until it gives up (at most :data:`MAX_STEPS`)."""
    steps, at = [Step(1, 0.0)], 0.0
    while len(steps) < MAX_STEPS:
        attempt = steps[-1].attempt
        decision = policy.decide(Attempt(attempt, 0.0, policy.expires_in), exc=None, now=at)
        if not isinstance(decision, RetryIn):  # GiveUp, or HopTo the fallback
            refused = at + max(MIN_DELAY, policy.backoff(attempt)) if decision.reason == EXPIRED else None
            return Timeline(tuple(steps), decision.reason, refused, policy.expires_in, is_random(policy),
                            getattr(decision, "target", None))
        at += decision.delay
        steps.append(Step(attempt + 1, at, decision.delay, first_delay_queue(decision.delay)))
    return Timeline(tuple(steps), UNBOUNDED, None, policy.expires_in, is_random(policy))


def is_random(policy: Policy, sample: int = 30) -> bool:
    """Whether the backoff gives other waits when asked twice (jitter)."""
    return policy.backoff.delays(sample) != policy.backoff.delays(sample)


def delay_values(policy: Policy) -> set[int]:
    """Grid values (ms) of the delay queues the policy's retries start in; empty for a random backoff."""
    if is_random(policy):
        return set()
    return {s.delay_ms for s in timeline(policy).steps if s.delay_ms is not None}


# -- as text: `rare-celery schedule` ----------------------------------------------------------------

def describe(info: RareTaskInfo, find: Callable[[object], tuple[str, RareTaskInfo | None]], rows: int = 50
             ) -> Iterator[str]:
    """The timeline of a task (one per payload handler) as lines, following its fallback chain.

    ``find(fallback)`` gives the fallback's task name and its :class:`RareTaskInfo` (``None``: not a
    RareTask of the app). Offsets are from the first attempt of the first task; at most ``rows``
    attempts are shown per task.
    """
    for n, (label, policy) in enumerate(info.policies()):
        if n:
            yield ""
        yield from _segment(info, label, policy, find, rows, [info.name], 0.0)


def _segment(info: RareTaskInfo, label: str, policy: Policy, find: Callable[[object], tuple[str, RareTaskInfo | None]],
             rows: int, chain: list[str], start: float) -> Iterator[str]:
    t = timeline(policy)
    life = "none" if policy.expires_in is None else durations.short(policy.expires_in)
    to = "" if policy.fallback is None else f", fallback {find(policy.fallback)[0]}"
    yield f"{label}: backoff {policy.backoff!r}, max_attempts={policy.max_attempts}, shelf life {life}{to}"
    yield f"work queue {info.queue} ({info.kind}), bug queue {info.bug_queue}"
    if t.random:
        yield "the backoff is random (jitter): the times below are one sample"
    yield ""
    width = len(str(t.steps[-1].attempt))
    shown = t.steps if len(t.steps) <= rows else (*t.steps[: rows - 1], None, t.steps[-1])
    for s in shown:
        if s is None:
            hidden = len(t.steps) - rows  # >= 1
            yield f"  ... {hidden} more attempt{'s' if hidden > 1 else ''} ..."
        else:
            yield _step_line(s, width, info.kind, start)
    last = t.steps[-1].attempt
    if t.shelf_life is not None:
        yield f"  shelf life ends at {durations.offset(start + t.shelf_life)}"
    where = f"the message goes to {info.bug_queue}"
    if t.fallback is not None:
        name, target = find(t.fallback)
        where = f"the work hops to {name}"
    if t.end == EXPIRED:
        yield (f"then: attempt {last + 1} would start at {durations.offset(start + cast(float, t.refused_at))}, "
               f"after the shelf life, so when attempt {last} fails {where} (reason: expired)")
    elif t.end == EXHAUSTED:
        yield f"then: attempt {last} is the last; when it fails {where} (reason: exhausted)"
    else:
        yield f"then: more than {MAX_STEPS} attempts (not computed further)"
    kinds = ", ".join(k.__name__ for k in policy.retry_on)
    yield (f"at any attempt: a Bug, or an exception that is not retried (retry_on: {kinds}), goes to "
           f"{info.bug_queue} at once (reason: bug)")
    if t.fallback is None or t.end not in (EXHAUSTED, EXPIRED):
        return
    refused = hops.refusal([{"task": t} for t in chain], name, info.max_hops)
    if refused:
        yield f"  that hop is refused ({refused}): the message goes to {info.bug_queue} (reason: hop_limit)"
        return
    if target is None:
        yield f"  {name} is not a RareTask of this app: the timeline ends here"
        return
    at = start + t.steps[-1].at
    for next_label, next_policy in target.policies():
        yield ""
        yield f"-- hop {len(chain)}: {next_label} takes over at {durations.offset(at)} (fresh attempts, shelf life)"
        yield from _segment(target, next_label, next_policy, find, rows, [*chain, name], at)


def _step_line(s: Step, width: int, kind: str, start: float) -> str:
    head = f"  attempt {s.attempt:>{width}}  {durations.offset(start + s.at):<14}"
    if s.attempt == 1:
        return f"{head}  first run"
    if s.delay_ms is None:
        via = "straight back"
    else:
        rest = s.wait - s.delay_ms / 1000
        via = f"in {delay_queue(s.delay_ms, kind).name}" + (f", then {durations.short(rest)} more" if rest >= 0.001 else "")
    return f"{head}  {durations.short(s.wait)} after attempt {s.attempt - 1} ({via})"


__all__ = ["EXHAUSTED", "EXPIRED", "UNBOUNDED", "Step", "Timeline", "delay_values", "describe", "first_delay_queue", "timeline"]
