"""``with bulk(app):`` - many RareTask publishes, their confirms awaited together, on the real broker."""

from __future__ import annotations

import uuid

import pytest
from amqp.exceptions import MessageNacked
from celery import Celery
from kombu import Connection, Queue
from kombu.exceptions import OperationalError

from rare_celery import PublishRefused, RareTask, bulk


def send(i):
    return i


@pytest.fixture
def app(vhost):
    app = Celery(f"bulk-{uuid.uuid4().hex[:6]}", broker=vhost.url)
    app.conf.task_default_queue = f"bulk-{uuid.uuid4().hex[:8]}"
    app.task(base=RareTask, name="bulk.send")(send)
    app.task(name="bulk.plain")(send)
    yield app
    app.close()


def queue_ids(url: str, name: str) -> list[str]:
    """The task ids a queue holds, in order (read, never acked, then put back by closing)."""
    with Connection(url) as conn:
        channel = conn.channel()
        ids = []
        while (message := channel.basic_get(name, no_ack=False)) is not None:
            ids.append(message.headers["id"])
        channel.close()
    return ids


def declare(app, url: str, **arguments) -> None:
    """The app's queue, declared as Celery declares it when it publishes (with ``arguments``)."""
    queue = Queue(app.conf.task_default_queue, durable=True, queue_arguments=arguments or None)
    app.conf.task_queues = [queue]
    with Connection(url) as conn:
        queue.bind(conn.default_channel).declare()


def test_every_task_published_in_bulk_is_in_its_queue_once(app, vhost):
    name = app.conf.task_default_queue
    declare(app, vhost.url)
    with bulk(app):
        ids = [app.tasks["bulk.send"].delay(i).id for i in range(500)]
        plain = app.tasks["bulk.plain"].delay(0).id  # not a RareTask: published (and confirmed) on its own
    held = queue_ids(vhost.url, name)
    assert sorted(held) == sorted([*ids, plain])
    assert [i for i in held if i != plain] == ids  # one channel: in the order they were published
    with Connection(vhost.url) as conn:
        Queue(name).bind(conn.default_channel).delete()


def test_what_the_broker_refuses_is_named_by_task_id(app, vhost):
    """A queue that takes 10 messages and nacks the rest (max-length, reject-publish): the block
    raises PublishRefused whose task_ids are exactly the tasks that are not in the queue."""
    task = app.tasks["bulk.send"]
    name = app.conf.task_default_queue
    declare(app, vhost.url, **{"x-max-length": 10, "x-overflow": "reject-publish"})
    ids = []
    refused_text = "15 of 25 tasks published in bulk were not confirmed"
    with pytest.raises(PublishRefused, match=refused_text) as refused, bulk(app):
        ids.extend(task.delay(i).id for i in range(25))
    held = queue_ids(vhost.url, name)
    assert held == ids[:10]
    assert refused.value.task_ids == ids[10:]
    with Connection(vhost.url) as conn:
        Queue(name).bind(conn.default_channel).delete()


def test_a_block_that_raises_raises_its_own_error(app):
    task = app.tasks["bulk.send"]
    with pytest.raises(KeyError, match="the caller's"), bulk(app):
        task.delay(1)
        raise KeyError("the caller's")


def test_outside_the_block_each_publish_is_confirmed_again(app, vhost):
    task = app.tasks["bulk.send"]
    name = app.conf.task_default_queue
    declare(app, vhost.url, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    with bulk(app):
        task.delay(1)
    with pytest.raises(OperationalError) as refused:  # the second one, on its own: refused at once
        task.delay(2)
    assert isinstance(refused.value.__cause__, MessageNacked)
    with Connection(vhost.url) as conn:
        Queue(name).bind(conn.default_channel).delete()


def test_tasks_published_in_bulk_run_and_retry_as_any_other(core, core_worker):
    with bulk(core.app):
        results = [core.flaky.delay(1) for _ in range(30)]
    assert [r.get(timeout=30) for r in results] == [["ok", 2]] * 30
