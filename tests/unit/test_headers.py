"""The x-rare-* header codec: bounded, validated, never evaluated."""

from __future__ import annotations

import pytest

from rare_celery import headers as hdr


def test_round_trip():
    a = hdr.Attempt(3, 1000.5, deadline=2000.0, due=1500.25, queue="sms")
    assert hdr.read(hdr.write(a)) == a


def test_message_without_headers_is_a_first_attempt_starting_now():
    assert hdr.read({}, now=42.0) == hdr.Attempt(1, 42.0)
    assert hdr.read(None, now=42.0) == hdr.Attempt(1, 42.0)


@pytest.mark.parametrize("key, value", [
    ("x-rare-attempt", -5), ("x-rare-attempt", 0), ("x-rare-attempt", "2"), ("x-rare-attempt", 2.5),
    ("x-rare-attempt", 10**9), ("x-rare-attempt", True),
    ("x-rare-deadline", "tomorrow"), ("x-rare-deadline", float("nan")), ("x-rare-deadline", 1e300),
    ("x-rare-first-at", -1), ("x-rare-due", [1]), ("x-rare-queue", 7), ("x-rare-queue", "q" * 300),
])
def test_nonsense_values_are_refused_with_the_header_named(key, value):
    with pytest.raises(hdr.HeaderError, match=key):
        hdr.read({key: value})


def test_huge_values_are_not_echoed_whole():
    with pytest.raises(hdr.HeaderError) as info:
        hdr.read({"x-rare-queue": ["x" * 100_000]})
    assert len(str(info.value)) < 200


def test_error_headers_are_bounded_however_big_the_exception():
    def deep(n):
        if n == 0:
            raise RuntimeError("boom " * 10_000)
        deep(n - 1)
    try:
        deep(200)
    except RuntimeError as exc:
        out = hdr.error(exc)
    assert out["x-rare-exception"] == "builtins.RuntimeError"
    assert len(out["x-rare-error"]) == hdr.MAX_ERROR
    assert len(out["x-rare-traceback"]) <= hdr.MAX_TRACEBACK
    assert "in deep" in out["x-rare-traceback"]  # the innermost frames are kept
    assert out["x-rare-traceback"].startswith("Traceback (most recent call last):\n  ...\n  File ")  # some left out
    assert out["x-rare-traceback"].rstrip().endswith("bo...")  # ends with the clipped message


def test_a_short_traceback_reads_as_python_writes_it():
    try:
        raise KeyError("k")
    except KeyError as exc:
        text = hdr.error(exc)["x-rare-traceback"]
    lines = text.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[1].startswith('  File "')
    assert lines[-1] == "builtins.KeyError: 'k'"


def test_carried_headers_drop_bookkeeping_but_keep_the_users():
    kept = hdr.carried({"x-death": [{}], "x-first-death-queue": "q", "x-rare-attempt": 2, "BCC": ["x"],
                        "tenant": "acme", "task": "t", "x-rare-hops": [{"task": "a"}]})
    assert kept == {"tenant": "acme", "task": "t", "x-rare-hops": [{"task": "a"}]}


def test_fit_keeps_small_headers_and_cuts_what_would_not_fit_a_frame():
    small = {"task": "t", "x-rare-traceback": "tb", "tenant": "acme"}
    assert hdr.fit(small) is small
    big = {"task": "t", "x-junk": "j" * 130_000, "x-rare-traceback": "t" * 4000, "x-rare-error": "e" * 1000}
    out = hdr.fit(big)
    assert out["task"] == "t" and "x-rare-traceback" not in out and len(out["x-rare-error"]) == 200
    assert out["x-junk"] == "<dropped by rare_celery: 130002 bytes>"
    assert hdr._size(out) <= hdr.HEADER_BUDGET


def test_fit_survives_absurdly_nested_values():
    deep = 1
    for _ in range(5000):
        deep = [deep]
    out = hdr.fit({"task": "t", "x-nested": deep})
    assert out["x-nested"].startswith("<dropped by rare_celery")


def test_too_deep_counts_levels_without_recursion():
    assert not hdr.too_deep({"stamps": {}, "timelimit": [None, None], "x-rare-hops": [{"task": "a"}]})
    deep = 1
    for _ in range(100_000):
        deep = [deep]
    assert hdr.too_deep({"x": deep})
    assert hdr.fit({"task": "t", "x": deep})["x"] == "<dropped by rare_celery: nested deeper than 32>"


@pytest.mark.parametrize("headers", [
    {"task": "t", "argsrepr": "(1,)", "timelimit": [None, None], "retries": 1, "x-rare-due": 1.5, "flag": None},
    {"task": "t", "x-big": "b" * 20_000, "x-many": list(range(5000))},
    {"task": "t", "x-utf8": "\u00e9" * 30_000},  # 60,000 bytes of UTF-8: the bound alone says no
    {"task": "t", "x-bytes": b"\x00" * 70_000},
    {"task": "t", "x-nested": {"a": [[[[1]]]]}},
])
def test_the_quick_size_bound_agrees_with_encoding_the_headers(headers):
    exact = hdr._size(headers) <= hdr.HEADER_BUDGET and not hdr.too_deep(headers)
    assert hdr._fits(headers, hdr.HEADER_BUDGET) == exact
    assert (hdr.fit(headers) is headers) == exact


def test_the_traceback_header_is_format_tb_without_the_markers():
    import re
    import traceback

    def inner(n):
        if n == 0:
            {}["missing"]
        inner(n - 1)
    try:
        inner(3)
    except KeyError as exc:
        error = exc
    made = hdr._frames(error.__traceback__)
    assert made == re.sub(r"\n\s+[~^]+\n", "\n", "".join(traceback.format_tb(error.__traceback__)))
    assert made.count("in inner") == 4 and '{}["missing"]' in made
    assert hdr._frames(error.__traceback__, keep=2).count("in inner") == 2  # the innermost ones
