"""Where a delivery goes next: every ending, built here once.

=============  ==================================================================  =====================
ending         where the message goes                                              built by
=============  ==================================================================  =====================
``retry``      a delay queue, as the next attempt (``x-rare-attempt`` + 1)          :func:`retry`
``wait``       a delay queue, the same attempt, not run (early arrival, breaker)   :func:`wait`
               or its service's line (its limits: until woken)                     :func:`line`
``hop``        the next task's queue, as its attempt 1                             :func:`hop`
``bugs``       its bug queue, with the reason and the last error                   :func:`bugs`
``put_back``   its own queue again, ``x-rare-deliveries`` + 1 (past the limit:     :func:`put_back`
               ``bugs``, ``unroutable``)
``requeue``    its own queue again, as the task asked (``Reject(requeue=True)``)   :func:`requeue`
``give_back``  its own queue again, unstarted: its worker stops warm              :func:`give_back`
``done``       nowhere: its copy ended before (a lost ack): acked, not run         :func:`done`
=============  ==================================================================  =====================

Each builder takes one :class:`~rare_celery.message.Delivery` (the message, read-only) and returns an
:class:`Ending`: the copy to publish (confirmed, mandatory; see :mod:`rare_celery.publish`), the
result state stored before the copy exists, and what the pool process raises once it is confirmed.
:func:`report` is the one report of each ending: log line, rare_celery signal, Celery events, result
state. The pool process (:mod:`rare_celery.pool`), the worker's main process
(:mod:`rare_celery.worker`) and the eager loop call these; none builds headers or a copy itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from celery import signals as celery_signals
from celery.exceptions import Ignore, Retry

from . import events, hops, signals
from . import headers as hdr
from .exceptions import Bug, HopLimit, PublishRefused
from .inventory import resolve_task_name, target_queue
from .message import Delivery
from .policy import GiveUp, HopTo, RetryIn, slack
from .publish import Copy, to_bugs, to_delay, to_line, to_queue
from .reasons import BUG, EXPIRED, UNROUTABLE
from .topology import delay_kind, own_kind

log = logging.getLogger(__name__)

RETRY, WAIT, HOP, BUGS, PUT_BACK, REQUEUE, GIVE_BACK, DONE = (
    "retry", "wait", "hop", "bugs", "put_back", "requeue", "give_back", "done")
NEW_WORK = (RETRY, WAIT, HOP, BUGS)  # endings whose copy is new work: the delivering copy has ended
MAX_DELIVERIES = 5  # deliveries of one attempt that may end without a next place; then the bug queue
ENDED = "rare-copy-ended-"  # result-backend key of a copy whose delivery ended (after the backend's prefix)
SUCCESS = "success"
HOPPED = "HOPPED"  # result state of a task whose work moved on (not ready: .get() waits for the target)
RETRY_STATE = "RETRY"


@dataclass(frozen=True)
class Ending:
    """One delivery's ending: ``copy`` (``None``: nothing to publish), ``outcome`` (what the pool
    process raises once the copy is confirmed: Celery's ``Retry``, the task's exception, ``Ignore``),
    ``first`` (a result state stored before the copy exists) and what :func:`report` says."""

    kind: str
    delivery: Delivery
    copy: Copy | None
    outcome: BaseException
    exc: BaseException | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    first: str | None = None


@dataclass(frozen=True)
class Reporter:
    """How the process that ends a delivery reports it.

    ``send(type, **fields)`` sends a Celery event (``None``: events are off). ``celery_reports``:
    FAILURE, ``task-failed``, ``task-retried`` and ``task_failure`` are this process's to make (the
    worker's main process); in the pool process Celery's tracer makes them from ``outcome``.
    ``stores``: the task stores results."""

    send: Callable[..., None] | None
    celery_reports: bool
    stores: bool


# -- the builders --------------------------------------------------------------------------------

def retry(d: Delivery, state: hdr.Attempt, delay: float, exc: BaseException | None, *, args: Any = None,
          kwargs: Any = None, now: float | None = None) -> Ending:
    """Attempt ``state`` failed with ``exc``: the next one waits ``delay`` seconds in a delay queue."""
    now = time.time() if now is None else now
    nxt = replace(state, number=state.number + 1, due=now + delay, queue=d.queue)
    failure = hdr.error(exc)
    outcome = Retry(exc=exc, when=delay)
    outcome.rare_traceback = failure.get(hdr.TRACEBACK, "")  # what Celery reports too (pool.tracer.RetryInfo)
    body, headers, props = d.copy({**hdr.write(nxt), **failure}, args=args, kwargs=kwargs, retries=nxt.number - 1)
    copy = to_delay(d.queue or "", delay, delay_kind(d.task.app, d.queue or ""), body, headers, props,
                    own_kind=own_kind(d.task.app))
    return Ending(RETRY, d, copy, outcome, exc, {"attempt": state.number, "delay": delay, "due": nxt.due},
                  first=RETRY_STATE)


def wait(d: Delivery, state: hdr.Attempt, due: float, *, breaker: str | None = None,
         now: float | None = None) -> Ending:
    """Attempt ``state`` may not run before ``due`` (its deadline, if sooner): to a delay queue until
    then, unrun, nothing counted. The attempt's bookkeeping and last error stay with it."""
    now = time.time() if now is None else now
    due = due if state.deadline is None else min(due, state.deadline)
    rest = due - now
    body, headers, props = d.copy(hdr.write(replace(state, due=due, queue=d.queue)),
                                  keep=(*hdr.LAST_ERROR, hdr.DELIVERIES, hdr.RETURNED))
    copy = to_delay(d.queue or "", rest, delay_kind(d.task.app, d.queue or ""), body, headers, props,
                    slack=slack(rest), own_kind=own_kind(d.task.app))
    return Ending(WAIT, d, copy, Ignore(), fields={"due": due, **({"breaker": breaker} if breaker else {})})


