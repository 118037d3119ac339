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


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_failed_attempt_does_not_wait_for_its_retrys_confirm(endings, broker, proxy, cdir, pool):
    """Issue 28: the retry's copy is published by the worker's main process, its confirm read when it
    comes. While the broker's confirm of attempt 1's retry is held back (6 s), the one pool process (or the
    solo worker) runs the next task at once; attempt 2 runs too (the broker has its copy), and attempt 1's
    message stays unacked until the confirm comes, then is acked. Before, the pool process waited for the
    confirm: the next task waited 6 s."""
    proxied = broker.url.replace(HOST, f"127.0.0.1:{proxy.port}")
    worker = Worker("tests.apps.endings", ["endings"], {"RARE_ENDINGS_BROKER": proxied, "RARE_ENDINGS_DIR": str(cdir)},
                    cdir, name=f"confirms-free-{pool}", pool=pool, concurrency=1).wait_ready()
    try:
        records = Records(cdir)
        work = endings.TASKS["classic"]["work"]
        proxy.hold(6.0)
        held_before = proxy.held
        failing = work.delay("flaky")
        wait_for(lambda: records.of(failing.id, "run"), 10, what="attempt 1")
        started = time.monotonic()
        after = work.delay("ok")
        assert after.get(timeout=4) == ["ok", 1]  # well within the 6 s the confirm is held
        assert failing.get(timeout=4) == ["flaky", 2]  # its copy was in its delay queue at once
        assert time.monotonic() - started < 4.5
        assert proxy.held == held_before + 1  # attempt 1's retry confirm is the one held back
        assert broker.queue_stats()["endings"]["unacked"] == 1  # attempt 1: not acked before its copy's confirm
        wait_for(lambda: broker.queue_stats()["endings"]["unacked"] == 0, 15, 0.2, what="the confirm, then the ack")
        assert [r["att"] for r in records.of(failing.id, "run")] == [1, 2]
    finally:
        worker.stop()
