"""Durations as operators type them (--since 1h, --older-than 7d) and as the CLI prints them."""

from __future__ import annotations

import doctest

import pytest

from rare_celery.tools import durations
from rare_celery.tools.durations import offset, parse, short


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604_800), ("1d12h", 129_600), ("2w", 1_209_600),
    ("250ms", 0.25), ("1.5h", 5400), ("1h30m", 5400), ("1d2h3m4s", 93_784), (" 1d 12h ", 129_600), ("0s", 0),
    ("10S", 10), ("1D", 86_400), ("1m500ms", 60.5),
])
def test_parse(text: str, seconds: float) -> None:
    assert parse(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "hint"), [
    ("90", "add a unit: 90s"), ("1.5", "add a unit: 1.5s"),
    ("", "for example 90s"), ("h", "for example"), ("1x", "for example"), ("-1h", "for example"),
    ("1h1h", "for example"), ("30m1h", "for example"), ("1h30", "for example"), ("1 hour", "for example"),
    ("1ms5s", "for example"), ("1e3s", "for example"), ("1,5h", "for example"),
])
def test_parse_refuses_with_a_hint(text: str, hint: str) -> None:
    with pytest.raises(ValueError, match="not a duration") as info:
        parse(text)
    assert repr(text) in str(info.value) and hint in str(info.value)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "+00:00:00"), (60, "+00:01:00"), (3780, "+01:03:00"), (86_399, "+23:59:59"), (86_400, "+1d 00:00:00"),
    (108_000, "+1d 06:00:00"), (491_460, "+5d 16:31:00"), (0.3, "+00:00:00.300"), (61.25, "+00:01:01.250"),
    (315_360_000, "+3650d 00:00:00"),
])
def test_offset(seconds: float, text: str) -> None:
    assert offset(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.05, "50ms"), (1, "1s"), (60, "1m"), (90, "1m30s"), (3600, "1h"), (129_600, "1d12h"),
    (245_760, "2d20h16m"), (1900, "31m40s"), (60.5, "1m500ms"),
])
def test_short_is_parsed_back(seconds: float, text: str) -> None:
    assert short(seconds) == text
    assert parse(text) == pytest.approx(seconds)


def test_docstring_examples() -> None:
    result = doctest.testmod(durations)
    assert result.attempted >= 3 and result.failed == 0
