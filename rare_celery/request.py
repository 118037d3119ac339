"""The worker's side of a delivery: what the pool process cannot decide, the main process ends.

The pool process runs the attempt and publishes where the message goes next
(:meth:`rare_celery.task.RareTask._end`). The worker's main process holds the message itself: its
bytes, headers and delivery tag. It ends a delivery from those bytes, unchanged but for headers, in
the cases the pool process cannot:

* **The attempt started and its pool process died** (killed, ``os._exit``, out of memory) or a
  **hard time limit** ended it: the attempt counts as failed. The next attempt is scheduled
  through a delay queue (RETRY), or the message goes to the fallback task or the bug queue
  (``worker_lost`` / ``time_limit``), with one ending: Celery's own FAILURE-then-requeue is not used.
* **The pool process could not end the delivery** (:class:`~rare_celery.exceptions.RoutingFailed`:
  the copy could not be built or the broker refused it; or Celery's own bookkeeping failed before
  anything was published): the message is **put back**, see :func:`put_back`.
* **A redelivered message** (RabbitMQ's ``redelivered`` flag: a worker stopped, crashed or lost its
  connection while the message was unacked). Nobody knows whether its attempt started, so it
  counts no attempt: it is put back too (the worker's bootstep calls :func:`put_back` before
  anything runs).

**Putting back** publishes the message again to the queue it came from with ``x-rare-deliveries``
one higher (and ``x-rare-returned`` saying why), confirmed, then acks the original. The count lives
in the message the broker holds, so it survives a copy that can never be published and a worker
that dies each time. Past :data:`MAX_DELIVERIES` the message goes to the delivering queue's bug
queue instead, reason ``unroutable`` (or ``worker_lost`` for redeliveries), with the last error.
If the broker refuses that too, the message is rejected back into its queue after a pause
(1, 2, 4 ... 60 s, counted in memory), with one log line each time.

In the pool process, :func:`tracer_for` gives every RareTask Celery's own tracer, built with
:class:`RetryInfo` (a retry's bookkeeping without the copy of its frames), and guarded
(:func:`guard_tracer`): whatever Celery reports, a delivery that did not end through ``_end`` comes
back to the main process as RoutingFailed, never as an acked failure.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from dataclasses import replace

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import signals as celery_signals
from celery.app import trace as celery_trace
from celery.app.trace import TraceInfo
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.utils.objects import Bunch
from celery.worker.request import Request
from celery.worker.state import task_ready

from . import breaker_io, events, hops, signals
from . import headers as hdr
from .exceptions import Ended, PublishRefused, RoutingFailed, WorkerLost
from .inventory import resolve_task_name, target_queue, work_queue_of
from .policy import REJECTED, TIME_LIMIT, UNROUTABLE, WORKER_LOST, HopTo, RetryIn
from .publish import Copy, properties_of, send_patiently, to_bugs, to_delay, to_queue
from .topology import bug_queue_name, delay_kind, own_kind

log = logging.getLogger(__name__)
MAX_DELIVERIES = 5  # deliveries of one attempt that may end without a next place; then the bug queue
MAIN_TIMEOUT = 5.0  # the main process runs the worker's event loop: its publishes wait at most this long
MAX_PAUSE = 60.0
# broker bookkeeping, not part of the message; and "compression": kombu hands over the body decompressed
UNSTABLE = ("x-delivery-count", "BCC", "compression", *hdr.DEATH)

_refusals: OrderedDict = OrderedDict()  # (queue, id, attempt) -> put-backs the broker refused, this process
QUEUE, ENDING = "rare_queue", "rare_ending"  # keys in delivery_info: the delivering queue, the ending
timer = None  # the consumer's timer (set by the worker bootstep): pauses without blocking the event loop


# -- the pool process -----------------------------------------------------------------------------

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

    def handle_retry(self, task, req, store_errors=True, **kwargs):
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


def tracer_for(task, tracer):
    """The tracer a RareTask runs with: Celery's, as ``tracer`` was built (same host name), with
    :class:`RetryInfo`; guarded. A tracer that is not Celery's own is only guarded."""
    try:
        hostname = inspect.getclosurevars(tracer).nonlocals["hostname"]
    except (KeyError, TypeError, ValueError):
        return guard_tracer(tracer)
    return guard_tracer(celery_trace.build_tracer(task.name, task, hostname=hostname, app=task.app, Info=RetryInfo))


