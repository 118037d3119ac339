"""Backoff schedules: how long to wait after failed attempt N before attempt N+1.

Schedules are small state-free objects that compose like tenacity's wait
strategies; ``schedule(1)`` is the delay in seconds before the second attempt.

>>> (fibonacci(5, cap=30) + 1).delays(5)
[6.0, 11.0, 16.0, 26.0, 31.0]
"""

from __future__ import annotations

import copy
import math
import random
from abc import ABC, abstractmethod
from datetime import timedelta
from typing import TYPE_CHECKING

from . import durations

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeAlias, TypeGuard

    Seconds = int | float | timedelta
    Schedule: TypeAlias = "Backoff | Sequence[Seconds] | Seconds"

__all__ = ["MAX_DELAY", "Backoff", "as_backoff", "constant", "exponential"]
__all__ += ["fibonacci", "full_jitter", "jitter", "linear", "logarithmic", "manual"]

#: Longest delay in seconds: 10 years, RabbitMQ's largest TTL (315,360,000,000 ms).
MAX_DELAY = durations.MAX_DELAY


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(where: str, name: str, value: object, positive: bool = False) -> float:
    """Validate one duration parameter and return it as float seconds."""
    return durations.seconds(f"backoff.{where}: {name}", value, positive=positive)


def _fmt(secs: float) -> str:
    return str(int(secs)) if secs.is_integer() else repr(secs)