def line(d: Delivery, state: hdr.Attempt, service: str, limit: str, *, head: bool = False,
         now: float | None = None) -> Ending:
    """Attempt ``state`` may not start now: ``service``'s ``limit`` (``concurrency``, ``rate``) is reached.
    It waits, unrun, nothing counted, in the service's line until an attempt's end or a worker wakes
    it (:func:`rare_celery.limits_io.wake`), or until its shelf life ends. ``head``: it was woken from the
    line and lost its place to another: back at the head, not the end."""
    now = time.time() if now is None else now
    body, headers, props = d.copy(hdr.write(replace(state, due=None, queue=d.queue)),
                                  keep=(*hdr.LAST_ERROR, hdr.DELIVERIES, hdr.RETURNED))
    rest = None if state.deadline is None else state.deadline - now
    copy = to_line(d.queue or "", service, delay_kind(d.task.app, d.queue or ""), body, headers, props,
                   expires_in=rest, own_kind=own_kind(d.task.app), head=head)
    return Ending(WAIT, d, copy, Ignore(), fields={"line": service, "limit": limit, "breaker": service})


def hop(d: Delivery, state: hdr.Attempt, target: object, reason: str, *, args: Any = None, kwargs: Any = None,
        now: float | None = None, expired: bool = False) -> Ending:
    """The work moves to task ``target`` (same id, attempt 1 there); a hop that leads nowhere, loops or
    passes ``max_hops`` goes to the bug queue instead."""
    now = time.time() if now is None else now
    app = d.task.app
    try:
        name = resolve_task_name(app, target)
        dest = target_queue(app, name, app.tasks.get(name))
    except Exception as exc:  # noqa: BLE001 - a fallback or Hop that leads nowhere is a bug, not a loop
        return bugs(d, state, BUG, Bug(f"{d.task_name}[{d.task_id}] cannot hop to {target!r}: {exc}"),
                    args=args, kwargs=kwargs, now=now)
    history = hop_history(d, state, reason, now)
    refused = hops.refusal(history, name, d.task.max_hops)
    if refused:
        return bugs(d, state, HopLimit.rare_reason, HopLimit(f"{d.task_name}[{d.task_id}] cannot hop to {name}: "
                                                             f"{refused}"), args=args, kwargs=kwargs, now=now)
    body, headers, props = d.copy({**hdr.write(hdr.Attempt(1, now, queue=dest.name)), hdr.HOPS: history},
                                  name=name, args=args, kwargs=kwargs, retries=0)
    fields = {"target": name, "reason": reason, "queue": dest.name, "hops": len(history),
              **_expiry(state, expired)}
    return Ending(HOP, d, to_queue(dest, body, headers, props), Ignore(), fields=fields, first=HOPPED)


