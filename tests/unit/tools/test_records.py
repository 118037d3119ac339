"""rare_celery.tools.records: bug-queue messages read as records, never evaluated, and sent back clean."""

from __future__ import annotations

import json

from rare_celery import headers as hdr
from rare_celery.tools import records

JSON = {"content_type": "application/json"}


def bug_headers() -> dict:
    return {"id": "t1", "task": "sms.send", hdr.ATTEMPT: 3, hdr.FIRST_AT: 100.0, hdr.DEADLINE: 900.0, hdr.QUEUE: "sms",
            **hdr.bug("exhausted", 3, "sms.send", now=200.0), hdr.EXCEPTION: "builtins.ConnectionError",
            hdr.ERROR: "gateway down", "x-death": [{"count": 1}], "x-delivery-count": 2, hdr.DELIVERIES: 6,
            hdr.RETURNED: "redelivered", hdr.COPY: "c-1"}


def test_a_rare_message_reads_as_a_full_record():
    body = json.dumps([["+44"], {"text": "hi"}, {}]).encode()
    r = records.read("sms.bugs", 0, body, JSON, bug_headers())
    assert (r.id, r.task, r.queue, r.reason, r.attempts, r.failed_at) == ("t1", "sms.send", "sms", "exhausted", 3, 200.0)
    assert (r.args, r.kwargs, r.body_error) == (["+44"], {"text": "hi"}, None)
    assert r.one_line_error() == "ConnectionError: gateway down"


def test_the_first_attempt_after_hops_is_the_works_first_not_the_last_hops():
    """A week of charge retries, then a hop to the notice: "first attempt" is a week ago, not minutes."""
    week = 7 * 86400.0
    hops = [{"task": "billing.charge", "queue": "billing", "reason": "exhausted", "attempts": 9, "started": 1000.0,
             "left": 1000.0 + week}, "junk", {"task": "x", "started": "yesterday"}]
    h = {**bug_headers(), hdr.FIRST_AT: 1000.0 + week, hdr.HOPS: hops}
    assert records.read("q.bugs", 0, b"[[], {}, {}]", JSON, h).first_attempt_at == 1000.0
    assert records.read("q.bugs", 0, b"[[], {}, {}]", JSON, bug_headers()).first_attempt_at == 100.0  # no hop
    assert records.read("q.bugs", 0, b"[[], {}, {}]", JSON, {hdr.HOPS: "junk"}).first_attempt_at is None


def test_pickle_and_bad_json_are_shown_not_decoded():
    r = records.read("q.bugs", 1, b"\x80\x04K\x01.", {"content_type": "application/x-python-serialize"}, None)
    assert r.args is None and "not JSON" in r.body_error and r.body_preview
    r = records.read("q.bugs", 2, b"[1,", JSON, {hdr.ATTEMPTS: "3", hdr.FAILED_AT: float("nan")})
    assert "not valid JSON" in r.body_error and r.attempts is None and r.failed_at is None


def test_requeue_headers_drop_the_bug_queue_and_broker_bookkeeping():
    kept = records.requeue_headers(bug_headers(), reset=False, now=500.0)
    assert not set(kept) & {*hdr.BUG_ONLY, "x-death", "x-delivery-count"}
    # issue 23, 4: a requeue starts the delivery count over (a worker_lost message at 6 would go straight
    # back to the bug queue at its next put-back), as a new copy
    assert hdr.DELIVERIES not in kept and hdr.RETURNED not in kept and kept[hdr.COPY] != "c-1"
    assert (kept[hdr.ATTEMPT], kept[hdr.FIRST_AT], kept[hdr.DEADLINE]) == (3, 100.0, 900.0)
    fresh = records.requeue_headers(bug_headers(), reset=True, now=500.0, queue="sms.retry")
    assert (fresh[hdr.ATTEMPT], fresh[hdr.FIRST_AT], fresh[hdr.QUEUE]) == (1, 500.0, "sms.retry")
    assert hdr.DEADLINE not in fresh


def test_the_fingerprint_ignores_the_quorum_delivery_count():
    h = bug_headers()
    assert records.fingerprint(b"x", JSON, h) == records.fingerprint(b"x", JSON, {**h, "x-delivery-count": 9})
    assert records.fingerprint(b"x", JSON, h) != records.fingerprint(b"y", JSON, h)


def test_failures_that_differ_in_ids_and_numbers_are_one_group():
    def rec(task: str, kind: str, error: str, failed: float) -> records.Record:
        h = {**bug_headers(), "task": task, hdr.TASK: task, hdr.EXCEPTION: kind, hdr.ERROR: error, hdr.FAILED_AT: failed}
        return records.read("q.bugs", 0, b"[[], {}, {}]", JSON, h)

    a = rec("billing.charge", "app.Declined", "card 4242 declined for sub 9f2c1a7e-0c1d-4b8e-9a55-1b2c3d4e5f60", 10.0)
    b = rec("billing.charge", "app.Declined", "card 1111 declined for sub 0a2c1a7e-0c1d-4b8e-9a55-1b2c3d4e5f61", 30.0)
    c = rec("billing.charge", "app.Timeout", "card 4242 declined for sub 9f2c1a7e-0c1d-4b8e-9a55-1b2c3d4e5f60", 20.0)
    d = rec("notify.sms", "app.Declined", "card 4242 declined for sub 9f2c1a7e-0c1d-4b8e-9a55-1b2c3d4e5f60", 20.0)
    assert a.group == b.group and len({a.group, c.group, d.group}) == 3
    assert records.masked("HTTP 503 at 12:30:01 for +15550004, request deadbeef0123456789") == \
        "HTTP <n> at <n> for <n>, request <id>"
    found = records.groups((r.group, r.task, r.one_line_error(records.GROUP_WIDTH), r.failed_at) for r in (a, b, c, d))
    assert (found[0].count, found[0].first_failed, found[0].last_failed) == (2, 10.0, 30.0)
    assert found[0].error == "Declined: card <n> declined for sub <id>"
    assert records.Selector(groups=frozenset({a.group})).matches(b) and not records.Selector(groups=frozenset({a.group})).matches(c)


def test_an_edit_rewrites_the_arguments_and_keeps_a_bounded_history():
    body = json.dumps([["+1555 0004"], {"text": "hi"}, {"callbacks": None}]).encode()
    new_body, h = records.edited(body, JSON, bug_headers(), ["+15550004"], None, "ana", 500.0)
    assert json.loads(new_body) == [["+15550004"], {"text": "hi"}, {"callbacks": None}]
    assert h[hdr.EDITS] == [{"by": "ana", "at": 500.0, "args": '["+1555 0004"]', "kwargs": '{"text": "hi"}'}]
    assert h["argsrepr"] == "['+15550004']" and h["id"] == "t1"
    for n in range(30):  # edited again and again, with huge arguments: the headers stay small
        new_body, h = records.edited(new_body, JSON, h, ["x" * 50_000], {"n": n}, "bot", 600.0 + n)
    assert len(h[hdr.EDITS]) == records.MAX_EDITS and h[hdr.EDITS][-1]["at"] == 629.0
    assert len(json.dumps(h)) < 48 * 1024
    for bad, why in ((b"\x80\x04K\x01.", "cannot be read"), (b'{"args": [1], "kwargs": {}}', "protocol 1")):
        try:
            records.edited(bad, JSON, {}, [1], None, "ana", 1.0)
        except ValueError as exc:
            assert why in str(exc)
        else:
            raise AssertionError("edited " + repr(bad))
