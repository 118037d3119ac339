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
