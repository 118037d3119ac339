"""What RabbitMQ 4.x does to a RareTask on a quorum work queue, with a worker of tests/apps/locks.py
(prefork, -c 1, prefetch multiplier 1) on a vhost of its own:

* a task longer than the queue's consumer timeout (RabbitMQ 4.3: quorum queues enforce it; here a
  ``consumer-timeout`` policy of 2 s) runs once: rare_celery consumes with ``x-consumer-timeout`` set
  to cover its hard time limit (rare_celery/locks.py); a task without one is named in a warning;
* a message that keeps coming back (the worker's connection closed under it, on a queue with a
  ``delivery-limit`` policy of 1) is not dropped by the broker: each redelivery is put back as a new
  message, whose delivery count starts again;
* Celery's native delayed delivery (5.5+) is left out: no ``celery_delayed_*`` queue or exchange in the vhost.
"""

from __future__ import annotations

import pytest
from kombu import Connection

from tests.support import (
    QUORUM_OK,
    Events,
    Vhost,
    Worker,
    app_module,
    close_connections,
    message_count,
    rabbitmqctl,
    restore_env,
    wait_for,
)

pytestmark = pytest.mark.skipif(not QUORUM_OK, reason="Celery < 5.5 consumes with global QoS, which quorum queues refuse")


@pytest.fixture(scope="module")
def lvhost():
    v = Vhost()
    yield v
    v.delete()


@pytest.fixture(scope="module")
def version(lvhost) -> tuple[int, ...]:
    with Connection(lvhost.url) as conn:
        conn.ensure_connection(max_retries=3)
        text = str(conn.connection.server_properties.get("version", "0"))
    return tuple(int(p) for p in text.split("+")[0].split("-")[0].split(".")[:2] if p.isdigit())


@pytest.fixture(scope="module")
def lenv(lvhost, tmp_path_factory):
    return {"RARE_LOCKS_BROKER": lvhost.url, "RARE_LOCKS_DIR": str(tmp_path_factory.mktemp("locks"))}


@pytest.fixture(scope="module")
def locks(lenv):
    module, saved = app_module("tests.apps.locks", lenv)
    yield module
    restore_env(saved)


@pytest.fixture(scope="module")
def worker(locks, lenv, lvhost, version, tmp_path_factory):
    if version >= (4, 3):  # the broker takes a delivery back after 2 s, unless the consumer says otherwise
        rabbitmqctl("set_policy", "-p", lvhost.name, "short-lock", r"^locks\.q$", '{"consumer-timeout": 2000}',
                    "--apply-to", "queues")
    rabbitmqctl("set_policy", "-p", lvhost.name, "one-return", r"^locks\.limited$", '{"delivery-limit": 1}',
                "--apply-to", "queues")
    w = Worker("tests.apps.locks", ["locks.q", "locks.free", "locks.limited"], lenv,
               tmp_path_factory.mktemp("locks-worker"), name="locks", concurrency=1).wait_ready()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def events(lenv):
    return Events(__import__("pathlib").Path(lenv["RARE_LOCKS_DIR"]) / "events.jsonl")


def test_the_worker_names_its_consumer_timeouts_and_the_task_without_a_time_limit(worker):
    text = worker.text()
    assert "consuming locks.q with x-consumer-timeout 90 s" in text  # 1 x 30 s + 60 s
    assert "consuming locks.limited with x-consumer-timeout 90 s" in text
    assert "locks.free is a quorum queue and locks.free has no hard time limit" in text


def test_a_task_longer_than_the_queues_consumer_timeout_runs_once(worker, locks, events, version):
    if version < (4, 3):
        pytest.skip("quorum queues enforce a consumer timeout from RabbitMQ 4.3 (the policy is refused on 3.10)")
    result = locks.long.delay(6)  # three times the queue's 2 s consumer timeout
    assert result.get(timeout=30) == "done"
    assert len(events.of(result.id, "run")) == 1
    lines = [line for line in worker.text().splitlines() if result.id in line or "Couldn't ack" in line]
    assert not [line for line in lines if "put back" in line or "Couldn't ack" in line], lines


def test_a_message_that_keeps_coming_back_is_not_dropped_at_the_delivery_limit(worker, locks, events, lvhost):
    """The broker counts every return of a quorum queue's message (a channel closed with it unacked) and
    drops it past the limit (1 here, 20 by default on 4.x), having no dead-letter target. rare_celery
    puts a redelivered message back as a new message (``x-rare-deliveries`` one higher), so each return
    counts from zero again; past 5 deliveries without an end it would go to the bug queue."""
    result = locks.back.delay(20)  # two connections closed while it runs (rabbitmqctl takes seconds on a busy machine)
    wait_for(lambda: events.of(result.id, "run"), 20, what="the task to start")
    for n in (1, 2):  # the second return of one message is past a limit of 1
        if n > 1:  # the copy put back is in the worker's hands (unacked, behind the running task)
            wait_for(lambda: message_count(lvhost.url, "locks.limited") == 0, 20, what="the copy to be delivered")
        connected = worker.text().count("Connected to amqp://")
        assert close_connections(lvhost.name, worker.proc.pid, "locks test: connection lost under a delivery") >= 1
        wait_for(lambda c=connected: worker.text().count("Connected to amqp://") > c, 30, what="the worker to reconnect")
        wait_for(lambda n=n: worker.text().count(f"[{result.id}] put back in locks.limited") >= n, 30,
                 what=f"put back {n}")
    assert result.get(timeout=40) == "back"
    ends = lambda: [line for line in worker.text().splitlines()
                    if result.id in line and "came back after it had succeeded" in line]
    wait_for(ends, 30, what="the last copy to be acked as already done")
    assert len(events.of(result.id, "run")) == 1
    with Connection(lvhost.url) as conn:
        channel = conn.channel()
        assert channel.queue_declare("locks.limited.bugs", passive=True).message_count == 0


def test_no_native_delayed_delivery_objects_in_a_rare_apps_vhost(worker, lvhost):
    """Celery 5.5+ declares 28 celery_delayed_* quorum queues and exchanges for a worker with a quorum
    queue, and warns that the direct exchange cannot use them; a rare app never needs them."""
    names = (rabbitmqctl("list_queues", "-p", lvhost.name, "--no-table-headers", "name").split()
             + rabbitmqctl("list_exchanges", "-p", lvhost.name, "--no-table-headers", "name").split())
    assert "locks.q" in names
    assert not [n for n in names if n.startswith("celery_delayed")]
    assert "native delayed delivery" not in worker.text()
