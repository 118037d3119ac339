"""The pool process's path (rare_celery.pool.attempt): admission, the attempt, retry() and every ending,
with a publisher that records the copies it is given (no broker: what the copy is, not whether the
broker takes it; the real-broker tests are tests/integration)."""

from __future__ import annotations

import time
import uuid

import pytest
from celery import Celery
from celery.exceptions import Ignore, Retry

from rare_celery import Bug, Hop, RareTask, endings, signals
from rare_celery import headers as hdr
from rare_celery.exceptions import RoutingFailed
from rare_celery.pool import attempt
from rare_celery.topology import bug_queue_name, delay_queue

app = Celery("pool-unit", broker="memory://", backend="cache+memory://", set_as_current=False)
app.conf.task_routes = {"pool.*": {"queue": "work"}}
QUEUE = "work"


@app.task(base=RareTask, bind=True, name="pool.flaky", max_attempts=3, backoff=[5, 60], retry_on=(ConnectionError,))
def flaky(self, fail_with: str | None = None):
    if fail_with == "down":
        raise ConnectionError("down")
    if fail_with == "bug":
        raise Bug("never works")
    if fail_with == "other":
        raise KeyError("not retried")
    if fail_with == "hop":
        raise Hop("pool.other", reason="card expired")
    if fail_with == "ask":
        raise self.retry(countdown=7)
    return "ok"


@app.task(base=RareTask, bind=True, name="pool.other")
def other(self, *args, **kwargs):
    return "other"


@app.task(base=RareTask, bind=True, name="pool.fallback_user", max_attempts=1, fallback="pool.other")
def fallback_user(self):
    raise ConnectionError("down")


@pytest.fixture
def sent(monkeypatch):
    """The copies the pool process publishes, in order (the publisher records them and confirms)."""
    copies: list = []
    monkeypatch.setattr(attempt, "send_patiently", lambda app, copy, **kw: copies.append(copy))
    monkeypatch.setattr(attempt, "ROUTING_PAUSE", 0.0)
    return copies


def deliver(task, args=(), kwargs=None, headers=None, retries=0):
    """Run one delivery of ``task`` as the pool process does; return what ended it."""
    task_id = str(uuid.uuid4())
    task.push_request(id=task_id, args=list(args), kwargs=kwargs or {}, retries=retries, hostname="unit@host",
                      called_directly=False, is_eager=False,
                      headers={hdr.FIRST_AT: time.time(), **(headers or {})},
                      delivery_info={"rare_queue": QUEUE, "routing_key": QUEUE, "exchange": ""})
    try:
        return attempt.run(task, list(args), kwargs or {})
    except BaseException as outcome:  # noqa: BLE001 - the outcome is what the test looks at
        return outcome
    finally:
        task.pop_request()


def test_a_success_publishes_nothing(sent):
    assert deliver(flaky) == "ok" and sent == []


def test_a_retryable_failure_goes_to_the_delay_queue_of_its_backoff(sent):
    outcome = deliver(flaky, ("down",))
    assert isinstance(outcome, Retry) and len(sent) == 1
    copy = sent[0]
    assert copy.target.name == delay_queue(5000).name and copy.returns_to == QUEUE
    assert copy.routing_key == QUEUE and copy.headers["BCC"] == [delay_queue(5000).routing_key]
    assert copy.headers[hdr.ATTEMPT] == 2 and copy.headers["retries"] == 1
    assert copy.headers[hdr.EXCEPTION] == "builtins.ConnectionError" and copy.headers[hdr.ERROR] == "down"
    assert copy.headers[hdr.DUE] >= time.time() + 4


def test_the_last_attempt_goes_to_the_bug_queue_exhausted(sent):
    outcome = deliver(flaky, ("down",), headers={hdr.ATTEMPT: 3})
    assert isinstance(outcome, ConnectionError)
    (copy,) = sent
    assert copy.target.name == bug_queue_name(QUEUE)
    assert copy.headers[hdr.REASON] == "exhausted" and copy.headers[hdr.ATTEMPTS] == 3
    assert hdr.DUE not in copy.headers


