"""rare_celery.message.retry_call: retry(args=...)/retry(kwargs=...) merged as Celery 5.7 merges them."""

from __future__ import annotations

from rare_celery.message import retry_call


def send(to, body, *, urgent=False):
    pass


def test_both_or_neither_given_replace_or_keep_both():
    assert retry_call(send, [1], {"body": 2}) == ([1], {"body": 2})
    assert retry_call(send, [1], {"body": 2}, [3], {"urgent": True}) == ([3], {"urgent": True})


def test_new_positions_drop_the_keywords_they_now_fill():
    assert retry_call(send, [], {"to": "a", "body": "b", "urgent": True}, args=["x"]) == (["x"], {"body": "b", "urgent": True})


def test_new_keywords_replace_the_positions_they_name():
    assert retry_call(send, ["a", "b"], {}, kwargs={"body": "c"}) == (["a", "c"], {})
    assert retry_call(send, ["a", "b"], {}, kwargs={"urgent": True}) == (["a", "b"], {"urgent": True})


def test_a_callable_without_a_signature_keeps_what_it_was_given():
    assert retry_call(print, ["a"], {}, kwargs={"sep": ","}) == (["a"], {"sep": ","})
