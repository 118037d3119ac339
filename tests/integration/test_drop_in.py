"""Adopting rare_celery by setting ``task_cls`` on code written for Celery: what that code relies on
keeps working (Celery's own integration suite is the long version: ``make test-celery-suite``)."""

from __future__ import annotations

import json

import pytest
from celery import chord

from rare_celery.inventory import is_rare
from tests.support import Worker, app_module, restore_env, wait_for


@pytest.fixture(scope="module")
def drop_in(env):
    module, saved = app_module("tests.apps.drop_in", env)
    yield module
    restore_env(saved)


@pytest.fixture(scope="module", autouse=True)
def worker(drop_in, env, workdir):
    worker = Worker("tests.apps.drop_in", ["dropin"], env, workdir, name="dropin").wait_ready()
    yield worker
    worker.stop()


def runs(drop_in, task_id: str) -> list[dict]:
    with open(drop_in.EVENTS) as f:
        return [r for r in map(json.loads, f) if r["id"] == task_id]


@pytest.mark.parametrize("kwargs, expected", [({"foo": 1, "bar": 5}, [2, 5]), ({"foo": 1, "bar": -1}, [11, -1])])
def test_retry_with_new_args_or_kwargs_merges_them_as_celery_does(drop_in, kwargs, expected):
    call = {"kwargs": kwargs} if expected[1] >= 0 else {"args": [kwargs["foo"], kwargs["bar"]]}
    result = drop_in.reargs.apply_async(**call)
    assert result.get(timeout=20) == expected  # not "got multiple values for argument 'foo'"
    assert [r["attempt"] for r in runs(drop_in, result.id)] == [1, 2]


def test_reject_requeue_is_a_requeue_not_a_lost_worker(drop_in, worker):
    result = drop_in.requeue.delay()
    assert result.get(timeout=20) == "back"
    first, second = runs(drop_in, result.id)
    assert (first["attempt"], second["attempt"]) == (1, 1)  # no attempt counted
    assert not first["redelivered"] and second["redelivered"]  # as Celery shows a requeued message
    assert "put back" not in worker.text() and "worker_lost" not in worker.text()


def test_a_task_keeps_its_own_attempt_attribute(drop_in):
    assert drop_in.own_attempt.delay().get(timeout=20) == [42, 1]


def test_builtin_tasks_keep_celerys_behaviour(drop_in):
    """celery.chord_unlock polls a chord's header with unlimited retries (1 s apart): a header that
    takes 7 s needs more than RareTask's 5 attempts; it stays Celery's own task."""
    assert not is_rare(drop_in.app.tasks["celery.chord_unlock"]) and is_rare(drop_in.total)
    assert drop_in.app.tasks["celery.chord_unlock"].max_retries is None
    result = chord([drop_in.slow_add.s(1, 7), drop_in.slow_add.s(2, 0)])(drop_in.total.s())
    assert result.get(timeout=40) == 3


def test_inspect_active_shows_celerys_own_fields(drop_in):
    """``celery inspect active``: the request as Celery shows it (rare_celery's bookkeeping kept out of
    ``delivery_info``); ``acknowledged`` is False: RareTask acks late (a documented difference)."""
    result = drop_in.slow_add.delay(5, 3)

    def active():
        replies = drop_in.app.control.inspect(timeout=1).active() or {}
        return next((r for rs in replies.values() for r in rs if r["id"] == result.id), None)
    request = wait_for(active, 20, 0.2, "the task in inspect active")
    assert request["name"] == "dropin.slow_add" and request["acknowledged"] is False
    assert "rare_queue" not in request["delivery_info"] and request["delivery_info"]["routing_key"] == "dropin"
    assert result.get(timeout=20) == 5
