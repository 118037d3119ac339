"""The endings the worker's main process builds from a message it holds (rare_celery.endings with
Delivery.received): what each copy is, without a broker (the real-broker tests are tests/integration)."""

from __future__ import annotations

import time
from collections import OrderedDict

from celery import Celery
from kombu import Message

from rare_celery import RareTask, endings
from rare_celery import headers as hdr
from rare_celery.message import Delivery
from rare_celery.policy import GiveUp, HopTo, RetryIn
from rare_celery.topology import bug_queue_name, delay_queue

app = Celery("endings-unit", broker="memory://", set_as_current=False)


@app.task(base=RareTask, bind=True, name="endings-unit.t", max_attempts=3)
def t(self):
    return None


@app.task(base=RareTask, bind=True, name="endings-unit.target")
def target(self):
    return None


def held(headers: dict | None = None) -> Delivery:
    message = Message(body=b'[[], {}, {"callbacks": null}]', content_type="application/json",
                      content_encoding="utf-8", headers={"id": "id-1", "task": t.name, "retries": 0,
                                                         "x-delivery-count": 3, "x-death": [{"count": 1}],
                                                         **(headers or {})})
    return Delivery.received(app, t, message, "work")


def test_a_put_back_is_the_same_message_with_one_more_delivery():
    ending = endings.put_back(held({hdr.ATTEMPT: 2}), "lost", count=2)
    assert ending.kind == endings.PUT_BACK and ending.copy.routing_key == "work" and ending.copy.target is None
    h = ending.copy.headers
    assert h[hdr.DELIVERIES] == 2 and h[hdr.RETURNED] == "lost" and h[hdr.ATTEMPT] == 2
    assert "x-delivery-count" not in h and "x-death" not in h  # the broker's bookkeeping stays out
    assert ending.copy.body == held().body


def test_past_the_limit_a_put_back_ends_in_the_bug_queue_with_why():
    refused = endings.put_back(held(), "nack", count=endings.MAX_DELIVERIES + 1)
    assert refused.kind == endings.BUGS and refused.copy.target.name == bug_queue_name("work")
    assert refused.copy.headers[hdr.REASON] == "unroutable" and "nack" in refused.copy.headers[hdr.ERROR]


def test_a_give_back_is_the_same_message_counting_nothing():
    ending = endings.give_back(held({hdr.COPY: "c-9", hdr.ATTEMPT: 2}))
    assert ending.copy.routing_key == "work" and ending.copy.headers[hdr.COPY] == "c-9"
    assert ending.copy.headers[hdr.ATTEMPT] == 2 and hdr.DELIVERIES not in ending.copy.headers


def test_a_lost_attempt_is_retried_hopped_or_given_up_from_the_raw_message():
    d = held({hdr.ATTEMPT: 1})
    state = d.state()
    retry = endings.next_place(d, state, RetryIn(5.0), ConnectionError("gone"))
    assert retry.copy.target.name == delay_queue(5000).name
    assert retry.copy.headers[hdr.ATTEMPT] == 2 and retry.copy.headers["retries"] == 1
    hop = endings.next_place(d, state, HopTo("endings-unit.target", "exhausted"), None)
    assert hop.copy.headers["task"] == "endings-unit.target" and hop.copy.headers[hdr.ATTEMPT] == 1
    bugs = endings.next_place(d, state, GiveUp("time_limit"), TimeoutError("slow"))
    assert bugs.copy.headers[hdr.REASON] == "time_limit" and bugs.outcome.args == ("slow",)


def test_a_wait_keeps_the_attempt_its_bookkeeping_and_its_last_error():
    d = held({hdr.ATTEMPT: 2, hdr.DELIVERIES: 1, hdr.ERROR: "before", hdr.REASON: "stale"})
    due = time.time() + 60
    ending = endings.wait(d, d.state(), due)
    h = ending.copy.headers
    assert h[hdr.ATTEMPT] == 2 and h[hdr.DUE] == due and h[hdr.DELIVERIES] == 1 and h[hdr.ERROR] == "before"
    assert hdr.REASON not in h


def test_a_wait_never_passes_the_deadline():
    now = time.time()
    d = held({hdr.DEADLINE: now + 10})
    assert endings.wait(d, d.state(now), now + 3600, now=now).copy.headers[hdr.DUE] == now + 10


def test_a_requeue_is_marked_so_no_worker_takes_it_for_a_loss():
    ending = endings.requeue(held())
    assert ending.copy.headers[hdr.REQUEUED] is True and ending.copy.routing_key == "work"


def test_a_copy_for_new_work_has_a_new_copy_id_and_a_put_back_keeps_it():
    """Issue 23, 1: a success is recognized by the copy (x-rare-copy), never by the task id."""
    d = held({hdr.COPY: "c-1", hdr.ATTEMPT: 1})
    state = d.state()
    ids = {endings.next_place(d, state, RetryIn(5.0), ConnectionError("x")).copy.headers[hdr.COPY],
           endings.wait(d, state, time.time() + 60).copy.headers[hdr.COPY],
           endings.next_place(d, state, GiveUp("bug"), KeyError("x")).copy.headers[hdr.COPY]}
    assert len(ids) == 3 and "c-1" not in ids
    assert endings.put_back(d, "why", count=1).copy.headers[hdr.COPY] == "c-1"
    assert endings.requeue(d).copy.headers[hdr.COPY] == "c-1"


def test_a_copy_seen_ending_here_is_known_without_a_result_backend(monkeypatch):
    """A copy this process saw end is known by its copy id (app has no result backend); only the last
    KEPT_HERE are kept, and a message without a copy id is never taken for another."""
    monkeypatch.setattr(endings, "_ENDED_HERE", OrderedDict())
    monkeypatch.setattr(endings, "KEPT_HERE", 2)
    assert endings.copy_ended(t, {hdr.COPY: "c-1"}) is None
    endings.record_ended(t, {hdr.COPY: "c-1"}, endings.RETRY)
    endings.ended_here({hdr.COPY: "c-2"}, endings.SUCCESS)
    endings.ended_here({"id": "id-1"}, endings.SUCCESS)  # no copy id: nothing kept
    assert endings.copy_ended(t, {hdr.COPY: "c-1"}) == endings.RETRY
    assert endings.copy_ended(t, {hdr.COPY: "c-2"}) == endings.SUCCESS
    assert endings.copy_ended(t, {"id": "id-1"}) is None
    endings.ended_here({hdr.COPY: "c-3"}, endings.SUCCESS)  # the oldest goes
    assert endings.copy_ended(t, {hdr.COPY: "c-1"}) is None
    assert endings.copy_ended(t, {hdr.COPY: "c-3"}) == endings.SUCCESS
