"""The guarded tracer (rare_celery.pool.tracer.guard_tracer): whatever Celery's tracer reports for a
RareTask delivery, one that did not end through rare_celery.pool.attempt.end goes back to the main process as
RoutingFailed, never as an acked failure (no broker: Celery's own trace result types)."""

from __future__ import annotations

from billiard.einfo import ExceptionInfo
from celery.app.trace import TraceInfo, trace_ok_t
from celery.exceptions import Ignore, Reject, Retry

from rare_celery.exceptions import Ended, RoutingFailed
from rare_celery.pool.tracer import guard_tracer


def einfo(exc: BaseException, internal: bool = False) -> ExceptionInfo:
    try:
        raise exc
    except type(exc):
        return ExceptionInfo(internal=internal)


def tracer(state: str | None, exc: BaseException | None = None, internal: bool = False, end=None):
    """A stand-in for Celery's tracer: reports ``state``; ``end`` is what pool.attempt.end recorded."""

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


def test_a_handed_retry_crosses_to_the_main_process_whole():
    """A pool process's handed retry reaches the worker's main process with everything Celery and
    rare_celery read of it (the failure, when, its copy, the traceback text), made there without
    Celery's Retry.__init__ (which would pickle the failure once more)."""
    import pickle

    from rare_celery.exceptions import Handed

    retry = Retry(exc=ConnectionError("down"), when=2.5)
    retry.rare_traceback = "Traceback ...\nConnectionError: down\n"
    handed = Handed.of(retry, {"copy": 1}, "retry", {"attempt": 1})
    again = pickle.loads(pickle.dumps(handed))
    for h in (handed, again):
        assert isinstance(h, Handed) and isinstance(h, Retry)
        assert type(h.exc) is ConnectionError and str(h.exc) == "down" and h.excs == "ConnectionError('down')"
        assert (h.when, h.copy, h.kind, h.fields) == (2.5, {"copy": 1}, "retry", {"attempt": 1})
        assert h.rare_traceback == retry.rare_traceback and h.args[0] is h and str(h) == str(retry)