def hop_history(d: Delivery, state: hdr.Attempt, reason: str, now: float) -> list[dict[str, Any]]:
    """The message's hop history with this task's entry added (the eager loop's hops too)."""
    return [*hops.read(d.headers.get(hdr.HOPS)),
            hops.entry(d.task_name, d.queue or d.task_name, reason, state.number, state.first_at, now)]


def bugs(d: Delivery, state: hdr.Attempt, reason: str, exc: BaseException, *, args: Any = None,
         kwargs: Any = None, attempts: int | None = None, keep_error: bool = False, now: float | None = None,
         expired: bool = False) -> Ending:
    """The message ends in its bug queue for ``reason`` after ``attempts`` (default: this one's
    number; 0 for a message screened before it could run); ``keep_error``: the message's last
    error stays where ``exc`` says nothing."""
    now = time.time() if now is None else now
    attempts = state.number if attempts is None else attempts
    extra = {**hdr.write(replace(state, due=None, queue=d.queue)), **hdr.error(exc),
             **hdr.bug(reason, attempts, d.task_name, now)}
    history = hops.read(d.headers.get(hdr.HOPS))
    if history:
        extra[hdr.HOPS] = [*history, hops.entry(d.task_name, d.queue or "", reason, state.number, state.first_at, now)]
    body, headers, props = d.copy(extra, args=args, kwargs=kwargs, retries=max(state.number - 1, 0),
                                  keep=hdr.LAST_ERROR if keep_error else ())
    copy = to_bugs(d.bug_queue, body, headers, props, own_kind(d.app))
    fields = {"reason": reason, "attempts": attempts, "queue": d.bug_queue, **_expiry(state, expired)}
    return Ending(BUGS, d, copy, exc, exc, fields)


def lost(ending: Ending, reason: str, state: hdr.Attempt) -> Ending:
    """``ending`` of an attempt that was lost (``reason``: its process or worker died, a hard time limit):
    reported as such too (``rare-lost``)."""
    return replace(ending, fields={**ending.fields, "lost": (reason, state.number)})


def next_place(d: Delivery, state: hdr.Attempt, decision: RetryIn | GiveUp | HopTo, exc: BaseException | None,
               *, args: Any = None, kwargs: Any = None, keep_error: bool = False, now: float | None = None) -> Ending:
    """What a policy's decision about attempt ``state`` makes of the message: a retry, a hop to the
    fallback, or the bug queue (``exc`` is what the attempt raised, or why it ends)."""
    if isinstance(decision, RetryIn):
        return retry(d, state, decision.delay, exc, args=args, kwargs=kwargs, now=now)
    expired = decision.reason == EXPIRED
    if isinstance(decision, HopTo):
        return hop(d, state, decision.target, decision.reason, args=args, kwargs=kwargs, now=now, expired=expired)
    assert exc is not None, "a give-up names its exception"
    return bugs(d, state, decision.reason, exc, args=args, kwargs=kwargs, keep_error=keep_error, now=now,
                expired=expired)


