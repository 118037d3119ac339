"""rare_celery.hops: the hop history a message carries, and the one rule for when a hop must stop."""

from __future__ import annotations

from rare_celery import hops


def history(*tasks: str) -> list[dict]:
    return [hops.entry(t, t + ".q", "exhausted", 2, 0.0, 1.0) for t in tasks]


def test_an_entry_keeps_its_fields_bounded():
    e = hops.entry("t" * 500, "q", None, 3, 1.0, 2.0)
    assert len(e["task"]) == 200 and e["reason"] == "" and e["attempts"] == 3


def test_a_malformed_history_is_dropped_not_trusted():
    assert hops.read("a -> b") == []
    assert hops.read([{"task": "a"}, "b", {"queue": "q"}, {"task": 5}]) == [{"task": "a"}]
    assert len(hops.read([{"task": str(i)} for i in range(1000)])) == hops.MAX_HOPS_LIMIT + 1


def test_a_target_already_in_the_history_is_a_loop():
    assert hops.refusal(history("a", "b"), "a", 10) == "hop loop: a -> b -> a"


def test_a_history_longer_than_max_hops_is_refused():
    assert hops.refusal(history("a", "b"), "c", 2) is None
    assert hops.refusal(history("a", "b", "c"), "d", 2) == "more than 2 hops: a -> b -> c"
    assert hops.refusal([], "a", 0) is None  # the first task ever: nothing to refuse
