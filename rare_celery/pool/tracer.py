"""A RareTask's tracer in the pool process: Celery's own, built with :class:`RetryInfo`, and guarded.

:func:`tracer_for` gives every RareTask Celery's own tracer, built with :class:`RetryInfo` (a retry's
bookkeeping without the copy of its frames), and guarded (:func:`guard_tracer`): whatever Celery
reports, a delivery that did not end through :func:`rare_celery.pool.attempt.end` comes back to the
main process as RoutingFailed, never as an acked failure.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, cast

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import signals as celery_signals
from celery.app import trace as celery_trace
from celery.app.trace import TraceInfo
from celery.exceptions import Reject

from .. import headers as hdr
from ..exceptions import Ended, Handed, RoutingFailed

log = logging.getLogger(__name__)
ENDING_KEY = "rare_ending"  # in delivery_info: the outcome of this delivery's ending, once it has one


def ending_of(req: Any) -> list[Any]:
    """The list this delivery's ending is recorded in (put in delivery_info by the guarded tracer)."""
    if not isinstance(req.delivery_info, dict):
        req.delivery_info = {}
    return cast("list[Any]", req.delivery_info.setdefault(ENDING_KEY, []))


class RetryInfo(TraceInfo):
    """Celery's ``TraceInfo``, with a retry's bookkeeping made light.

    Celery's own ``handle_retry`` wraps the ``Retry`` in billiard's ``ExceptionInfo``: a picklable
    copy of every frame of its traceback (on Python 3.11 with each frame's ``co_positions``, Celery's
    tracer included), and the traceback formatted as text; the copy then travels to the worker's main
    process. For a RareTask that traceback is rare_celery's own way out of the attempt, and the
    failure it stands for is formatted already (the ``x-rare-traceback`` header). So the same steps
    run in the same order (RETRY stored, ``on_retry``, ``task_retry``, the log line, ``task-retried``
    from the main process), with an ``ExceptionInfo`` whose ``traceback`` is the failed attempt's
    traceback and whose ``tb`` is ``None``.
    """

    def handle_retry(self, task: Any, req: Any, store_errors: bool = True, **kwargs: Any) -> Any:
        retry = self.retval
        text = getattr(retry, "rare_traceback", None)
        if text is None:  # not a retry rare_celery made (never for a RareTask): Celery's own
            return super().handle_retry(task, req, store_errors=store_errors, **kwargs)
        einfo = ExceptionInfo.__new__(ExceptionInfo)
        einfo.type, einfo.exception, einfo.tb, einfo.traceback = type(retry), retry, None, text
        if store_errors:
            task.backend.mark_as_retry(req.id, retry.exc, text, request=req)
        task.on_retry(retry.exc, req.id, req.args, req.kwargs, einfo)
        celery_signals.task_retry.send(sender=task, request=req, reason=retry, einfo=einfo)
        celery_trace.info(celery_trace.LOG_RETRY, {"id": req.id, "name": celery_trace.get_task_name(req, task.name),
                                                   "exc": str(retry)})
        return einfo


def tracer_for(task: Any, tracer: Any) -> Callable[..., Any]:
    """The tracer a RareTask runs with: Celery's, as ``tracer`` was built (same host name), with
    :class:`RetryInfo`; guarded. A tracer that is not Celery's own is only guarded."""
    try:
        hostname = inspect.getclosurevars(tracer).nonlocals["hostname"]
    except (KeyError, TypeError, ValueError):
        return guard_tracer(tracer)
    return guard_tracer(celery_trace.build_tracer(task.name, task, hostname=hostname, app=task.app, Info=RetryInfo))


def guard_tracer(tracer: Any) -> Callable[..., Any]:
    """Celery's tracer for a RareTask, made to report every delivery that did not end through
    ``rare_celery.pool.attempt.end`` as :class:`RoutingFailed` (the main process then puts the message back)."""

    def traced(uuid: str, args: Any, kwargs: Any, request: Any = None, *rest: Any, **options: Any) -> Any:
        request = {} if request is None else request
        # in delivery_info, not at the top of the request: those keys would become the task's custom headers
        info = request.get("delivery_info")
        if not isinstance(info, dict):
            info = request["delivery_info"] = {}
        ending = info.setdefault(ENDING_KEY, [])
        try:
            result = tracer(uuid, args, kwargs, request, *rest, **options)
        except Reject:
            raise
        except Exception as exc:  # noqa: BLE001 - the tracer itself failed
            if ending and isinstance(ending[0], Handed):
                return _handed(None, ending[0])
            return _report(result_type=None, why=f"{type(exc).__name__}: {exc}", ended=bool(ending))
        info = result.info
        state = getattr(info, "state", None)
        if ending:
            if state in ("RETRY", "FAILURE", "IGNORED") and not (state == "FAILURE" and result.retval.internal):
                return result
            if isinstance(ending[0], Handed):  # its copy is not published yet: it must reach the main process
                log.error("rare_celery: task %s has its next place decided, but Celery's bookkeeping after it failed "
                          "(%s); the worker publishes it, then acks", uuid, getattr(result.retval, "exception", state))
                return _handed(type(result), ending[0])
            log.error("rare_celery: task %s already has its next place, but Celery's bookkeeping after it failed "
                      "(%s); the message is acked", uuid, getattr(result.retval, "exception", state))
            return _report(type(result), "", ended=True)
        if info is None or state in ("REJECTED", "IGNORED"):
            return result  # success, or the task's own Reject / Ignore (Task.replace)
        error = getattr(result.retval, "exception", None)
        error = error.exc if isinstance(error, ExceptionWithTraceback) else error
        return _report(type(result), f"Celery reported {state} without rare_celery's ending: "
                       f"{type(error).__name__}: {error}"[: hdr.MAX_ERROR], ended=False)

    return traced


def _handed(result_type: Any, outcome: Handed) -> Any:
    """A tracer result that hands ``outcome`` (a retry whose copy the main process publishes) to the main process."""
    einfo = ExceptionInfo.__new__(ExceptionInfo)
    einfo.type, einfo.exception, einfo.tb = type(outcome), outcome, None
    einfo.traceback = getattr(outcome, "rare_traceback", "") or ""
    return (result_type or celery_trace.trace_ok_t)(einfo, TraceInfo("RETRY", outcome), 0.0, None)


def _report(result_type: Any, why: str, ended: bool) -> Any:
    """A tracer result that makes the main process ack (``ended``) or put the message back."""
    exc = Ended(why) if ended else RoutingFailed(why)
    try:
        raise exc
    except type(exc):
        einfo = ExceptionInfo(internal=True)
    return (result_type or celery_trace.trace_ok_t)(einfo, TraceInfo("IGNORED" if ended else "REJECTED", exc), 0.0, None)
