"""Unit tests for rare_celery.backoff (pure functions, no broker)."""

from __future__ import annotations

import doctest
import math
import random
import re
from datetime import timedelta

import pytest

from rare_celery import backoff
from rare_celery.backoff import (
    MAX_DELAY,
    Backoff,
    as_backoff,
    constant,
    exponential,
    fibonacci,
    full_jitter,
    jitter,
    linear,
    logarithmic,
    manual,
)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(20240601)


# --- first values --------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (manual([1, 5, 30]), [1, 5, 30, 30, 30, 30]),
        (manual((0, 2)), [0, 2, 2]),
        (manual([7]), [7, 7, 7]),
        (constant(10), [10, 10, 10]),
        (constant(0), [0, 0]),
        (constant(0.5), [0.5, 0.5]),
        (linear(10), [10, 20, 30, 40]),
        (linear(5, 2), [5, 7, 9, 11]),
        (linear(0, 5), [0, 5, 10]),
        (linear(5, 0), [5, 5, 5]),
        (fibonacci(5), [5, 10, 15, 25, 40, 65, 105, 170]),
        (fibonacci(1), [1, 2, 3, 5, 8, 13, 21]),
        (exponential(60), [60, 120, 240, 480, 960]),
        (exponential(1, factor=3), [1, 3, 9, 27]),
        (exponential(2, factor=1.5), [2, 3, 4.5, 6.75]),
        (logarithmic(60), [60, 60 * math.log2(3), 120, 60 * math.log2(5)]),
    ],
    ids=repr,
)
def test_first_values(schedule: Backoff, expected: list[float]) -> None:
    assert schedule.delays(len(expected)) == expected
    assert [schedule(n) for n in range(1, len(expected) + 1)] == expected
    assert all(type(d) is float for d in schedule.delays(len(expected)))


def test_logarithmic_grows_slowly() -> None:
    s = logarithmic(10)
    assert s(1) == 10.0
    assert s(3) == 20.0
    assert s(7) == 30.0
    assert s(1023) == 100.0
    assert round(s(2), 3) == 15.85


def test_delays_zero_is_empty() -> None:
    assert exponential(1).delays(0) == []


def test_attempt_must_be_positive_int() -> None:
    s = constant(1)
    with pytest.raises(ValueError, match=r"attempt must be >= 1, got 0"):
        s(0)
    with pytest.raises(TypeError, match="attempt must be an int"):
        s(1.0)
    with pytest.raises(TypeError, match="attempt must be an int"):
        s(True)


# --- caps ----------------------------------------------------------------


def test_cap_keyword_on_every_constructor() -> None:
    assert exponential(60, cap=300).delays(6) == [60, 120, 240, 300, 300, 300]
    assert fibonacci(5, cap=30).delays(5) == [5, 10, 15, 25, 30]
    assert linear(10, cap=25).delays(4) == [10, 20, 25, 25]
    assert logarithmic(60, cap=100).delays(3) == [60, 95.09775004326937, 100]
    assert manual([1, 50, 5], cap=10).delays(4) == [1, 10, 5, 5]
    assert constant(10, cap=3).delays(2) == [3, 3]


def test_capped_returns_new_schedule_and_keeps_smallest_cap() -> None:
    base = exponential(60)
    capped = base.capped(200)
    assert capped.delays(4) == [60, 120, 200, 200]
    assert base.delays(4) == [60, 120, 240, 480]  # original untouched
    assert capped.capped(100).delays(3) == [60, 100, 100]
    assert capped.capped(1000).delays(4) == [60, 120, 200, 200]
    assert exponential(60, cap=100).capped(timedelta(seconds=90))(5) == 90