def guard_tracer(tracer):
    """Celery's tracer for a RareTask, made to report every delivery that did not end through
    ``RareTask._end`` as :class:`RoutingFailed` (the main process then puts the message back)."""

    def traced(uuid, args, kwargs, request=None, *rest, **options):
        request = {} if request is None else request
        # in delivery_info, not at the top of the request: those keys would become the task's custom headers
        info = request.get("delivery_info")
        if not isinstance(info, dict):
            info = request["delivery_info"] = {}
        ending = info.setdefault(ENDING, [])
        try:
            result = tracer(uuid, args, kwargs, request, *rest, **options)
        except Reject:
            raise
        except Exception as exc:  # noqa: BLE001 - the tracer itself failed
            return _report(result_type=None, why=f"{type(exc).__name__}: {exc}", ended=bool(ending))
        info = result.info
        state = getattr(info, "state", None)
        if ending:
            if state in ("RETRY", "FAILURE", "IGNORED") and not (state == "FAILURE" and result.retval.internal):
                return result
            log.error("rare_celery: task %s already has its next place, but Celery's bookkeeping after it failed "
                      "(%s); the message is acked", uuid, getattr(result.retval, "exception", state))
            return _report(type(result), "", ended=True)
        if info is None or state in ("REJECTED", "IGNORED"):
            return result  # success, or the task's own Reject / Ignore (Task.replace)
        exc = getattr(result.retval, "exception", None)
        exc = exc.exc if isinstance(exc, ExceptionWithTraceback) else exc
        return _report(type(result), f"Celery reported {state} without rare_celery's ending: "
                       f"{type(exc).__name__}: {exc}"[: hdr.MAX_ERROR], ended=False)

    return traced


def _report(result_type, why: str, ended: bool):
    """A tracer result that makes the main process ack (``ended``) or put the message back."""
    exc = Ended(why) if ended else RoutingFailed(why)
    try:
        raise exc
    except type(exc):
        einfo = ExceptionInfo(internal=True)
    return (result_type or celery_trace.trace_ok_t)(einfo, TraceInfo("IGNORED" if ended else "REJECTED", exc), 0.0, None)


# -- the main process -----------------------------------------------------------------------------

