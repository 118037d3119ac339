"""The guarded tracer (rare_celery.request.guard_tracer): whatever Celery's tracer reports for a
RareTask delivery, one that did not end through RareTask._end goes back to the main process as
RoutingFailed, never as an acked failure (no broker: Celery's own trace result types)."""

from __future__ import annotations

from billiard.einfo import ExceptionInfo
from celery.app.trace import TraceInfo, trace_ok_t
from celery.exceptions import Ignore, Reject, Retry

from rare_celery.exceptions import Ended, RoutingFailed
from rare_celery.request import guard_tracer


def einfo(exc: BaseException, internal: bool = False) -> ExceptionInfo:
    try:
        raise exc
    except type(exc):
        return ExceptionInfo(internal=internal)


def tracer(state: str | None, exc: BaseException | None = None, internal: bool = False, end=None):
    """A stand-in for Celery's tracer: reports ``state``; ``end`` is what RareTask._end recorded."""

    def trace(uuid, args, kwargs, request):
        if end is not None:
            request["delivery_info"]["rare_ending"].append(end)
        if state is None:
            return trace_ok_t("ok", None, 0.1, "'ok'")
        return trace_ok_t(einfo(exc, internal), TraceInfo(state, exc), 0.1, None)
    return trace


def run(trace) -> tuple:
    result = guard_tracer(trace)("id-1", [], {}, {})
    info = result.info
    exc = result.retval.exception if info is not None else None
    return (info.state if info is not None else None), getattr(exc, "exc", exc)


def test_a_success_passes():
    assert run(tracer(None)) == (None, None)


def test_an_ending_and_celerys_outcome_for_it_pass():
    assert run(tracer("RETRY", Retry(), end=Retry()))[0] == "RETRY"
    assert run(tracer("IGNORED", Ignore(), internal=True, end=Ignore()))[0] == "IGNORED"
    state, exc = run(tracer("FAILURE", ConnectionError("down"), end=ConnectionError("down")))
    assert state == "FAILURE" and isinstance(exc, ConnectionError)


def test_a_failure_without_an_ending_goes_back_as_routing_failed():
    state, exc = run(tracer("FAILURE", OSError("result backend down")))
    assert state == "REJECTED" and isinstance(exc, RoutingFailed) and exc.requeue
    assert "OSError: result backend down" in exc.why


def test_a_retry_without_an_ending_goes_back_too():
    assert isinstance(run(tracer("RETRY", Retry()))[1], RoutingFailed)


def test_celerys_bookkeeping_failing_after_the_ending_is_acked():
    state, exc = run(tracer("FAILURE", OSError("errback failed"), internal=True, end=KeyError("x")))
    assert state == "IGNORED" and isinstance(exc, Ended)


def test_the_tasks_own_reject_and_ignore_pass():
    assert isinstance(run(tracer("REJECTED", Reject("no", requeue=False), internal=True))[1], Reject)
    assert not isinstance(run(tracer("REJECTED", Reject("no", requeue=False), internal=True))[1], RoutingFailed)
    assert run(tracer("IGNORED", Ignore(), internal=True))[0] == "IGNORED"


def test_a_tracer_that_raises_goes_back_as_routing_failed():
    def broken(uuid, args, kwargs, request):
        raise RuntimeError("the tracer itself")
    state, exc = run(broken)
    assert state == "REJECTED" and isinstance(exc, RoutingFailed)


def test_a_refused_put_back_leaves_the_message_and_its_later_reject_never_raises(monkeypatch):
    """The broker is unreachable: the message is not acked, a reject is scheduled on the consumer's
    timer, and when that runs after the connection it came on was lost (the reject raises), nothing
    escapes into the event loop, where it would restart a healthy consumer."""
    import socket

    from celery import Celery
    from kombu import Message

    from rare_celery import RareTask
    from rare_celery import request as rare_request

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Celery("put-back", broker=f"amqp://guest:guest@127.0.0.1:{port}//", set_as_current=False)
    app.conf.broker_connection_timeout = 0.5

    def t(self):
        return None

    task = app.task(base=RareTask, name="put-back.t", bind=True)(t)
    scheduled, acked, rejects = [], [], []
    monkeypatch.setattr(rare_request, "timer", type("Timer", (), {
        "call_after": lambda self, secs, fun, args=(): scheduled.append((secs, fun, args))})())

    def reject_on_a_closed_connection():
        rejects.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    message = Message(body=b"[[], {}, {}]", headers={"id": "t-1", "task": "put-back.t"},
                      content_type="application/json", content_encoding="utf-8")
    rare_request.put_back(task, message, "somewhere", "redelivered", lost=True, ack=lambda: acked.append(1),
                          requeue=reject_on_a_closed_connection)
    assert acked == [] and rejects == [] and len(scheduled) == 1
    secs, fun, args = scheduled[0]
    assert secs >= 1
    fun(*args)  # what the timer does later: must not raise
    assert rejects == [1]