def test_huge_attempts_saturate_without_raising() -> None:
    assert exponential(60)(10_000) == MAX_DELAY
    assert exponential(60, cap=600)(10_000) == 600
    assert exponential(60).capped(timedelta(days=3))(10_000) == 259_200
    assert exponential(1, factor=1e300)(3) == MAX_DELAY
    assert exponential(60)(10**400) == MAX_DELAY
    assert fibonacci(5)(10_000) == MAX_DELAY
    assert fibonacci(5, cap=600)(10**9) == 600
    assert linear(1)(10**400) == MAX_DELAY
    assert linear(5, 0)(10**400) == 5
    assert manual([1, 2])(10**400) == 2
    assert logarithmic(1)(2**64 - 1) == 64
    assert exponential(1, factor=1.0001)(10_000) == 1.0001**9999


def test_results_are_clamped_to_max_delay() -> None:
    assert (constant(MAX_DELAY) + constant(MAX_DELAY))(1) == MAX_DELAY
    assert all(0 <= d <= MAX_DELAY for d in jitter(constant(MAX_DELAY), 1).delays(50))


# --- timedelta inputs ----------------------------------------------------


def test_timedelta_parameters() -> None:
    minute = timedelta(minutes=1)
    assert constant(minute).delays(2) == [60, 60]
    assert manual([timedelta(seconds=1), minute, 5]).delays(4) == [1, 60, 5, 5]
    assert linear(minute, timedelta(seconds=30)).delays(3) == [60, 90, 120]
    assert linear(timedelta(0), step=minute).delays(2) == [0, 60]
    assert fibonacci(timedelta(seconds=2)).delays(3) == [2, 4, 6]
    assert exponential(minute, cap=timedelta(minutes=3)).delays(3) == [60, 120, 180]
    assert logarithmic(timedelta(milliseconds=500))(3) == 1.0
    assert (exponential(1) + timedelta(seconds=10)).delays(2) == [11, 12]


# --- composition ---------------------------------------------------------


def test_sum_of_schedules_and_numbers() -> None:
    assert (exponential(1) + linear(10)).delays(3) == [11, 22, 34]
    assert (exponential(1) + 5).delays(3) == [6, 7, 9]
    assert (5 + exponential(1)).delays(3) == [6, 7, 9]
    assert (exponential(1) + 0.5)(1) == 1.5
    assert sum([constant(1), constant(2), linear(3)]).delays(2) == [6, 9]
    assert isinstance(exponential(1) + 5, Backoff)


def test_sum_with_caps() -> None:
    # each part keeps its own cap; the sum can be capped as a whole
    assert (exponential(10, cap=25) + 1).delays(4) == [11, 21, 26, 26]
    assert (exponential(10) + 1).capped(25).delays(4) == [11, 21, 25, 25]
    assert (fibonacci(5) + linear(1)).capped(20).delays(3) == [6, 12, 18]


def test_sum_rejects_other_types() -> None:
    s = constant(1)
    for other in ("5", None, True, [1, 2], {"a": 1}):
        with pytest.raises(TypeError):
            s + other
        with pytest.raises(TypeError):
            other + s
    with pytest.raises(ValueError, match=r"backoff\.constant: delay"):
        s + -1


# --- jitter --------------------------------------------------------------


def test_full_jitter_bounds_and_variation() -> None:
    s = full_jitter(constant(100))
    draws = [s(1) for _ in range(2000)]
    assert all(0 <= d <= 100 for d in draws)
    assert len(set(draws)) > 1900
    assert min(draws) < 5
    assert max(draws) > 95
    assert 40 < sum(draws) / len(draws) < 60


def test_full_jitter_follows_inner_schedule() -> None:
    s = full_jitter(exponential(60))
    for attempt, top in [(1, 60), (2, 120), (3, 240), (5, 960)]:
        draws = [s(attempt) for _ in range(300)]
        assert all(0 <= d <= top for d in draws)
        assert max(draws) > top * 0.9


def test_jitter_bounds() -> None:
    s = jitter(constant(100), 0.2)
    draws = [s(1) for _ in range(2000)]
    assert all(80 <= d <= 120 for d in draws)
    assert min(draws) < 82
    assert max(draws) > 118
    full = jitter(constant(10), 1)
    assert all(0 <= d <= 20 for d in full.delays(500))


