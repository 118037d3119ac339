"""Putting a message back from the worker's main process (rare_celery.worker.request.put_back)."""

from __future__ import annotations

from rare_celery import context
from rare_celery.message import Delivery
from rare_celery.worker.request import put_back


def test_a_refused_put_back_leaves_the_message_and_its_later_reject_never_raises(monkeypatch):
    """The broker is unreachable: the message is not acked, a reject is scheduled on the consumer's
    timer, and when that runs after the connection it came on was lost (the reject raises), nothing
    escapes into the event loop, where it would restart a healthy consumer."""
    import socket

    from celery import Celery
    from kombu import Message

    from rare_celery import RareTask, endings

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Celery("put-back", broker=f"amqp://guest:guest@127.0.0.1:{port}//", set_as_current=False)
    app.conf.broker_connection_timeout = 0.5

    def t(self):
        return None

    task = app.task(base=RareTask, name="put-back.t", bind=True)(t)
    scheduled, acked, rejects = [], [], []
    ctx = context.start(app)  # the worker's context, as its bootstep makes it
    ctx.timer = type("Timer", (), {"call_after": lambda self, secs, fun, args=(): scheduled.append((secs, fun, args))})()

    def reject_on_a_closed_connection():
        rejects.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    message = Message(body=b"[[], {}, {}]", headers={"id": "t-1", "task": "put-back.t"},
                      content_type="application/json", content_encoding="utf-8")
    try:
        put_back(Delivery.received(app, task, message, "somewhere"), "redelivered",
                 ack=lambda: acked.append(1), requeue=reject_on_a_closed_connection,
                 reporter=endings.Reporter(send=None, celery_reports=True, stores=False))
    finally:
        context.stop(app)
    assert acked == [] and rejects == [] and len(scheduled) == 1
    secs, fun, args = scheduled[0]
    assert secs >= 1
    fun(*args)  # what the timer does later: must not raise
    assert rejects == [1]


def test_a_success_is_kept_before_its_ack_by_the_request_class_celery_makes(monkeypatch):
    """Celery's worker makes a subclass of the task's request class with its own ``on_success`` (it
    does not call ours): a success is still kept by the process (endings.ended_here) before the ack,
    and a failure is not."""
    from celery import Celery
    from celery.worker.request import create_request_cls
    from kombu import Message

    from rare_celery import RareTask, endings
    from rare_celery import headers as hdr
    from rare_celery.worker.request import RareRequest

    app = Celery("kept-here", broker="memory://", set_as_current=False)

    def t(self):
        return None

    task = app.task(base=RareTask, name="kept-here.t", bind=True, acks_late=True)(t)
    done = []
    monkeypatch.setattr(endings, "ended_here", lambda headers, how: done.append(("kept", headers[hdr.COPY], how)))
    pool = type("Pool", (), {"apply_async": None})()
    cls = create_request_cls(RareRequest, task, pool=pool, hostname="w@h", eventer=None, app=app)
    assert cls.on_success is not RareRequest.on_success

    def request(copy: str) -> RareRequest:
        message = Message(body=b"[[], {}, {}]", headers={"id": copy, "task": task.name, hdr.COPY: copy},
                          content_type="application/json", content_encoding="utf-8")
        req = cls(message, on_ack=lambda *a: done.append(("acked", copy)), app=app, task=task, hostname="w@h")
        monkeypatch.setattr(req, "acknowledge", lambda: done.append(("acked", copy)))
        return req

    request("c-ok").on_success((0, "result", 0.01))
    assert done == [("kept", "c-ok", endings.SUCCESS), ("acked", "c-ok")]
    done.clear()
    failed = request("c-failed")
    monkeypatch.setattr(failed, "on_failure", lambda *a, **k: done.append(("failed", "c-failed")))
    failed.on_success((1, type("Info", (), {"exception": ValueError("x")})(), 0.01))
    assert done == [("failed", "c-failed")]


def test_a_delivery_whose_handed_ending_is_on_its_way_ends_here_until_it_settles(monkeypatch):
    """A retry handed to the main process is no longer Celery's active request while its copy waits for
    the broker's confirm: the same copy put back meanwhile must wait too (ends_here), until the ending
    settles, and never longer than HANDING_LIMIT (a settling that never comes leaves nothing stuck)."""
    import time

    from celery import Celery
    from kombu import Message

    from rare_celery import headers as hdr
    from rare_celery.worker import request

    app = Celery("held", set_as_current=False)
    message = Message(body=b"[[], {}, {}]", headers={"id": "t-1", "task": "held.t", hdr.COPY: "copy-1"},
                      content_type="application/json", content_encoding="utf-8")
    d = Delivery.received(app, None, message, "q")
    assert not request.ends_here(d)
    over = request._handing("copy-1")
    assert request.ends_here(d)
    over()
    assert not request.ends_here(d)
    request._handing("copy-1")
    later = time.monotonic() + request.HANDING_LIMIT + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert not request.ends_here(d)
    monkeypatch.undo()
    assert "copy-1" not in request._HANDED
