"""The worker's main process's side of a delivery: the endings the pool process cannot make.

The pool process runs the attempt and ends the delivery (:func:`rare_celery.pool.attempt.end`). The
worker's main process holds the message itself: its bytes, headers and delivery tag. It ends a
delivery from those bytes, through :mod:`rare_celery.endings`, in the cases the pool process cannot:

* **The attempt started and its pool process died** (killed, ``os._exit``, out of memory) or a
  **hard time limit** ended it: the attempt counts as failed. The next attempt is scheduled
  through a delay queue (RETRY), or the message goes to the fallback task or the bug queue
  (``worker_lost`` / ``time_limit``), with one ending: Celery's own FAILURE-then-requeue is not used.
* **The pool process could not end the delivery** (:class:`~rare_celery.exceptions.RoutingFailed`:
  the copy could not be built or the broker refused it; or Celery's own bookkeeping failed before
  anything was published): the message is **put back**, see :func:`put_back`.
* **A redelivered message** (RabbitMQ's ``redelivered`` flag): the worker that had it died or lost its
  connection before its ack; a worker that stops warm gives back the messages it never started
  (:mod:`rare_celery.worker.bootsteps`), so no other worker sees them redelivered. Its attempt counts
  as failed (:func:`came_back`, from :mod:`rare_celery.worker.screen` before anything runs), unless
  its copy had ended before (its ack was lost): then it is acked, not run.
* **The task asked to be requeued** (``raise Reject(requeue=True)``).

**Putting back** publishes the message again to the queue it came from with ``x-rare-deliveries``
one higher (and ``x-rare-returned`` saying why), confirmed, then acks the original. The count lives
in the message the broker holds, so it survives a copy that can never be published and a worker
that dies each time. Past :data:`~rare_celery.endings.MAX_DELIVERIES` the message goes to its bug
queue instead, reason ``unroutable``, with the last error.
If the broker refuses that too, the message is rejected back into its queue after a pause
(1, 2, 4 ... 60 s, counted in the worker's context), with one log line each time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

from billiard.einfo import ExceptionWithTraceback
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.worker.request import Request
from celery.worker.state import task_ready
from kombu.utils.encoding import safe_repr, safe_str

from .. import breaker_io, context, endings, events, spans
from .. import headers as hdr
from ..exceptions import Handed, PublishRefused, RoutingFailed, WorkerLost
from ..message import QUEUE_KEY, Delivery
from ..pipeline import CONFIRM_DEADLINE
from ..publish import LONGEST_PAUSE, PATIENCE, log_refused, send_patiently
from ..reasons import REJECTED, TIME_LIMIT, WORKER_LOST

log = logging.getLogger(__name__)
MAIN_TIMEOUT = 5.0  # the main process runs the worker's event loop: its publishes wait this long for a confirm,
MAIN_CONFIRM_WAIT = 25.0  # then this much more, once written (never publishing it again), before it is unknown
LONGEST_REQUEUE_PAUSE = 60.0  # seconds before a message whose put-back the broker refused is rejected back


def _kept_here(on_success: Callable[..., Any]) -> Callable[..., Any]:
    """``on_success`` that keeps a success in this process before its ack
    (:func:`rare_celery.endings.ended_here`): the message coming back because its ack was lost (this
    worker's connection was lost) is acked unrun, with any result backend or none."""
    def kept(self: Any, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        if not failed__retval__runtime[0]:
            endings.ended_here(self._message.headers, endings.SUCCESS)
        return on_success(self, failed__retval__runtime, **kwargs)
    kept.__wrapped__ = on_success  # type: ignore[attr-defined]
    return kept


class RareRequest(Request):
    """Celery's worker request for a RareTask: passes the delivering queue to the pool process and
    ends the deliveries the pool process cannot (see the module documentation)."""

    rare_done = False

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.rare_queue = (message.delivery_info or {}).get(QUEUE_KEY)
        self._delivery_info[QUEUE_KEY] = self.rare_queue  # for the pool process (request.delivery_info)
        ctx = context.of(self.task.app)
        if ctx is not None:  # until a pool process starts it, or it ends otherwise: see give_back
            ctx.waiting[id(self)] = self

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Celery makes a subclass of this class per task (``create_request_cls``) with its own
        ``on_success``, which does not call this one: it is wrapped the same way."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("on_success")
        if own is not None:
            cls.on_success = _kept_here(own)

    on_success = _kept_here(Request.on_success)

    def info(self, safe: bool = False) -> dict[str, Any]:
        """Celery's view of the request (``celery inspect active``/``query_task``), without the
        delivering queue rare_celery passes to the pool process in ``delivery_info``."""
        out: dict[str, Any] = super().info(safe)
        delivery = out.get("delivery_info")
        if isinstance(delivery, dict) and QUEUE_KEY in delivery:
            out["delivery_info"] = {k: v for k, v in delivery.items() if k != QUEUE_KEY}
        return out

    def on_accepted(self, pid: Any, time_accepted: Any) -> Any:
        self._not_waiting()
        return super().on_accepted(pid, time_accepted)

    def acknowledge(self) -> None:
        self._not_waiting()
        super().acknowledge()

    def reject(self, requeue: bool = False) -> None:
        self._not_waiting()
        super().reject(requeue=requeue)

    def _not_waiting(self) -> None:
        ctx = context.of(self.task.app)
        if ctx is not None:
            ctx.waiting.pop(id(self), None)

    def give_back(self) -> bool:
        """The worker stops warm and this request never started: its message goes back to its queue as
        it is (confirmed, then acked), counting nothing. False if it started, ended, or could not go back."""
        self._not_waiting()
        if self.rare_done or self.time_start or self.acknowledged:
            return False
        try:
            settle(endings.give_back(self._delivery()), self.acknowledge,
                   endings.Reporter(send=None, celery_reports=False, stores=False))
        except Exception as exc:  # noqa: BLE001 - left unacked: the broker returns it (redelivered)
            log.warning("rare_celery: could not give back %s[%s] (%s)", self.name, self.id, exc)
            return False
        self._finish()
        return True

    def on_retry(self, exc_info: Any) -> None:
        """Celery's: acked (its copy was confirmed) and ``task-retried``, which here also carries the
        next attempt's due time as ``eta`` (an event consumer's row shows when it runs). A retry the
        pool process handed over (:class:`~rare_celery.exceptions.Handed`) is published from here first."""
        retry = exc_info.exception
        if isinstance(retry, Handed):
            return self._publish_handed(retry, exc_info)
        if self.task.acks_late:
            self.acknowledge()
        self._retried(retry, exc_info)

    def _retried(self, retry: Any, exc_info: Any) -> None:
        when = getattr(retry, "when", None)
        due = {"eta": events.eta(time.time() + when)} if isinstance(when, (int, float)) else {}
        self.send_event("task-retried", exception=safe_repr(retry.exc), traceback=safe_str(exc_info.traceback),
                        **due)

    def _publish_handed(self, retry: Handed, exc_info: Any) -> None:
        """The pool process decided a retry and handed its copy here: published (through the worker's
        pipeline, confirms read as they come; from another thread, waiting for its confirm), then its copy
        recorded as ended, the original acked and ``task-retried`` sent. A copy the broker does not take
        puts the message back (:func:`put_back`), never acked without it."""
        if self.rare_done:
            return
        self.rare_done = True
        over = _handing(hdr.copy_id(self._message.headers))  # the same copy put back meanwhile waits for it

        def done() -> None:
            over()
            if retry.kind in endings.NEW_WORK:  # this copy has ended, whatever becomes of its ack
                endings.record_ended(self.task, hdr.received(self._message.headers), retry.kind)
            self.acknowledge()
            self._retried(retry, exc_info)

        def failed(why: str) -> None:
            over()
            put_back(self._delivery(celerys=False), why[: hdr.MAX_ERROR], ack=self.acknowledge,
                     requeue=lambda: self.reject(requeue=True), reporter=self._reporter())

        def held() -> bool:
            if getattr(self._message.channel, "is_open", True):
                return True
            over()  # dropped: the broker has the original back
            return False

        ctx = context.of(self.task.app)
        pipeline = ctx.pipeline if ctx is not None else None
        if pipeline is not None and pipeline.here():
            pipeline.send(retry.copy, done, failed, who=f"{self.name}[{self.id}]", held=held)
            return
        try:  # a thread of the pool (or a worker without an event loop): it waits, as a pool process would
            send_patiently(self.task.app, retry.copy, confirm_wait=PATIENCE,
                           on_refused=lambda exc, pause: log_refused(f"{self.name}[{self.id}]", exc, pause))
        except Exception as exc:  # noqa: BLE001 - never acked without a copy
            failed(f"{type(exc).__name__}: {exc}")
            return
        done()

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        self._not_waiting()
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

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if soft:
            return super().on_timeout(soft, timeout)
        return self._lost(TimeLimitExceeded(timeout), TIME_LIMIT)

    # -- endings from the main process ------------------------------------------------------

    def _delivery(self, celerys: bool = True) -> Delivery:
        """The delivery, with Celery's request for reports (``celerys``) or, for a message that may be
        what failed (a put-back), a stand-in made of its plainest headers."""
        return Delivery.received(self.task.app, self.task, self._message, self.rare_queue,
                                 self._context if celerys else None)

    def _reporter(self) -> endings.Reporter:
        return endings.Reporter(send=_sender(self), celery_reports=True, stores=bool(self.store_errors))

    def _finish(self) -> bool:
        """This request ends here (once)."""
        task_ready(self)
        if self.rare_done:
            return False
        self.rare_done = True
        return True

    def _put_back(self, why: str) -> None:
        if self._finish():
            put_back(self._delivery(celerys=False), why, ack=self.acknowledge,
                     requeue=lambda: self.reject(requeue=True), reporter=self._reporter())

    def _requeue_asked(self) -> None:
        """``raise Reject(requeue=True)``: the task asked for its message to go back to its queue. It
        goes back as a copy marked ``x-rare-requeued`` (confirmed, then the original is acked), so that
        no worker takes its return for a lost delivery; Celery's ``task-rejected`` event is sent."""
        if not self._finish():
            return
        try:
            settle(endings.requeue(self._delivery()), self.acknowledge, self._reporter())
        except Exception as exc:  # noqa: BLE001 - the broker's own requeue, then (it comes back redelivered)
            log.warning("rare_celery: %s[%s] asked to be requeued; copying it back failed (%s): rejected with "
                        "requeue instead", self.name, self.id, exc)
            self.reject(requeue=True)

    def _lost(self, exc: Exception, reason: str) -> None:
        """The attempt started and did not finish: end it as a failed attempt from the raw message."""
        if not self._finish():
            return
        if reason == TIME_LIMIT:
            log.error("rare_celery: hard time limit (%ss) exceeded for %s[%s]", exc, self.name, self.id)
        d = self._delivery()
        if reason == WORKER_LOST:
            exc = WorkerLost(f"the attempt was never acked: its pool process died ({exc})")
        try:
            settle(lost_ending(d, exc, reason, self.task.policy_for(self.args, self.kwargs)), self.acknowledge,
                   self._reporter())
        except Exception as err:  # noqa: BLE001 - never acked without a copy
            put_back(self._delivery(celerys=False), f"{reason}: {exc!r}; routing it failed: {err!r}"[: hdr.MAX_ERROR],
                     ack=self.acknowledge, requeue=lambda: self.reject(requeue=True), reporter=self._reporter())
        if getattr(self.task, "rare_breaker", None) is not None:
            try:
                breaker_io.lost_attempt(self.task, self.id, self.hostname or "", timed_out=reason == TIME_LIMIT)
            except Exception as err:  # noqa: BLE001 - a report
                log.warning("rare_celery: could not tell the breaker: %r", err)



def lost_ending(d: Delivery, exc: Exception, reason: str, policy: Any) -> endings.Ending:
    """An attempt that started and never finished (``reason``: ``worker_lost``, ``time_limit``) counts as
    failed: its next place as ``policy`` decides; unless its copy had ended before (a lost ack only), or
    it is not due yet (a delayed start or a round held by a worker that died before sending it on: it
    cannot have run), which waits on, counting nothing."""
    how = endings.copy_ended(d.task, d.headers)
    if how is not None:
        return endings.done(d, how)
    now = time.time()
    try:
        state = d.state(now)
    except hdr.HeaderError as bad:
        return endings.bugs(d, hdr.Attempt(1, now), REJECTED, bad, now=now)
    if state.deadline is None and policy.expires_in is not None:
        state = replace(state, deadline=policy.deadline(state.first_at))
    if state.due is not None and state.due > now:  # no attempt starts before its due time: this one never ran
        return endings.wait(d, state, state.due, now=now)
    return endings.lost(endings.next_place(d, state, policy.after_loss(state, now=now, reason=reason), exc, now=now),
                        reason, state)


def came_back(d: Delivery, *, ack: Callable[[], None], requeue: Callable[[], None], reporter: endings.Reporter,
              args: Any = None, kwargs: Any = None) -> None:
    """A message the broker delivered again (``redelivered``): the worker that had it died or lost its
    connection before its ack (a worker that stops warm gives back what it never started, see
    :mod:`rare_celery.worker.bootsteps`). Its attempt counts as failed (``worker_lost`` after the last),
    unless its copy had ended before (a lost ack), or this very worker still has it (its connection was
    lost, not the worker): then it is put back, counting nothing, and the attempt that runs here ends it.
    Never raises."""
    if _held_here(d):
        return put_back(d, "redelivered while this worker still has it (its connection was lost)", ack=ack,
                        requeue=requeue, reporter=reporter)
    exc = WorkerLost("the attempt came back unacked: its worker died or lost its connection")
    policy = d.task.policy_for(args, kwargs) if args is not None or kwargs is not None else d.task.rare_policy
    try:
        settle(lost_ending(d, exc, WORKER_LOST, policy), ack, reporter)
    except Exception as err:  # noqa: BLE001 - never acked without a copy
        put_back(d, f"redelivered; routing it failed: {err!r}"[: hdr.MAX_ERROR], ack=ack, requeue=requeue,
                 reporter=reporter)


def settle(ending: endings.Ending, ack: Callable[[], None], reporter: endings.Reporter) -> None:
    """From the main process: store what must come first, publish the ending's copy (confirmed), then
    ``ack()`` the original and report. Raises if the copy was not confirmed (nothing acked)."""
    try:
        endings.store_first(ending, reporter)
    except Exception as exc:  # noqa: BLE001 - a result state is a report, the copy is what counts
        log.warning("rare_celery: %s[%s]: could not store its state first: %r", ending.delivery.task_name,
                    ending.delivery.task_id, exc)
    if ending.copy is not None:
        if not ending.copy.routing_key and ending.copy.target is None:
            raise PublishRefused("the queue it came from is unknown")
        with spans.publishing(ending):
            send_patiently(ending.delivery.app, ending.copy, budget=0, timeout=MAIN_TIMEOUT,
                           confirm_wait=MAIN_CONFIRM_WAIT)
        if ending.kind in endings.NEW_WORK:  # this copy has ended, whatever becomes of its ack
            endings.record_ended(ending.delivery.task, ending.delivery.headers, ending.kind)
    ack()
    endings.report(ending, reporter)


# -- putting a message back -----------------------------------------------------------------------

def put_back(d: Delivery, why: str, *, ack: Callable[[], None], requeue: Callable[[], None],
             reporter: endings.Reporter) -> None:
    """End a delivery that has no next place (:func:`rare_celery.endings.put_back`); if the broker
    refuses, ``requeue()`` after a pause (counted in the worker's context). Never raises."""
    ctx = context.of(d.app)
    key = (d.queue, d.task_id, d.headers.get(hdr.ATTEMPT))
    count = max(hdr.deliveries(d.headers), ctx.refused(key) if ctx is not None else 0) + 1
    try:
        if not d.queue:
            raise PublishRefused("the queue it came from is unknown")
        settle(endings.put_back(d, why, count=count), ack, reporter)
        if ctx is not None:
            ctx.forget_refusal(key)
    except Exception as exc:  # kept unacked: requeued after a pause
        if ctx is not None:
            ctx.note_refusal(key, count)
        pause = min(LONGEST_REQUEUE_PAUSE, 2.0 ** (count - 1))
        log.error("rare_celery: %s[%s] stays in %s (not acked): putting it back failed (%s); "
                  "it is delivered again in %g s", d.task_name or "?", d.task_id, d.queue, exc, pause)
        log.debug("rare_celery: putting it back failed", exc_info=True)
        timer = ctx.timer if ctx is not None else None
        if timer is not None:
            timer.call_after(pause, _requeue, (requeue, d.task_id))
        else:
            _requeue(requeue, d.task_id)


def _held_here(d: Delivery) -> bool:
    """Whether this worker runs (or holds) a delivery of the same copy of the message."""
    from celery.worker.state import active_requests, reserved_requests

    copy = hdr.copy_id(d.headers)
    return copy is not None and any(_copy_of(r) == copy for r in [*active_requests, *reserved_requests])


def ends_here(d: Delivery) -> bool:
    """Whether this worker will see a delivery of the same copy of the message end: an attempt its
    pool still runs, or a handed retry whose confirm has not come. Not an attempt the pool forgot:
    Celery 5.4's prefork pool drops the attempts that were running when the consumer's connection was
    lost (their requests stay active, and their ends never reach this process)."""
    from celery.worker.state import active_requests

    copy = hdr.copy_id(d.headers)
    if copy is None:
        return False
    until = _HANDED.get(copy)
    if until is not None:
        if time.monotonic() < until:
            return True
        _HANDED.pop(copy, None)
    return any(_copy_of(r) == copy and _tracked(r) for r in active_requests)


def _copy_of(request: Any) -> str | None:
    return hdr.copy_id(getattr(getattr(request, "_message", None), "headers", None))


def _tracked(request: Any) -> bool:
    """Whether the pool still tracks a request's job (Celery keeps a weak reference to it)."""
    ref = getattr(request, "_apply_result", None)
    return ref is not None and ref() is not None


HANDING_LIMIT = CONFIRM_DEADLINE + PATIENCE + LONGEST_PAUSE  # seconds a handed ending takes to settle, at most
_HANDED: dict[str, float] = {}  # copy id of a delivery whose handed ending is on its way -> until (monotonic)


def _handing(copy: str | None) -> Callable[[], None]:
    """The ending of the delivery of ``copy`` is on its way (:func:`ends_here` says so until it settles,
    or for :data:`HANDING_LIMIT` s at most); returns what says it settled."""
    if copy is None:
        return lambda: None
    _HANDED[copy] = time.monotonic() + HANDING_LIMIT

    def over() -> None:
        _HANDED.pop(copy, None)
    return over


def _requeue(requeue: Callable[[], None], task_id: str | None) -> None:
    """``requeue()`` that never raises. It may run after the connection the message came on was lost
    (from the consumer's timer): the broker has requeued the message already, and an error raised here
    would look like a loss of the new connection and restart the consumer again."""
    try:
        requeue()
    except Exception as exc:  # noqa: BLE001 - see above
        log.info("rare_celery: %s was not rejected (%s): the broker requeued it when its connection closed",
                 task_id, f"{type(exc).__name__}: {exc}")


def _sender(request: Request) -> Callable[..., None] | None:
    """How a request sends a Celery event from the main process (``None``: events are off)."""
    eventer = request._eventer
    if not (eventer and eventer.enabled and request.task.send_events):
        return None
    return cast("Callable[..., None]", eventer.send)