def test_jitter_applies_after_inner_cap_and_wrapper_cap_caps_result() -> None:
    inner_capped = jitter(exponential(60, cap=100), 0.5)
    draws = [inner_capped(10) for _ in range(500)]
    assert all(50 <= d <= 150 for d in draws)
    assert max(draws) > 140  # jitter goes above the inner cap
    outer = jitter(exponential(60), 0.5, cap=100)
    draws = [outer(2) for _ in range(500)]  # 120 * [0.5, 1.5] = [60, 180]
    assert all(60 <= d <= 100 for d in draws)
    assert draws.count(100.0) > 100
    assert all(d <= 10 for d in full_jitter(constant(100), cap=10).delays(200))
    assert all(d <= 10 for d in full_jitter(constant(100)).capped(10).delays(200))


def test_jitter_is_reproducible_with_random_seed() -> None:
    s = full_jitter(exponential(1)) + jitter(linear(1), 0.5)
    random.seed(7)
    first = s.delays(10)
    random.seed(7)
    assert s.delays(10) == first
    assert len(set(first)) == 10


def test_jitter_accepts_plain_settings() -> None:
    assert all(0 <= d <= 30 for d in full_jitter([1, 5, 30]).delays(20))
    assert all(5 <= d <= 15 for d in jitter(10, 0.5).delays(20))