@pytest.mark.parametrize(("fail_with", "reason"), [("bug", "bug"), ("other", "bug")])
def test_a_bug_goes_to_the_bug_queue_at_once(sent, fail_with, reason):
    deliver(flaky, (fail_with,))
    (copy,) = sent
    assert copy.target.name == bug_queue_name(QUEUE) and copy.headers[hdr.REASON] == reason
    assert copy.headers[hdr.ATTEMPTS] == 1


def test_wrong_arguments_are_a_bug_not_a_retry(sent):
    outcome = deliver(flaky, ("down", "extra", "args"))
    assert isinstance(outcome, TypeError) and sent[0].headers[hdr.REASON] == "bug"


def test_a_hop_goes_to_the_targets_queue_as_its_attempt_1(sent):
    outcome = deliver(flaky, ("hop",), headers={hdr.ATTEMPT: 2})
    assert isinstance(outcome, Ignore)
    (copy,) = sent
    assert copy.target.name == QUEUE and copy.headers["task"] == "pool.other"
    assert copy.headers[hdr.ATTEMPT] == 1
    (entry,) = copy.headers[hdr.HOPS]
    assert entry["task"] == "pool.flaky" and entry["reason"] == "card expired" and entry["attempts"] == 2


def test_running_out_with_a_fallback_hops_there(sent):
    deliver(fallback_user)
    (copy,) = sent
    assert copy.headers["task"] == "pool.other" and copy.headers[hdr.HOPS][0]["reason"] == "exhausted"


def test_retry_with_a_countdown_overrides_the_schedule(sent):
    deliver(flaky, ("ask",))
    (copy,) = sent
    assert copy.target.name == delay_queue(7000).name and copy.headers[hdr.ATTEMPT] == 2


def test_nonsense_headers_go_to_the_bug_queue_unrun(sent):
    outcome = deliver(flaky, ("down",), headers={hdr.ATTEMPT: "three"})
    assert isinstance(outcome, hdr.HeaderError)
    assert sent[0].headers[hdr.REASON] == "rejected" and sent[0].headers[hdr.ATTEMPTS] == 1


def test_an_early_arrival_waits_again_unrun_and_uncounted(sent):
    due = time.time() + 30
    outcome = deliver(flaky, ("down",), headers={hdr.DUE: due, hdr.ATTEMPT: 2})
    assert isinstance(outcome, Ignore)
    (copy,) = sent
    assert copy.returns_to == QUEUE and copy.headers[hdr.ATTEMPT] == 2 and copy.headers[hdr.DUE] == due
    assert 29 <= copy.waits <= 30


def test_a_shelf_life_that_ended_goes_to_the_bug_queue_expired_unrun(sent):
    fired = []
    signals.expired.connect(lambda **kw: fired.append(kw["attempts"]), weak=False, sender=flaky)
    deliver(flaky, headers={hdr.DEADLINE: time.time() - 1, hdr.ATTEMPT: 2})
    (copy,) = sent
    assert copy.headers[hdr.REASON] == "expired" and fired == [2]


def test_a_delivery_ends_once(sent):
    """An ending asked for twice (retry(throw=False) then an exception) publishes once."""

    @app.task(base=RareTask, bind=True, name="pool.twice")
    def twice(self):
        self.retry(throw=False)
        raise ConnectionError("after the retry")

    outcome = deliver(twice)
    assert isinstance(outcome, Retry) and len(sent) == 1


def test_a_copy_the_broker_refuses_leaves_the_message_unacked(monkeypatch):
    def refuse(app, copy, **kw):
        raise OSError("connection reset")

    monkeypatch.setattr(attempt, "send_patiently", refuse)
    monkeypatch.setattr(attempt, "ROUTING_PAUSE", 0.0)
    outcome = deliver(flaky, ("down",))
    assert isinstance(outcome, RoutingFailed) and "connection reset" in outcome.why


def test_every_ending_kind_is_built_by_the_endings_module():
    """The kinds the endings module knows are the ones the design names (docs/design.md)."""
    assert {endings.RETRY, endings.WAIT, endings.HOP, endings.BUGS, endings.PUT_BACK, endings.REQUEUE,
            endings.GIVE_BACK, endings.DONE} == {"retry", "wait", "hop", "bugs", "put_back", "requeue", "give_back",
                                                 "done"}
