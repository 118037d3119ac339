"""Issue 24: no message, no header and no dead connection stops a worker or an operator's tool (on the real
broker). The worker side: tests/integration/test_faults.py and test_fuzz.py; the console: test_web.py."""

from __future__ import annotations

import threading
import uuid

import pytest

from rare_celery.tools import bugs
from tests.integration.test_cli import bug_message, cli, drain, one_line_error, publish, script, settled
from tests.support import StallingProxy


@pytest.fixture()
def queue():
    return f"hostile.{uuid.uuid4().hex[:8]}"


def in_thread(fn, timeout: float):
    """``fn()`` in a thread; its result, or an AssertionError when it is still running after ``timeout`` s."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s: it hangs"
    return out[0]


# -- item 3: a connection that goes silent ------------------------------------------------------------

@pytest.mark.parametrize("action", ["requeue", "purge"])
def test_a_silent_connection_ends_the_command_saying_what_was_done(vhost, env, queue, monkeypatch, action):
    """The connection stops answering (not closed) after the 3rd ack left the client: the command ends
    within its read timeout, exit 2, one line saying how many it moved and that one may be in both queues;
    nothing is lost."""
    monkeypatch.setattr(bugs, "READ_TIMEOUT", 1.0)
    n, target = 6, f"{queue}.work"
    publish(vhost.url, queue, [bug_message(queue=target, task_id=f"m{i}") for i in range(n)])
    publish(vhost.url, target, [])
    proxy = StallingProxy(stall_after_acks=3)
    try:
        verb = "requeue-bugs" if action == "requeue" else "purge-bugs"
        ran = in_thread(lambda: cli("--broker", proxy.url(vhost.name), verb, queue, "--all", "--yes"), 30)
        assert proxy.stalled.is_set()
        text = one_line_error(ran)
        assert "the broker stopped answering (nothing for 1 s)" in text, text
        if action == "requeue":
            assert f"stopped after moving 3 messages of {queue}" in text, text
            assert "may now be in both queues" in text, text
        else:
            assert f"stopped after deleting 3 messages of {queue}" in text, text
    finally:
        proxy.close()
    # the broker sees the connection go: what it had handed out and was not acked goes back
    if action == "requeue":
        settled(vhost, queue, n - 2)  # the 3rd one's ack never arrived: it is in both queues
        moved = drain(vhost.url, target)
        assert sorted(m.headers["id"] for m in moved) == ["m0", "m1", "m2"]
    else:
        settled(vhost, queue, n - 2)
    assert sorted(m.headers["id"] for m in drain(vhost.url, queue)) == [f"m{i}" for i in range(2, n)]


def test_a_silent_connection_ends_inspect_bugs(vhost, env, queue, monkeypatch):
    monkeypatch.setattr(bugs, "READ_TIMEOUT", 1.0)
    publish(vhost.url, queue, [bug_message(task_id="one")])
    proxy = StallingProxy(stall_after_acks=0)  # silent from the first ack on: here, at once
    proxy.stalled.set()
    try:
        ran = in_thread(lambda: cli("--broker", proxy.url(vhost.name), "inspect-bugs", queue), 30)
        text = one_line_error(ran)
        assert "cannot connect" in text or "stopped answering" in text, text
    finally:
        proxy.close()
    drain(vhost.url, queue)


# -- item 4: a password with an unescaped / ? # -------------------------------------------------------

@pytest.mark.parametrize("password", ["zqw/xkv7", "zqw?xkv7", "zqw#xkv7", "913/xkv7"])
@pytest.mark.parametrize("run", [cli, script], ids=["runner", "script"])
def test_a_password_with_an_unescaped_character_is_one_line_exit_2_without_it(vhost, run, password):
    ran = run("--broker", f"amqp://guest:{password}@127.0.0.1:5672/{vhost.name}", "inspect-bugs", "q")
    text = one_line_error(ran)
    assert "percent-encoded" in text, text
    for piece in (password, *password.replace("?", "/").replace("#", "/").split("/")):
        assert piece not in text, (piece, text)