# --- validation ----------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # exponential
        (lambda: exponential(-1), r"backoff\.exponential: base must be a positive"),
        (lambda: exponential(0), r"exponential: base must be a positive"),
        (lambda: exponential("60"), r"exponential: base must be a number"),
        (lambda: exponential(None), r"exponential: base must be a number"),
        (lambda: exponential(True), r"exponential: base must be a number"),
        (lambda: exponential(NAN), r"exponential: base must be a finite"),
        (lambda: exponential(INF), r"exponential: base must be a finite"),
        (lambda: exponential(MAX_DELAY + 1), r"exponential: base must be at most"),
        (lambda: exponential(1, factor=1), r"exponential: factor must be"),
        (lambda: exponential(1, factor=0.5), r"exponential: factor must be"),
        (lambda: exponential(1, factor=-2), r"exponential: factor must be"),
        (lambda: exponential(1, factor="2"), r"exponential: factor must be"),
        (lambda: exponential(1, factor=True), r"exponential: factor must be"),
        (lambda: exponential(1, factor=NAN), r"exponential: factor must be"),
        (lambda: exponential(1, factor=INF), r"exponential: factor must be"),
        # fibonacci / logarithmic
        (lambda: fibonacci(0), r"backoff\.fibonacci: base must be a positive"),
        (lambda: fibonacci(-5), r"fibonacci: base must be a positive"),
        (lambda: fibonacci("5"), r"fibonacci: base must be a number"),
        (lambda: logarithmic(0), r"backoff\.logarithmic: base must be a positive"),
        (lambda: logarithmic(timedelta(0)), r"logarithmic: base must be a positive"),
        (lambda: logarithmic(None), r"logarithmic: base must be a number"),
        # linear
        (lambda: linear(0), r"backoff\.linear: start may be 0 only if step"),
        (lambda: linear(0, 0), r"linear: start may be 0 only if step"),
        (lambda: linear(-1), r"linear: start must be a non-negative"),
        (lambda: linear(1, -1), r"linear: step must be a non-negative"),
        (lambda: linear(1, "x"), r"linear: step must be a number"),
        (lambda: linear(1, MAX_DELAY * 2), r"linear: step must be at most"),
        # constant
        (lambda: constant(-1), r"backoff\.constant: delay must be a non-negative"),
        (lambda: constant(None), r"constant: delay must be a number"),
        (lambda: constant("5"), r"constant: delay must be a number"),
        (lambda: constant(False), r"constant: delay must be a number"),
        (lambda: constant(NAN), r"constant: delay must be a finite"),
        (lambda: constant(-INF), r"constant: delay must be a finite"),
        (lambda: constant(10**400), r"constant: delay must be at most 10 years"),
        (lambda: constant(timedelta(days=-1)), r"constant: delay must be a non-neg"),
        (lambda: constant(timedelta(days=3651)), r"constant: delay must be at most"),
        # manual
        (lambda: manual([]), r"backoff\.manual: delays must be a non-empty"),
        (lambda: manual(()), r"manual: delays must be a non-empty"),
        (lambda: manual("1,5"), r"manual: delays must be a non-empty list"),
        (lambda: manual(None), r"manual: delays must be a non-empty list"),
        (lambda: manual(5), r"manual: delays must be a non-empty list"),
        (lambda: manual([1, -1]), r"manual: delays\[1\] must be a non-negative"),
        (lambda: manual([1, None]), r"manual: delays\[1\] must be a number"),
        (lambda: manual([True]), r"manual: delays\[0\] must be a number"),
        (lambda: manual([1, 2, NAN]), r"manual: delays\[2\] must be a finite"),
        (lambda: manual([1, 4e8]), r"manual: delays\[1\] must be at most 10 years"),
        # cap
        (lambda: exponential(1, cap=0), r"backoff\.exponential: cap must be a pos"),
        (lambda: fibonacci(1, cap=-1), r"fibonacci: cap must be a positive"),
        (lambda: linear(1, cap="10"), r"linear: cap must be a number"),
        (lambda: constant(1, cap=True), r"constant: cap must be a number"),
        (lambda: manual([1], cap=NAN), r"manual: cap must be a finite"),
        (lambda: logarithmic(1, cap=MAX_DELAY + 1), r"logarithmic: cap must be at"),
        (lambda: full_jitter(constant(1), cap=0), r"full_jitter: cap must be a pos"),
        (lambda: jitter(constant(1), 0.1, cap=-1), r"jitter: cap must be a positive"),
        (lambda: exponential(1).capped(0), r"exponential: cap must be a positive"),
        (lambda: (constant(1) + 1).capped("x"), r"cap must be a number"),
        # jitter fraction
        (lambda: jitter(constant(1), 0), r"backoff\.jitter: fraction must be"),
        (lambda: jitter(constant(1), -0.1), r"jitter: fraction must be"),
        (lambda: jitter(constant(1), 1.5), r"jitter: fraction must be"),
        (lambda: jitter(constant(1), "0.5"), r"jitter: fraction must be"),
        (lambda: jitter(constant(1), NAN), r"jitter: fraction must be"),
        (lambda: jitter(constant(1), True), r"jitter: fraction must be"),
    ],
)
def test_validation_errors_name_the_parameter(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: exponential(-1),
            "backoff.exponential: base must be a positive number of seconds, got -1",
        ),
        (
            lambda: manual([1, 5, "x"]),
            (
                "backoff.manual: delays[2] must be a number of seconds or a timedelta,"
                " got 'x'"
            ),
        ),
        (
            lambda: exponential(60, cap=315_360_001),
            (
                "backoff.exponential: cap must be at most 10 years (315360000 s),"
                " got 315360001"
            ),
        ),
    ],
)
def test_validation_messages_exactly(make, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


def test_edge_values_that_are_allowed() -> None:
    assert constant(0)(1) == 0
    assert constant(MAX_DELAY)(1) == MAX_DELAY
    assert manual([0, 0, 1]).delays(4) == [0, 0, 1, 1]
    assert exponential(MAX_DELAY)(2) == MAX_DELAY
    assert exponential(1, cap=MAX_DELAY)(1) == 1
    assert jitter(constant(10), 1)(1) <= 20
    assert linear(0.001)(3) == 0.003


# --- as_backoff ----------------------------------------------------------


def test_as_backoff_accepted_types() -> None:
    schedule = fibonacci(5, cap=600)
    assert as_backoff(schedule) is schedule
    assert as_backoff([1, 5, 30]).delays(4) == [1, 5, 30, 30]
    assert as_backoff((2, 4)).delays(3) == [2, 4, 4]
    assert as_backoff(5).delays(2) == [5, 5]
    assert as_backoff(0).delays(1) == [0]
    assert as_backoff(2.5)(3) == 2.5
    assert as_backoff(timedelta(minutes=2))(1) == 120
    assert repr(as_backoff([1, 5, 30])) == "manual([1, 5, 30])"
    assert repr(as_backoff(timedelta(minutes=2))) == "constant(120)"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "None (NoneType)"),
        ("5", "'5' (str)"),
        (True, "True (bool)"),
        ({"delays": [1]}, "{'delays': [1]} (dict)"),
        ({1, 2}, "(set)"),
        (object, "(type)"),
    ],
)
def test_as_backoff_rejected_types(value: object, shown: str) -> None:
    with pytest.raises(TypeError, match="list/tuple of delays") as info:
        as_backoff(value)
    assert shown in str(info.value)
    assert "Backoff" in str(info.value)


