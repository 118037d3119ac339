"""Issue 24: no message, no header and no dead connection stops a worker or an operator's tool (on the real
broker). The worker side: tests/integration/test_faults.py and test_fuzz.py; the console: test_web.py."""

from __future__ import annotations

import sys
import threading
import uuid

import pytest
from kombu import Connection

from rare_celery.tools import bugs
from tests.integration.test_cli import bug_message, cli, drain, one_line_error, publish, script, settled
from tests.support import StallingProxy, wait_for


@pytest.fixture()
def queue():
    return f"hostile.{uuid.uuid4().hex[:8]}.bugs"  # the tools read bug queues only


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
    ran = run("--broker", f"amqp://guest:{password}@127.0.0.1:5672/{vhost.name}", "inspect-bugs", "q.bugs")
    text = one_line_error(ran)
    assert "percent-encoded" in text, text
    for piece in (password, *password.replace("?", "/").replace("#", "/").split("/")):
        assert piece not in text, (piece, text)


# -- item 2: a header nested ~1,500 deep at the head of a bug queue --------------------------------------

def deep_message(depth: int, task_id: str):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return bug_message(task_id=task_id, extra={"x-deep": value})


def test_a_deeply_nested_header_at_the_head_does_not_stop_the_tools(vhost, env, queue):
    """inspect-bugs lists it and what is behind it, requeue-bugs moves it, purge-bugs deletes it; the
    console reads the queue and shows the header as unreadable."""
    target = f"{queue}.work"
    messages = [deep_message(1500, "deep"), bug_message(task_id="second", queue=target),
                bug_message(task_id="third", queue=target)]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # to encode it here; the tools below run with the limit they set
    try:
        publish(vhost.url, queue, messages)
    finally:
        sys.setrecursionlimit(limit)
    publish(vhost.url, target, [])
    ran = cli("--broker", vhost.url, "inspect-bugs", queue, "--json")
    assert ran.code == 0, ran.err
    assert [r["id"] for r in ran.json_lines()] == ["deep", "second", "third"]
    settled(vhost, queue, 3)

    from rare_celery.tools.web import reading
    from tests.web_support import console_client  # the console, in process

    with console_client(vhost.url) as client:
        with Connection(vhost.url) as conn:
            snap = reading.scan(conn, queue)
        assert [e.id for e in snap.entries] == ["deep", "second", "third"]
        page = client.get(f"/message?q={queue}&fp={snap.entries[0].fingerprint}")
        assert page.status_code == 200, page.text[:2000]
        assert "unreadable: nested deeper than 32 levels" in page.text
    settled(vhost, queue, 3)

    ran = cli("--broker", vhost.url, "requeue-bugs", queue, "--all", "--to", target, "--yes")
    assert ran.code == 0, ran.err
    assert f"requeued 3 messages from {queue}" in ran.out
    assert sorted(m.headers["id"] for m in drain(vhost.url, target)) == ["deep", "second", "third"]
    sys.setrecursionlimit(10_000)
    try:
        publish(vhost.url, queue, messages)  # again, for the purge
    finally:
        sys.setrecursionlimit(limit)
    ran = cli("--broker", vhost.url, "purge-bugs", queue, "--all", "--yes")
    assert ran.code == 0 and f"deleted 3 messages from {queue}" in ran.out, ran.err
    settled(vhost, queue, 0)


# -- item 8: task arguments on the message page go through the control-character filter -------------------

def test_task_arguments_on_the_message_page_show_control_characters_as_escapes(vhost, env, queue):
    from tests.web_support import console_client

    publish(vhost.url, queue, [bug_message(args=["tab\u202eexe.txt", "\x1b[2J"], task_id="rlo")])
    with console_client(vhost.url) as client:
        with Connection(vhost.url) as conn:
            from rare_celery.tools.web import reading

            snap = reading.scan(conn, queue)
        page = client.get(f"/message?q={queue}&fp={snap.entries[0].fingerprint}")
        assert page.status_code == 200
        text = page.get_data(as_text=True)
        assert "\u202e" not in text and "\x1b" not in text
        assert "tab\\u202eexe.txt" in text
    drain(vhost.url, queue)