def put_back(d: Delivery, why: str, *, count: int) -> Ending:
    """A delivery with no next place (its copy could not be made or published): the same message again
    in its queue with ``x-rare-deliveries = count``, its copy id kept. Past :data:`MAX_DELIVERIES`:
    the bug queue, ``unroutable``."""
    if count <= MAX_DELIVERIES:
        body, headers, props = d.same({hdr.DELIVERIES: count, hdr.RETURNED: why[: hdr.MAX_ERROR]})
        return Ending(PUT_BACK, d, Copy(body, headers, props, "", d.queue or "", None), Ignore(),
                      fields={"count": count, "why": why})
    error = PublishRefused(f"delivered {count} times without reaching a next place; last: {why}")
    attempt = d.headers.get(hdr.ATTEMPT)
    attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1
    body, headers, props = d.same({**hdr.bug(UNROUTABLE, attempt, d.task_name), **hdr.error(error),
                                   hdr.QUEUE: d.queue, hdr.DELIVERIES: count})
    copy = to_bugs(d.bug_queue, body, headers, props, own_kind(d.app))
    return Ending(BUGS, d, copy, error, error, {"reason": UNROUTABLE, "attempts": attempt, "queue": d.bug_queue})


def give_back(d: Delivery) -> Ending:
    """A message a worker that stops warm had prefetched and never started: the same message back in its
    queue, nothing counted (so that a message the broker delivers again always means a worker that
    died or lost its connection)."""
    body, headers, props = d.same({})
    return Ending(GIVE_BACK, d, Copy(body, headers, props, "", d.queue or "", None), Ignore())


def requeue(d: Delivery) -> Ending:
    """``raise Reject(requeue=True)``: back to its queue as a copy marked ``x-rare-requeued``, so that
    no worker takes its return for a lost delivery."""
    body, headers, props = d.same({hdr.REQUEUED: True})
    return Ending(REQUEUE, d, Copy(body, headers, props, "", d.queue or "", None), Ignore())


def _waits(ending: Ending) -> float:
    """The TTL (s) of the delay queue the ending's copy waits in; 0 when it went straight back. It names
    the delay queue (``rare.wait.<TTL>``): the console and ``/metrics`` learn from it where delayed starts
    and retries wait."""
    return ending.copy.waits if ending.copy is not None else 0.0


def done(d: Delivery, how: str) -> Ending:
    """A copy whose delivery had ended before (``how``: ``success``, or the ending that was published)
    and came back because its ack was lost: acked, not run again."""
    return Ending(DONE, d, None, Ignore(), fields={"how": how})


def _expiry(state: hdr.Attempt, expired: bool) -> dict[str, Any]:
    """The shelf life's end, for the ``expired`` report that goes before a give-up's own."""
    return {"expired": (state.deadline, state.number)} if expired else {}


# -- the one report of each ending ---------------------------------------------------------------

def stores_results(task: Any) -> bool:
    """Whether ``task``'s current request stores its result (not ignored, a backend that stores)."""
    from celery.backends.base import DisabledBackend

    req = task.request
    ignore = req.ignore_result if getattr(req, "ignore_result", None) is not None else task.ignore_result
    return not ignore and not isinstance(task.backend, DisabledBackend)


def record_ended(task: Any, headers: Any, how: str) -> None:
    """A delivery's copy (``x-rare-copy``) has ended (``how``: ``success``, or the ending whose copy the
    broker confirmed): kept by this process (:func:`ended_here`) and recorded in the result backend, so
    that the same copy coming back because its ack was lost is acked unrun (:func:`copy_ended`). Only
    key-value result backends (redis, memcached, file, ...) can keep it; best effort (without it, such a
    copy that another worker receives counts as a failed attempt)."""
    ended_here(headers, how)
    backend, copy = _records(task), hdr.copy_id(headers)
    if backend is None or copy is None:
        return
    try:
        backend.set(backend.get_key_for_task(ENDED + copy), how)
    except Exception as exc:  # noqa: BLE001 - a record lost means one more attempt (at least once)
        log.warning("rare_celery: could not record the end of copy %s: %r", copy, exc)