def test_as_backoff_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"manual: delays must be a non-empty"):
        as_backoff([])
    with pytest.raises(ValueError, match=r"constant: delay must be a non-negative"):
        as_backoff(-1)
    with pytest.raises(ValueError, match=r"manual: delays\[0\] must be a number"):
        as_backoff(["1"])


# --- repr, base class, module --------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "text"),
    [
        (exponential(60, cap=259200), "exponential(60, cap=259200.0)"),
        (exponential(60, cap=timedelta(days=3)), "exponential(60, cap=259200.0)"),
        (exponential(1.5, factor=3), "exponential(1.5, factor=3)"),
        (exponential(60).capped(600), "exponential(60, cap=600.0)"),
        (manual([1, 5, 30]), "manual([1, 5, 30])"),
        (manual((0.5, timedelta(minutes=1))), "manual([0.5, 60])"),
        (constant(timedelta(minutes=1)), "constant(60)"),
        (linear(10), "linear(10, 10)"),
        (linear(0, 5, cap=60), "linear(0, 5, cap=60.0)"),
        (fibonacci(5), "fibonacci(5)"),
        (logarithmic(30), "logarithmic(30)"),
        (
            full_jitter(exponential(60), cap=600),
            "full_jitter(exponential(60), cap=600.0)",
        ),
        (jitter(constant(60), 0.25), "jitter(constant(60), 0.25)"),
        (exponential(60) + 5, "exponential(60) + constant(5)"),
        (5 + exponential(60), "constant(5) + exponential(60)"),
        ((fibonacci(5) + 1).capped(30), "(fibonacci(5) + constant(1)).capped(30.0)"),
    ],
)
def test_repr(schedule: Backoff, text: str) -> None:
    assert repr(schedule) == text


def test_custom_subclass_is_clamped() -> None:
    class Wild(Backoff):
        def _delay(self, attempt: int) -> float:
            return -5.0 if attempt == 1 else 1e20

    wild = Wild()
    assert wild.delays(2) == [0.0, MAX_DELAY]
    assert wild.capped(10).delays(2) == [0.0, 10.0]
    assert (wild + 3).delays(2) == [3.0, MAX_DELAY]
    with pytest.raises(TypeError):
        Backoff()


def test_module_exports() -> None:
    assert MAX_DELAY == 315_360_000.0 == 10 * 365 * 24 * 3600
    assert set(backoff.__all__) == {
        "MAX_DELAY",
        "Backoff",
        "as_backoff",
        "constant",
        "exponential",
        "fibonacci",
        "full_jitter",
        "jitter",
        "linear",
        "logarithmic",
        "manual",
    }
    assert all(hasattr(backoff, name) for name in backoff.__all__)


def test_docstring_examples() -> None:
    random.seed(0)
    result = doctest.testmod(backoff)
    assert result.attempted >= 10
    assert result.failed == 0
