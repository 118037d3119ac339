"""Eager runs (``task.apply()``, ``task_always_eager``) follow the policy without waiting out delays
(issue 10, item 12). No broker is involved in an eager run, so none is used here."""

from __future__ import annotations

import pytest
from celery import Celery

from rare_celery import Bug, Hop, RareTask

app = Celery("eager-test", broker="memory://", backend="cache+memory://")
app.conf.task_always_eager = True
app.conf.task_eager_propagates = True
runs: list[tuple[str, int]] = []


@app.task(base=RareTask, bind=True, name="eager.flaky", max_attempts=4, backoff=[60, 3600])
def flaky(self, fails: int):
    runs.append((self.name, self.attempt))
    if self.attempt <= fails:
        raise ConnectionError(f"down on attempt {self.attempt}")
    return self.attempt


@app.task(base=RareTask, bind=True, name="eager.buggy", max_attempts=5)
def buggy(self):
    runs.append((self.name, self.attempt))
    raise Bug("never works")


@app.task(base=RareTask, bind=True, name="eager.picky", max_attempts=5, retry_on=(ConnectionError,))
def picky(self):
    runs.append((self.name, self.attempt))
    raise KeyError("not retried")


@app.task(base=RareTask, bind=True, name="eager.asks", max_attempts=200, backoff=1)
def asks(self):
    runs.append((self.name, self.attempt))
    raise self.retry(countdown=5)


@app.task(base=RareTask, bind=True, name="eager.shelf", max_attempts=None, backoff=10, expires_in=35)
def shelf(self):
    runs.append((self.name, self.attempt))
    raise TimeoutError("still down")


@app.task(base=RareTask, bind=True, name="eager.rescue", max_attempts=2)
def rescue(self, value):
    runs.append((self.name, self.attempt))
    return f"rescued {value}"


@app.task(base=RareTask, bind=True, name="eager.doomed", max_attempts=2, fallback="eager.rescue")
def doomed(self, value):
    runs.append((self.name, self.attempt))
    raise ConnectionError("down")


@app.task(base=RareTask, bind=True, name="eager.hopper", max_attempts=3)
def hopper(self, value):
    runs.append((self.name, self.attempt))
    raise Hop("eager.rescue", value * 2, reason="moved")


@app.task(base=RareTask, bind=True, name="eager.auto", max_attempts=3, backoff=1, autoretry_for=(ValueError,))
def auto(self):
    runs.append((self.name, self.attempt))
    if self.attempt < 3:
        raise ValueError("again")
    return "auto"


@pytest.fixture(autouse=True)
def clear():
    runs.clear()


def test_retries_follow_the_policy_without_waiting():
    assert flaky.delay(2).get() == 3
    assert runs == [("eager.flaky", 1), ("eager.flaky", 2), ("eager.flaky", 3)]


def test_the_last_attempt_raises_the_final_exception():
    with pytest.raises(ConnectionError, match="down on attempt 4"):
        flaky.delay(99).get()
    assert len(runs) == 4


def test_bug_and_exceptions_outside_retry_on_run_once():
    with pytest.raises(Bug):
        buggy.delay().get()
    with pytest.raises(KeyError):
        picky.delay().get()
    assert runs == [("eager.buggy", 1), ("eager.picky", 1)]


def test_self_retry_does_not_recurse():
    with pytest.raises(Exception, match="exhausted after 200 attempts"):
        asks.delay().get()
    assert len(runs) == 200  # no RecursionError: one loop, not 200 nested calls


def test_shelf_life_ends_on_the_schedule_s_clock():
    with pytest.raises(TimeoutError):
        shelf.delay().get()
    assert len(runs) == 4  # at 0, 10, 20, 30 s; 40 s would be past the 35 s shelf life


def test_fallback_and_hop_run_their_target():
    assert doomed.delay("x").get() == "rescued x"
    assert runs == [("eager.doomed", 1), ("eager.doomed", 2), ("eager.rescue", 1)]
    runs.clear()
    assert hopper.delay("y").get() == "rescued yy"
    assert runs == [("eager.hopper", 1), ("eager.rescue", 1)]


def test_autoretry_goes_through_the_policy():
    assert auto.apply().get() == "auto"
    assert [a for _, a in runs] == [1, 2, 3]