def ended_here(headers: Any, how: str) -> None:
    """This process saw the copy (``x-rare-copy``) of a delivery end (``how``). Its last
    :data:`KEPT_HERE` such copies are kept in memory: the same copy coming back to this worker because
    its ack was lost (its connection was lost: the broker delivers it again, often to the same worker)
    is acked unrun, with any result backend or none."""
    copy = hdr.copy_id(headers)
    if copy is None:
        return
    _ENDED_HERE[copy] = how
    if len(_ENDED_HERE) > KEPT_HERE:
        with contextlib.suppress(KeyError):  # (another thread of the pool took the last one)
            _ENDED_HERE.popitem(last=False)


KEPT_HERE = 10_000  # copies whose end a process keeps in memory (~1.5 MB): more than its unacked messages
_ENDED_HERE: OrderedDict[str, str] = OrderedDict()  # copy id -> how it ended, oldest first


def end_seen_here(headers: Any) -> str | None:
    """How this copy of a message (its ``x-rare-copy``) ended, if this process saw it end (:func:`ended_here`)."""
    copy = hdr.copy_id(headers)
    return _ENDED_HERE.get(copy) if copy is not None else None


def copy_ended(task: Any, headers: Any) -> str | None:
    """How this copy of a message (its ``x-rare-copy``) ended before, if it did: certain when given (this
    process saw it end, or the result backend recorded it). A task id is not a message (new work may
    reuse one): nothing is decided from it."""
    how = end_seen_here(headers)
    if how is not None:
        return how
    copy, backend = hdr.copy_id(headers), _records(task)
    if copy is None or backend is None:
        return None
    try:
        how = backend.get(backend.get_key_for_task(ENDED + copy))
    except Exception as exc:  # noqa: BLE001 - unknown: it runs (at least once)
        log.warning("rare_celery: could not look up copy %s: %r", copy, exc)
        return None
    if how is None:
        return None
    return how.decode("utf-8", "replace") if isinstance(how, bytes) else str(how)


def _records(task: Any) -> Any:
    """``task``'s result backend, if it can keep a key of rare_celery's (a key-value store)."""
    from celery.backends.base import KeyValueStoreBackend

    if task is None:
        return None
    backend = getattr(task.backend, "rare_raw", task.backend)
    return backend if isinstance(backend, KeyValueStoreBackend) else None


def store_first(ending: Ending, reporter: Reporter) -> None:
    """The result state that must be stored before the copy exists (a next attempt or the hop's
    target may finish, and store its own, first). Raises what the backend raises."""
    d = ending.delivery
    if ending.first is None or not reporter.stores or not d.task_id:
        return
    backend = d.task.backend
    if ending.first == RETRY_STATE:
        backend.mark_as_retry(d.task_id, ending.exc, request=d.request)
    else:
        meta = {k: ending.fields[k] for k in ("queue", "reason", "hops")}
        backend.store_result(d.task_id, {"hopped_to": ending.fields["target"], **meta}, HOPPED, request=d.request)