class RareRequest(Request):
    """Celery's worker request for a RareTask: passes the delivering queue to the pool process and
    ends the deliveries the pool process cannot (see the module documentation)."""

    rare_done = False

    def __init__(self, message, *args, **kwargs):
        super().__init__(message, *args, **kwargs)
        self.rare_queue = (message.delivery_info or {}).get(QUEUE)
        self._delivery_info[QUEUE] = self.rare_queue  # for the pool process (request.delivery_info)

    def info(self, safe=False):
        """Celery's view of the request (``celery inspect active``/``query_task``), without the
        delivering queue rare_celery passes to the pool process in ``delivery_info``."""
        out = super().info(safe)
        delivery = out.get("delivery_info")
        if isinstance(delivery, dict) and QUEUE in delivery:
            out["delivery_info"] = {k: v for k, v in delivery.items() if k != QUEUE}
        return out

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        if self.rare_done:
            return None
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, RoutingFailed):
            return self._put_back(exc.why)
        if isinstance(exc, TimeLimitExceeded):
            return self._lost(exc, TIME_LIMIT)
        if isinstance(exc, Reject) and exc.requeue:
            return self._requeue_asked()
        lost = isinstance(exc, WorkerLostError) or (
            isinstance(exc, (SystemExit, KeyboardInterrupt))  # billiard >= 4.3 reports the exit first
            and not (getattr(self, "_already_cancelled", False) or getattr(self, "_already_revoked", False)))
        if lost:
            return self._lost(exc if isinstance(exc, WorkerLostError) else WorkerLostError(repr(exc)), WORKER_LOST)
        if return_ok or isinstance(exc, (Retry, Ignore, Reject, MemoryError)) or type(exc).__name__ == "Terminated":
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        # the pool process failed outside the task's tracer: nothing was routed
        return self._put_back(f"the pool process failed: {type(exc).__name__}: {exc}"[: hdr.MAX_ERROR])

    def on_timeout(self, soft, timeout):
        if soft:
            return super().on_timeout(soft, timeout)
        return self._lost(TimeLimitExceeded(timeout), TIME_LIMIT)

    # -- endings from the main process ------------------------------------------------------

    def _put_back(self, why: str) -> None:
        task_ready(self)
        self.rare_done = True
        put_back(self.task, self._message, self.rare_queue, why, lost=False,
                 ack=self.acknowledge, requeue=lambda: self.reject(requeue=True))

    def _requeue_asked(self) -> None:
        """``raise Reject(requeue=True)``: the task asked for its message to go back to its queue. It
        goes back as a copy marked ``x-rare-requeued`` (confirmed, then the original is acked), so that
        no worker takes its return for a lost delivery; Celery's ``task-rejected`` event is sent."""
        task_ready(self)
        self.rare_done = True
        queue = self.rare_queue
        headers = {**raw_headers(self._message), hdr.REQUEUED: True}
        try:
            if not queue:
                raise PublishRefused("the queue it came from is unknown")
            send_patiently(self.task.app, Copy(self._message.body, hdr.fit(headers), properties_of(self._message),
                                               "", queue, None), budget=0, timeout=MAIN_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the broker's own requeue, then (it comes back redelivered)
            log.warning("rare_celery: %s[%s] asked to be requeued; copying it back failed (%s): rejected with "
                        "requeue instead", self.name, self.id, exc)
            return self.reject(requeue=True)
        self.acknowledge()
        with _best_effort("report the requeue"):
            self.send_event("task-rejected", requeue=True)

    def _lost(self, exc: Exception, reason: str) -> None:
        """The attempt started and did not finish: route it as a failed attempt from the raw message."""
        task_ready(self)
        if self.rare_done:
            return
        self.rare_done = True
        if reason == TIME_LIMIT:
            log.error("rare_celery: hard time limit (%ss) exceeded for %s[%s]", exc, self.name, self.id)
        try:
            if _succeeded(self.task, self.id):
                log.warning("rare_celery: %s[%s] succeeded before its pool process was lost: acked",
                            self.name, self.id)
                self.acknowledge()
                return
            self._route_lost(exc, reason)
        except Exception as err:  # noqa: BLE001 - never acked without a copy
            put_back(self.task, self._message, self.rare_queue,
                     f"{reason}: {exc!r}; routing it failed: {err!r}"[: hdr.MAX_ERROR], lost=False,
                     ack=self.acknowledge, requeue=lambda: self.reject(requeue=True))
        if getattr(self.task, "rare_breaker", None) is not None:
            with _best_effort("tell the breaker"):
                breaker_io.lost_attempt(self.task, self.id, self.hostname or "", timed_out=reason == TIME_LIMIT)

    def _route_lost(self, exc: Exception, reason: str) -> None:
        task, message, now = self.task, self._message, time.time()
        queue = self.rare_queue or work_queue_of(task, message.delivery_info)
        headers = raw_headers(message)
        try:
            state = hdr.read(headers, now)
        except hdr.HeaderError as bad:
            return self._send_to_bugs(REJECTED, bad, hdr.Attempt(1, now), queue, headers)
        try:
            policy, _ = task._dispatch(self.args, self.kwargs)
        except Exception:  # noqa: BLE001 - no handler: the task's own policy decides
            policy = task.rare_policy
        if state.deadline is None and policy.expires_in is not None:
            state = replace(state, deadline=policy.deadline(state.first_at))
        if reason == WORKER_LOST:
            exc = WorkerLost(f"attempt {state.number} was never acked: its pool process died ({exc})")
        decision = policy.after_loss(state, now=now, reason=reason)
        if isinstance(decision, RetryIn):
            return self._send_retry(decision.delay, exc, state, queue, headers)
        if isinstance(decision, HopTo):
            return self._send_hop(decision, state, queue, headers)
        return self._send_to_bugs(decision.reason, exc, state, queue, headers)

    def _send(self, copy: Copy) -> None:
        send_patiently(self.task.app, copy, budget=0, timeout=MAIN_TIMEOUT)

    def _send_retry(self, delay: float, exc, state: hdr.Attempt, queue: str, headers: dict) -> None:
        task = self.task
        nxt = replace(state, number=state.number + 1, due=time.time() + delay, queue=queue)
        new = {**_without_attempt(headers), **hdr.write(nxt), **hdr.error(exc), "retries": nxt.number - 1}
        with _best_effort("store RETRY"):
            if self.store_errors:
                task.backend.mark_as_retry(self.id, exc, request=self._context)
        self._send(to_delay(queue, delay, delay_kind(task.app, queue), self._message.body,
                            hdr.fit(new), properties_of(self._message), own_kind=own_kind(task.app)))
        self.acknowledge()
        log.warning("rare_celery: %s[%s] attempt %d was lost (%s); attempt %d in %.3g s", self.name, self.id,
                    state.number, exc, nxt.number, delay)
        with _best_effort("report the retry"):
            self.send_event("task-retried", exception=repr(exc), traceback="")
            self.send_event(events.RETRY, name=self.name, attempt=state.number, delay=delay,
                            **events.failure(exc), queue=queue)
            signals.retry_scheduled.send(sender=task, request=self._context, attempt=state.number, delay=delay,
                                         exception=exc)

    def _send_hop(self, decision: HopTo, state: hdr.Attempt, queue: str, headers: dict) -> None:
        task, now = self.task, time.time()
        name = resolve_task_name(task.app, decision.target)
        history = [*hops.read(headers.get(hdr.HOPS)),
                   hops.entry(task.name, queue, decision.reason, state.number, state.first_at, now)]
        dest = target_queue(task.app, name, task.app.tasks.get(name))
        new = {**_without_attempt(headers), **hdr.write(hdr.Attempt(1, now, queue=dest.name)),
               hdr.HOPS: history, "task": name, "retries": 0}
        with _best_effort("store HOPPED"):
            if self.store_errors:
                task.backend.store_result(self.id, {"hopped_to": name, "queue": dest.name, "reason": decision.reason,
                                                    "hops": len(history)}, "HOPPED", request=self._context)
        self._send(to_queue(dest, self._message.body, hdr.fit(new), properties_of(self._message)))
        self.acknowledge()
        with _best_effort("report the hop"):
            self.send_event(events.HOP, name=self.name, target=name, reason=decision.reason, queue=dest.name)
            signals.hopped.send(sender=task, request=self._context, source=task.name, target=name,
                                reason=decision.reason, queue=dest.name)

    def _send_to_bugs(self, reason: str, exc, state: hdr.Attempt, queue: str, headers: dict) -> None:
        task = self.task
        bugs = task.bug_queue or bug_queue_name(queue)
        new = {**_without_attempt(headers), **hdr.write(replace(state, due=None, queue=queue)), **hdr.error(exc),
               **hdr.bug(reason, state.number, task.name)}
        self._send(to_bugs(bugs, self._message.body, hdr.fit(new), properties_of(self._message), own_kind(task.app)))
        self.acknowledge()
        log.warning("rare_celery: %s[%s] routed to %s: %s (%s)", self.name, self.id, bugs, reason, exc)
        _mark_failed(task, self.id, exc, self._context, self.store_errors)
        with _best_effort("report the failure"):
            self.send_event("task-failed", exception=repr(exc), traceback="")
            self.send_event(events.BUGS, name=self.name, reason=reason, attempts=state.number,
                            **events.failure(exc), queue=bugs)
            signals.routed_to_bugs.send(sender=task, request=self._context, reason=reason, attempts=state.number,
                                        exception=exc, queue=bugs)


# -- putting a message back -----------------------------------------------------------------------

def put_back(task, message, queue: str | None, why: str, *, lost: bool, ack, requeue) -> None:
    """End a delivery that has no next place: publish the message again to ``queue`` with one more
    ``x-rare-deliveries``, then ``ack()``; past :data:`MAX_DELIVERIES`, to ``queue``'s bug queue
    (``worker_lost`` if ``lost``, else ``unroutable``). If the broker refuses, ``requeue()`` after
    a pause. Never raises."""
    headers = raw_headers(message)
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
    key = (queue, task_id, headers.get(hdr.ATTEMPT))
    count = max(hdr.deliveries(headers), _refusals.get(key, 0)) + 1
    try:
        if not queue:
            raise PublishRefused("the queue it came from is unknown")
        if count <= MAX_DELIVERIES:
            copy = Copy(message.body, hdr.fit({**headers, hdr.DELIVERIES: count, hdr.RETURNED: why[: hdr.MAX_ERROR]}),
                        properties_of(message), "", queue, None)
            send_patiently(task.app, copy, budget=0, timeout=MAIN_TIMEOUT)
            ack()
            log.warning("rare_celery: %s[%s] put back in %s (delivery %d of at most %d without a next place): %s",
                        getattr(task, "name", "?"), task_id, queue, count, MAX_DELIVERIES, why)
        else:
            if lost and task_id and _succeeded(task, task_id):
                ack()
                log.warning("rare_celery: %s[%s] came back after it had succeeded: acked", task.name, task_id)
                return
            reason = WORKER_LOST if lost else UNROUTABLE
            error = (WorkerLost if lost else PublishRefused)(
                f"delivered {count} times without reaching a next place; last: {why}")
            attempt = headers.get(hdr.ATTEMPT) if isinstance(headers.get(hdr.ATTEMPT), int) else 1
            new = {**headers, **hdr.bug(reason, attempt, getattr(task, "name", "")), **hdr.error(error),
                   hdr.QUEUE: queue, hdr.DELIVERIES: count}
            bugs = bug_queue_name(queue)
            send_patiently(task.app, to_bugs(bugs, message.body, hdr.fit(new), properties_of(message),
                                             own_kind(task.app)), budget=0, timeout=MAIN_TIMEOUT)
            ack()
            log.error("rare_celery: %s[%s] routed to %s: %s (%s)", getattr(task, "name", "?"), task_id, bugs,
                      reason, why)
            if task_id:
                _mark_failed(task, task_id, error, _request_of(message, headers), True)
        _refusals.pop(key, None)
    except Exception as exc:
        _refusals[key] = count
        _refusals.move_to_end(key)
        while len(_refusals) > 10_000:
            _refusals.popitem(last=False)
        pause = min(MAX_PAUSE, 2.0 ** (count - 1))
        log.error("rare_celery: %s[%s] stays in %s (not acked): putting it back failed (%s); "
                  "it is delivered again in %g s", getattr(task, "name", "?"), task_id, queue, exc, pause)
        log.debug("rare_celery: putting it back failed", exc_info=True)
        if timer is not None:
            timer.call_after(pause, _requeue, (requeue, task_id))
        else:
            _requeue(requeue, task_id)


def _requeue(requeue, task_id) -> None:
    """``requeue()`` that never raises. It may run after the connection the message came on was lost
    (from the consumer's timer): the broker has requeued the message already, and an error raised here
    would look like a loss of the new connection and restart the consumer again."""
    try:
        requeue()
    except Exception as exc:  # noqa: BLE001 - see above
        log.info("rare_celery: %s was not rejected (%s): the broker requeued it when its connection closed",
                 task_id, f"{type(exc).__name__}: {exc}")


def raw_headers(message) -> dict:
    """A received message's headers without the broker's own bookkeeping (and without ``compression``:
    the body a copy is made of is the decompressed one)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    return {k: v for k, v in headers.items() if k not in UNSTABLE}


def _without_attempt(headers: dict) -> dict:
    """Headers that travel to the next attempt: rare_celery's per-attempt ones go (they are rewritten)."""
    return {k: v for k, v in headers.items() if k == hdr.HOPS or not k.startswith(hdr.PREFIX)}


def _succeeded(task, task_id: str) -> bool:
    try:
        return bool(task._stores_results()) and task.backend.get_state(task_id) == "SUCCESS"
    except Exception:  # noqa: BLE001 - unknown: treat as not succeeded (at least once)
        return False


def _request_of(message, headers: dict):
    props = message.properties or {}
    return Bunch(id=headers.get("id"), name=headers.get("task"), chord=None, root_id=headers.get("root_id"),
                 errbacks=None, correlation_id=props.get("correlation_id"), reply_to=props.get("reply_to"),
                 group=headers.get("group"), ignore_result=False, delivery_info=message.delivery_info)


def _mark_failed(task, task_id: str, exc, request, store: bool) -> None:
    """FAILURE in the result backend (errbacks, chord) and Celery's task_failure signal."""
    with _best_effort("store FAILURE"):
        task.backend.mark_as_failure(task_id, exc, request=request, store_result=store)
    with _best_effort("send task_failure"):
        celery_signals.task_failure.send(sender=task, task_id=task_id, exception=exc, args=None, kwargs=None,
                                         traceback=None, einfo=None)


class _best_effort:
    """``with _best_effort("what")``: an exception inside is logged, not raised (reports only)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if value is not None and isinstance(value, Exception):
            log.warning("rare_celery: could not %s: %r", self.what, value)
            return True
        return False

