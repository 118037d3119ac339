"""The same core behaviour on a quorum work queue: quorum delay and bug queues, at-least-once
dead-lettering back to the work queue."""

from __future__ import annotations

import celery
import pytest
from celery import Celery
from kombu import Queue

from tests.support import Worker

pytestmark = pytest.mark.skipif(
    tuple(int(p) for p in celery.__version__.split(".")[:2]) < (5, 5),
    reason="Celery < 5.5 consumes with global QoS, which quorum queues refuse")


@pytest.fixture(scope="module")
def quorum_worker(core, env, workdir):
    worker = Worker("tests.apps.core", ["core.quorum"], {**env, "RARE_TEST_QUORUM": "1"}, workdir,
                    name="quorum").wait_ready()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def publisher(env, workdir, quorum_worker):
    """A client app that knows core.quorum as a quorum queue (as the worker's app does)."""
    app = Celery("client", broker=env["RARE_TEST_BROKER"], backend=f"tests.support:AtomicFS+file://{workdir}/results",
                 set_as_current=False)
    app.conf.task_queues = [Queue("core.quorum", queue_arguments={"x-queue-type": "quorum"})]
    return app


def test_retries_and_bug_queue_on_a_quorum_work_queue(publisher, events, bugs, vhost):
    ok = publisher.send_task("core.flaky", args=[1], queue="core.quorum")
    bad = publisher.send_task("core.always", queue="core.quorum")
    assert ok.get(timeout=15) == ["ok", 2]
    first, second = events.of(ok.id, "run")
    assert second["t"] - first["t"] >= 1.0

    with pytest.raises(ConnectionError):
        bad.get(timeout=15)
    assert len(events.of(bad.id, "run")) == 3
    assert bugs.find("core.quorum.bugs", bad.id).headers["x-rare-reason"] == "exhausted"

    from tests.support import rabbitmqctl
    types = dict(line.split("\t")[:2] for line in
                 rabbitmqctl("list_queues", "-p", vhost.name, "--no-table-headers", "name", "type").splitlines())
    assert types["core.quorum.bugs"] == "classic"  # people read bug queues: classic keeps their order
    assert types["rare.wait.quorum.1s"] == "quorum"
    assert types["rare.wait.quorum.300ms"] == "quorum"