def report(ending: Ending, reporter: Reporter) -> None:
    """Log, signal and send the events of ``ending`` (after its copy is confirmed). Each step that
    fails is logged; none raises."""
    d, f, exc = ending.delivery, ending.fields, ending.exc
    task, who = d.task, f"{d.task_name}[{d.task_id}]"

    def event(kind: str, **fields: Any) -> None:
        if reporter.send is not None:
            with _best_effort(f"send the {kind} event"):
                events.send(reporter.send, kind, d.task_id, d.task_name, **fields)

    def signal(sig: Any, **kw: Any) -> None:
        if task is not None:
            with _best_effort(f"send {sig.name}"):
                sig.send(sender=task, request=d.request, **kw)

    if "lost" in f:
        event(events.LOST, queue=d.queue, reason=f["lost"][0], attempt=f["lost"][1])
    if "expired" in f:
        deadline, attempts = f["expired"]
        signal(signals.expired, deadline=deadline, attempts=attempts)
        event(events.EXPIRED, deadline=deadline, attempts=attempts)
    if ending.kind == RETRY:
        if reporter.celery_reports:
            log.warning("rare_celery: %s attempt %d failed (%s); attempt %d in %.3g s", who, f["attempt"], exc,
                        f["attempt"] + 1, f["delay"])
            if reporter.send is not None:
                with _best_effort("send task-retried"):
                    reporter.send("task-retried", uuid=d.task_id, exception=repr(exc), traceback="",
                                  eta=events.eta(f["due"]))
        signal(signals.retry_scheduled, attempt=f["attempt"], delay=f["delay"], exception=exc)
        event(events.RETRY, attempt=f["attempt"], delay=f["delay"], **events.failure(exc), queue=d.queue,
              waits=_waits(ending))
    elif ending.kind == WAIT:
        event(events.WAIT, due=f.get("due"), queue=d.queue, waits=_waits(ending),
              **{k: f[k] for k in ("breaker", "line", "limit") if k in f})
    elif ending.kind == HOP:
        log.info("rare_celery: %s hopped to %s on %s: %s", who, f["target"], f["queue"], f["reason"])
        signal(signals.hopped, source=d.task_name, target=f["target"], reason=f["reason"], queue=f["queue"])
        event(events.HOP, target=f["target"], reason=f["reason"], queue=f["queue"])
    elif ending.kind == BUGS:
        log.warning("rare_celery: %s routed to %s: %s (%s: %s)", who, f["queue"], f["reason"], type(exc).__name__,
                    str(exc)[:200])
        if reporter.celery_reports and task is not None and d.task_id:
            _failed(ending, reporter)
        signal(signals.routed_to_bugs, reason=f["reason"], attempts=f["attempts"], exception=exc, queue=f["queue"])
        event(events.BUGS, reason=f["reason"], attempts=f["attempts"], **events.failure(exc), queue=f["queue"])
    elif ending.kind == PUT_BACK:
        log.warning("rare_celery: %s put back in %s (delivery %d of at most %d without a next place): %s", who,
                    d.queue, f["count"], MAX_DELIVERIES, f["why"])
        event(events.PUT_BACK, queue=d.queue, deliveries=f["count"], why=str(f["why"])[: events.ERROR_CHARS])
    elif ending.kind == REQUEUE:
        if reporter.send is not None:
            with _best_effort("send task-rejected"):
                reporter.send("task-rejected", uuid=d.task_id, requeue=True)
    elif ending.kind == GIVE_BACK:
        log.info("rare_celery: %s given back to %s unstarted (the worker stops)", who, d.queue)
    elif ending.kind == DONE:
        how = f["how"]
        log.warning("rare_celery: %s came back after %s (its ack was lost): not run again", who,
                    "it had succeeded" if how == SUCCESS else f"its {how} was published")


def _failed(ending: Ending, reporter: Reporter) -> None:
    """FAILURE in the result backend (errbacks, chord), Celery's ``task_failure`` signal and
    ``task-failed`` event: from the main process, which has no tracer to make them."""
    d, exc = ending.delivery, ending.exc
    with _best_effort("store FAILURE"):
        d.task.backend.mark_as_failure(d.task_id, exc, request=d.request, store_result=reporter.stores)
    with _best_effort("send task_failure"):
        celery_signals.task_failure.send(sender=d.task, task_id=d.task_id, exception=exc, args=None, kwargs=None,
                                         traceback=None, einfo=None)
    if reporter.send is not None:
        with _best_effort("send task-failed"):
            reporter.send("task-failed", uuid=d.task_id, exception=repr(exc), traceback="")


class _best_effort:
    """``with _best_effort("what")``: an exception inside is logged, not raised (reports only)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        if isinstance(value, Exception):
            log.warning("rare_celery: could not %s: %r", self.what, value)
            return True
        return False
