"""A publisher confirm that comes late is waited for, never answered by publishing the same copy again
(issue 23, item 2): a worker whose connections pass through a proxy that holds one confirm back, on
the real broker with a real ``celery worker``."""

from __future__ import annotations

import time

import pytest

from tests.proxy import FaultProxy
from tests.support import HOST, QUORUM_OK, Records, Vhost, Worker, app_module, restore_env, wait_for


@pytest.fixture(scope="module")
def broker():
    v = Vhost()
    yield v
    v.delete()


@pytest.fixture(scope="module")
def proxy():
    host, port = HOST.rsplit(":", 1)
    holder = FaultProxy(host, int(port))
    yield holder
    holder.stop()


@pytest.fixture(scope="module")
def cdir(tmp_path_factory):
    return tmp_path_factory.mktemp("confirms")


@pytest.fixture(scope="module")
def endings(broker, cdir):
    module, saved = app_module("tests.apps.endings", {"RARE_ENDINGS_BROKER": broker.url, "RARE_ENDINGS_DIR": str(cdir)})
    yield module
    restore_env(saved)


@pytest.mark.parametrize(("kind", "pool"), [("classic", "prefork"), ("quorum", "prefork"), ("classic", "solo")])
def test_a_late_confirm_of_a_delayed_start_makes_one_copy(endings, broker, proxy, cdir, kind, pool):
    """The worker's main process sends a delayed start to its delay queue; the broker's confirm comes 8 s
    later (its publishes wait 5 s): the worker waits for it on the same channel. Before, kombu took
    the timeout for a lost connection and published the copy again: the task ran twice."""
    if kind == "quorum" and not QUORUM_OK:
        pytest.skip("quorum work queues need Celery 5.5+")
    proxied = broker.url.replace(HOST, f"127.0.0.1:{proxy.port}")
    queue = "endings" if kind == "classic" else "endings.q"
    worker = Worker("tests.apps.endings", [queue], {"RARE_ENDINGS_BROKER": proxied, "RARE_ENDINGS_DIR": str(cdir)},
                    cdir, name=f"confirms-{kind}-{pool}", pool=pool, concurrency=1).wait_ready()
    try:
        records = Records(cdir)
        proxy.hold(8.0)
        held_before = proxy.held
        result = endings.TASKS[kind]["work"].apply_async(("ok",), countdown=3)
        assert result.get(timeout=40) == ["ok", 1]
        assert proxy.held == held_before + 1  # the confirm was held back
        # a second copy, had one been published, would be due within 4 s: it must not run in that time
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert len(records.of(result.id, "run")) == 1, records.of(result.id, "run")
            time.sleep(0.1)
        wait_for(lambda: "waiting up to" in worker.text(), 5, what="the worker to say it waits for the confirm")
    finally:
        worker.stop()