class Backoff(ABC):
    """A schedule: ``schedule(attempt)`` -> seconds in ``[0, MAX_DELAY]``.

    >>> (constant(10) + linear(1)).capped(12).delays(4)
    [11.0, 12.0, 12.0, 12.0]
    """

    name = "backoff"
    cap: float | None = None

    @abstractmethod
    def _delay(self, attempt: int) -> float:
        """Uncapped, unclamped delay after failed attempt ``attempt``."""

    def __call__(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        if not isinstance(attempt, int) or isinstance(attempt, bool):
            raise TypeError(f"{self!r}: attempt must be an int, got {attempt!r}")
        if attempt < 1:
            raise ValueError(f"{self!r}: attempt must be >= 1, got {attempt!r}")
        try:
            delay = float(self._delay(attempt))
        except OverflowError:
            delay = MAX_DELAY
        if self.cap is not None:
            delay = min(delay, self.cap)
        return min(max(delay, 0.0), MAX_DELAY)

    def delays(self, n: int) -> list[float]:
        """The first ``n`` delays, ``[self(1), ..., self(n)]``."""
        return [self(attempt) for attempt in range(1, n + 1)]

    def capped(self, cap: Seconds) -> Backoff:
        """A copy of this schedule that never waits longer than ``cap``."""
        new, limit = copy.copy(self), _seconds(self.name, "cap", cap, True)
        new.cap = limit if self.cap is None else min(self.cap, limit)
        return new

    def __add__(self, other: object) -> Backoff:
        other = _addend(other)
        return NotImplemented if other is None else _Sum(self, other)

    def __radd__(self, other: object) -> Backoff:
        other = _addend(other)
        return NotImplemented if other is None else _Sum(other, self)


def _addend(value: object) -> Backoff | None:
    if isinstance(value, Backoff):
        return value
    if isinstance(value, timedelta) or _is_number(value):
        return constant(value)
    return None


class _Formula(Backoff):
    """A named schedule computed by ``formula(attempt)``; built by the constructors."""

    def __init__(self, name: str, args: list[str], formula: Callable[[int], float], cap: object) -> None:
        self.name, self.args, self.formula = name, args, formula
        self.cap = None if cap is None else _seconds(name, "cap", cap, True)

    def _delay(self, attempt: int) -> float:
        return self.formula(attempt)

    def __repr__(self) -> str:
        cap = [] if self.cap is None else [f"cap={self.cap!r}"]
        return f"{self.name}({', '.join(self.args + cap)})"


class _Sum(Backoff):
    name = "sum"

    def __init__(self, left: Backoff, right: Backoff) -> None:
        self.left, self.right = left, right

    def _delay(self, attempt: int) -> float:
        return self.left(attempt) + self.right(attempt)

    def __repr__(self) -> str:
        text = f"{self.left!r} + {self.right!r}"
        return text if self.cap is None else f"({text}).capped({self.cap!r})"


def manual(delays: Sequence[Seconds], *, cap: Seconds | None = None) -> Backoff:
    """Attempt N waits ``delays[N-1]``; past the end the last delay repeats.

    >>> manual([1, 5, 30]).delays(5)
    [1.0, 5.0, 30.0, 30.0, 30.0]
    """
    if not isinstance(delays, (list, tuple)) or not delays:
        msg = "delays must be a non-empty list or tuple"
        raise ValueError(f"backoff.manual: {msg}, got {delays!r}")
    values = [_seconds("manual", f"delays[{i}]", d) for i, d in enumerate(delays)]
    args = [f"[{', '.join(map(_fmt, values))}]"]
    return _Formula("manual", args, lambda n: values[min(n, len(values)) - 1], cap)


def constant(delay: Seconds, *, cap: Seconds | None = None) -> Backoff:
    """The same delay every time; ``constant(0)`` retries at once.

    >>> constant(timedelta(minutes=1)).delays(3)
    [60.0, 60.0, 60.0]
    """
    secs = _seconds("constant", "delay", delay)
    return _Formula("constant", [_fmt(secs)], lambda n: secs, cap)


def linear(
    start: Seconds, step: Seconds | None = None, *, cap: Seconds | None = None
) -> Backoff:
    """``start + step * (N - 1)``; ``step`` defaults to ``start``.

    >>> linear(10).delays(3), linear(0, 5).delays(3)
    ([10.0, 20.0, 30.0], [0.0, 5.0, 10.0])
    """
    first = _seconds("linear", "start", start)
    inc = first if step is None else _seconds("linear", "step", step)
    if first == 0 and inc == 0:
        raise ValueError("backoff.linear: start may be 0 only if step is positive")
    formula = lambda n: first + inc * (n - 1) if inc else first  # inc=0: no overflow
    return _Formula("linear", [_fmt(first), _fmt(inc)], formula, cap)


def fibonacci(base: Seconds, *, cap: Seconds | None = None) -> Backoff:
    """``base * F(N)`` with F = 1, 2, 3, 5, 8, 13, ...

    >>> fibonacci(5).delays(6)
    [5.0, 10.0, 15.0, 25.0, 40.0, 65.0]
    """
    unit = _seconds("fibonacci", "base", base, True)

    def formula(attempt: int) -> float:
        prev, fib = 1, 1
        for _ in range(attempt - 1):
            if unit * fib > MAX_DELAY:
                break
            prev, fib = fib, prev + fib
        return unit * fib

    return _Formula("fibonacci", [_fmt(unit)], formula, cap)


def logarithmic(base: Seconds, *, cap: Seconds | None = None) -> Backoff:
    """``base * log2(N + 1)``: 1x, 1.585x, 2x, 2.32x, ... grows slowly.

    >>> logarithmic(60).delays(3)[::2]
    [60.0, 120.0]
    """
    unit = _seconds("logarithmic", "base", base, True)
    return _Formula("logarithmic", [_fmt(unit)], lambda n: unit * math.log2(n + 1), cap)


def exponential(
    base: Seconds, factor: float = 2, *, cap: Seconds | None = None
) -> Backoff:
    """``base * factor ** (N - 1)``, saturating at ``MAX_DELAY`` (or the cap).

    >>> exponential(60, cap=timedelta(days=3))
    exponential(60, cap=259200.0)
    >>> exponential(1, factor=3).delays(4)
    [1.0, 3.0, 9.0, 27.0]
    """
    unit = _seconds("exponential", "base", base, True)
    if not _is_number(factor) or not 1 < factor < math.inf:
        raise ValueError(
            f"backoff.exponential: factor must be a finite number > 1, got {factor!r}"
        )
    factor = float(factor)
    limit = math.log(MAX_DELAY / unit) / math.log(factor)  # largest useful exponent

    def formula(attempt: int) -> float:
        return MAX_DELAY if attempt - 1 > limit else unit * factor ** (attempt - 1)

    args = [_fmt(unit)] + ([] if factor == 2 else [f"factor={_fmt(factor)}"])
    return _Formula("exponential", args, formula, cap)


def full_jitter(schedule: Schedule, *, cap: Seconds | None = None) -> Backoff:
    """Uniformly random in ``[0, schedule(N)]`` (uses ``random.uniform``).

    >>> all(0 <= full_jitter(exponential(60))(3) <= 240 for _ in range(99))
    True
    """
    inner = as_backoff(schedule)
    formula = lambda n: random.uniform(0, inner(n))
    return _Formula("full_jitter", [repr(inner)], formula, cap)


def jitter(
    schedule: Schedule, fraction: float, *, cap: Seconds | None = None
) -> Backoff:
    """``schedule(N) * uniform(1 - fraction, 1 + fraction)``, 0 < fraction <= 1.

    >>> all(45 <= jitter(constant(60), 0.25)(1) <= 75 for _ in range(99))
    True
    """
    inner = as_backoff(schedule)
    if not _is_number(fraction) or not 0 < fraction <= 1:
        raise ValueError(
            f"backoff.jitter: fraction must be a number in (0, 1], got {fraction!r}"
        )
    low, high = 1 - fraction, 1 + fraction
    formula = lambda n: inner(n) * random.uniform(low, high)
    return _Formula("jitter", [repr(inner), repr(float(fraction))], formula, cap)


def as_backoff(value: object) -> Backoff:
    """Coerce a task's ``backoff`` setting into a :class:`Backoff`.

    A Backoff is returned as is, a list/tuple becomes :func:`manual`, and a
    number of seconds or a timedelta becomes :func:`constant`.

    >>> as_backoff([1, 5, 30]), as_backoff(10)
    (manual([1, 5, 30]), constant(10))
    """
    if isinstance(value, (list, tuple)):
        return manual(value)
    backoff = _addend(value)
    if backoff is None:
        raise TypeError(
            "backoff: expected a Backoff, a list/tuple of delays, or a number of "
            f"seconds or a timedelta, got {value!r} ({type(value).__name__})"
        )
    return backoff