# -- item 5: the console answers only to whoever has the address it printed ---------------------------------

def test_the_console_needs_the_token_it_printed_and_says_it_can_purge_any_queue(vhost, env):
    from tests.web_support import WebServer

    server = WebServer("--broker", vhost.url)
    try:
        assert server.token and len(server.token) >= 24
        stranger = {"Cookie": "x=1"}  # another local process: it knows the port, not the token
        assert server.get("/", **stranger).status == 403
        assert server.get("/queue?q=anything", **stranger).status == 403
        assert server.get("/?token=" + "x" * len(server.token), **stranger).status == 403
        assert server.post("/plan", {"q": "work", "do": "purge:matching", "everything": "yes"}, **stranger).status == 403
        assert server.get("/metrics", **stranger).status == 200  # read only, for scrapers
        first = server.get(server.start_url[len(server.url):], **stranger)  # a browser opening the printed address
        assert first.status == 302 and first.headers["Location"].endswith("/")
        cookie = first.headers["Set-Cookie"]
        assert server.token in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        page = server.get("/")  # with the cookie
        assert page.status == 200 and 'id="any-queue"' in page.text and "live work queues" in page.text
    finally:
        out = server.stop()
    assert "can read, requeue from and purge any queue" in out


@pytest.mark.parametrize("where", ["anywhere", "mid-frame"])
def test_a_silent_connection_ends_the_consoles_read_and_lets_go_of_the_queue(vhost, env, queue, monkeypatch, where):
    """The console reads through a connection that goes silent mid-read: the read fails within its
    timeouts, says why, and the queue's lock is free again (before: the read, and the lock, for ever).
    Mid-frame (a message's body half arrived) is where py-amqp alone retries its read for ever."""
    from rare_celery.tools.cli import Env
    from rare_celery.tools.web.server import build

    monkeypatch.setattr(bugs, "READ_TIMEOUT", 1.0)
    publish(vhost.url, queue, [bug_message(task_id=f"m{i}", error="e" * 2000) for i in range(3000)])
    proxy = StallingProxy()
    try:
        _, console, _ = build(Env(None, proxy.url(vhost.name)), None, True, events=False)
        _, job = console.snapshot(queue)
        wait_for(lambda: job.progress.done > 0 or job.state != "running", 20, 0.01, "the read to start")
        (proxy.cut if where == "mid-frame" else proxy.stalled).set()
        assert console.wait(job, 20), "the read still runs"
        assert proxy.stalled.is_set()
        assert job.state == "failed" and "the broker stopped answering (nothing for 1 s)" in job.error, job.error
        lock = console.queue_lock(queue)
        assert lock.acquire(timeout=1)
        lock.release()
    finally:
        proxy.close()
    settled(vhost, queue, 3000)
    drain(vhost.url, queue)


def test_a_connection_silent_mid_frame_ends_inspect_bugs(vhost, env, queue, monkeypatch):
    """inspect-bugs reading a long queue; the broker's bytes stop in the middle of a frame: the command
    ends within its read timeout, exit 2, one line (before: py-amqp retried the read for ever, at full
    speed); every message is still in the queue."""
    monkeypatch.setattr(bugs, "READ_TIMEOUT", 1.0)
    publish(vhost.url, queue, [bug_message(task_id=f"m{i}", error="e" * 2000) for i in range(2000)])
    proxy = StallingProxy(cut_after=500_000)  # in the 200th message or so
    try:
        ran = in_thread(lambda: cli("--broker", proxy.url(vhost.name), "inspect-bugs", queue, "--json"), 30)
        assert proxy.stalled.is_set()
        assert "the broker stopped answering (nothing for 1 s)" in one_line_error(ran)
    finally:
        proxy.close()
    settled(vhost, queue, 2000)
    drain(vhost.url, queue)
