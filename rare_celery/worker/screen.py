"""A look at each message of a rare queue before Celery's, in the worker's main process.

* which queue it came from (for the pool process and every ending);
* a **redelivered** message (its worker died or lost its connection) counts as a failed attempt, unless
  its copy had ended (:func:`rare_celery.worker.request.came_back`), before anything runs;
* a **put-back copy** (``x-rare-deliveries``) of a delivery this worker saw end is acked unrun; one of
  a delivery this worker still runs (its connection was lost under it) waits here, unacked, until
  that attempt has ended, then is screened again;
* headers nested too deep for the pool process (billiard pickles them: a list nested ~500 deep
  fails, and the worker with it) -> the bug queue, ``rejected``;
* Celery's ``expires`` folded into the deadline;
* an **early arrival** (a delayed start, an off-grid delay) or an attempt whose **breaker is open**
  -> a delay queue until it is due, from here, before Celery makes a request of it (no pool process,
  no task events but ``rare-wait``);
* a message Celery would reject or drop on a rare queue (unregistered task, invalid message, a body
  that cannot be decoded) -> copied to its bug queue first, then Celery's own handler runs.

Every ending is built by :mod:`rare_celery.endings` and settled by
:func:`rare_celery.worker.request.settle` (copy confirmed, then ack, then report).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed, DecodeError

from .. import breaker as br
from .. import breaker_io, endings
from .. import headers as hdr
from ..app import fold_expires
from ..message import QUEUE_KEY, Delivery
from ..policy import EARLY_SLEEP
from ..reasons import REJECTED
from .request import came_back, ends_here, settle

log = logging.getLogger(__name__)
HELD_LOOK = 1.0  # seconds between looks at a put-back copy whose attempt this worker still runs


class Screen:
    """The screen of one worker's consumer ``c``; ``queues``: the rare work queues it consumes."""

    def __init__(self, c: Any) -> None:
        self.c = c
        self.queues: set[str] = set()

    def reporter(self, celery_reports: bool = False) -> endings.Reporter:
        dispatcher = getattr(self.c, "event_dispatcher", None)
        send = dispatcher.send if dispatcher is not None and dispatcher.enabled else None
        return endings.Reporter(send=send, celery_reports=celery_reports, stores=True)

    def strategy(self, task: Any, strategy: Callable[..., Any]) -> Callable[..., Any]:
        """Celery's strategy for a RareTask, behind the screen."""

        def screened(message: Any, *args: Any, **kwargs: Any) -> Any:
            headers = message.headers
            queue = queue_of(self.c, message)
            if isinstance(message.delivery_info, dict):
                message.delivery_info[QUEUE_KEY] = queue
            if isinstance(headers, dict) and hdr.too_deep(headers):
                return self._too_deep(task, message, queue)
            problem = hdr.protocol_problem(headers) if isinstance(headers, dict) else None
            if problem is not None:  # Celery's headers of the wrong type: Celery's request would fail on them
                return self._too_deep(task, message, queue, problem)
            if (message.delivery_info or {}).get("redelivered"):
                args, kwargs = _arguments(message)
                came_back(Delivery.received(self.c.app, task, message, queue), ack=message.ack,
                          requeue=lambda: message.reject(requeue=True), reporter=self.reporter(celery_reports=True),
                          args=args, kwargs=kwargs)
                return None
            if hdr.deliveries(headers) and self._seen_here(task, message, queue,
                                                           lambda: screened(message, *args, **kwargs)):
                return None
            if isinstance(headers, dict) and headers.get(hdr.REQUEUED) is True and isinstance(message.delivery_info, dict):
                message.delivery_info["redelivered"] = True  # Reject(requeue=True): as Celery shows it
            if isinstance(headers, dict) and headers.get("expires") is not None:
                fold_expires(headers)
            if isinstance(headers, dict) and headers.get(hdr.DUE) is not None and self._wait(task, message, queue):
                return None
            watch = getattr(self.c, "rare_breakers", None)
            if watch is not None and task.rare_breaker is not None and self._hold(task, message, queue, watch):
                return None
            try:
                return strategy(message, *args, **kwargs)
            except (InvalidTaskError, ContentDisallowed, DecodeError):
                raise
            except Exception as exc:  # Celery cannot make a request of it (a body not [args, kwargs, embed]):
                raise InvalidTaskError(f"{type(exc).__name__}: {exc}") from exc  # to the bug queue, not a crash
        return screened

    def _seen_here(self, task: Any, message: Any, queue: str | None, again: Callable[[], Any]) -> bool:
        """A put-back copy (``x-rare-deliveries``; a redelivery this worker put back, see
        :func:`~rare_celery.worker.request.came_back`) of a delivery this worker saw end: acked unrun;
        or of a delivery this worker still runs (its connection was lost under it) or whose ending it
        is still publishing: kept here, unacked, and screened ``again`` every :data:`HELD_LOOK` s until
        that ends (the attempt running here ends it; run beside it, it would run twice). False: it goes on."""
        how = endings.end_seen_here(message.headers)
        d = Delivery.received(self.c.app, task, message, queue)
        if how is not None:
            try:
                settle(endings.done(d, how), message.ack, self.reporter(celery_reports=True))
            except Exception as exc:  # noqa: BLE001 - unacked: the broker gives it back (redelivered), it ends then
                log.warning("rare_celery: %s[%s] could not be acked (%s)", d.task_name, d.task_id, exc)
            return True
        timer = getattr(self.c, "timer", None)
        if timer is None or not ends_here(d):
            return False
        if not getattr(message, "rare_waits", False):
            log.info("rare_celery: %s[%s] was put back while this worker still runs it (or publishes its "
                     "ending): it waits, unacked, for that to end", d.task_name, d.task_id)
            message.rare_waits = True
        timer.call_after(HELD_LOOK, _look_again, (message, again))
        return True

    def _too_deep(self, task: Any, message: Any, queue: str | None, problem: str | None = None) -> None:
        """A message the pool process must not see (headers nested too deep, or ``problem``): the bug
        queue, ``rejected``; its failure stored if it has a task id."""
        headers = message.headers
        if problem is None:
            key = next(k for k, v in headers.items() if hdr.too_deep(v, hdr.MAX_DEPTH - 1))
            problem = f"header {key} is nested deeper than {hdr.MAX_DEPTH} levels"
        exc = hdr.HeaderError(problem)
        d = Delivery.received(self.c.app, task, message, queue)
        try:
            settle(endings.bugs(d, hdr.Attempt(1, time.time()), REJECTED, exc, attempts=0), message.ack,
                   self.reporter(celery_reports=True))  # FAILURE stored: .get() must not hang
        except Exception as err:  # noqa: BLE001 - kept unacked: redelivered after a reconnect
            log.error("rare_celery: could not copy a message with nested headers to %s (%s); it stays unacked",
                      d.bug_queue, err)

    def _wait(self, task: Any, message: Any, queue: str | None) -> bool:
        """An early arrival: back to a delay queue for the rest. False when the pool process must look
        at it instead (nonsense headers, a deadline, a publish refused)."""
        now = time.time()
        try:
            state = hdr.read(message.headers, now)
        except hdr.HeaderError:
            return False
        return state.due is not None and self._send_round(task, message, queue, state, state.due, now)

    def _hold(self, task: Any, message: Any, queue: str | None, watch: breaker_io.Watch) -> bool:
        """An attempt whose breaker is open: to a delay queue until the probe time. When the breaker is
        due for a probe, one attempt at a time goes on to the pool to try for the probe lock; the
        others wait for the probe's verdict: at most its lease (:data:`~rare_celery.breaker.PROBE_LEASE`), one
        round, not one a second."""
        name, now = task.breaker, time.time()
        action, until = br.verdict(watch.states.get(name), now)
        if action == br.RUN:
            return False
        if action == br.PROBE:
            if now - watch.candidates.get(name, 0.0) > 2 * br.PROBE_WAIT:
                watch.candidates[name] = now
                return False
            until = now + br.PROBE_LEASE
        try:
            state = hdr.read(message.headers, now)
        except hdr.HeaderError:
            return False
        return self._send_round(task, message, queue, state, cast(float, until), now, breaker=name)  # set: not RUN

    def _send_round(self, task: Any, message: Any, queue: str | None, state: hdr.Attempt, due: float, now: float,
                    breaker: str | None = None) -> bool:
        """A wait until ``due`` (its deadline, if sooner), settled from here; False when the pool
        process must look at it instead."""
        if not queue or task.dispatch_on:
            return False
        # the deadline as this worker reads it: a message that came without it (another producer's)
        # keeps its shelf life from here on instead of starting it anew each round
        deadline = state.deadline if state.deadline is not None else task.rare_policy.deadline(state.first_at)
        if deadline is not None and (now > deadline or (state.due or 0) > deadline):
            return False
        if min(due, deadline if deadline is not None else due) - now <= EARLY_SLEEP:
            return False
        d = Delivery.received(self.c.app, task, message, queue)
        try:
            settle(endings.wait(d, replace(state, deadline=deadline), due, breaker=breaker, now=now), message.ack,
                   self.reporter())
        except Exception as exc:  # noqa: BLE001 - the pool process tries (and reports) it instead
            log.warning("rare_celery: could not send an early arrival round again from the main process (%s)", exc)
            return False
        return True

    def guard_body(self, original: Callable[..., Any], reason: str, why: str) -> Callable[..., Any]:
        """Wrap one of Celery's handlers of bad task messages, ``(body, message[, exc])``: copy the
        message to its bug queue first, then let Celery's handler run (it acks or rejects)."""

        def handler(body: Any, message: Any, *exc: Any) -> Any:
            if self._copied(message, reason, why, exc[0] if exc else None):
                return original(body, message, *exc)
            return None
        return handler

    def guard_decode(self, original: Callable[..., Any], reason: str, why: str) -> Callable[..., Any]:
        """Wrap Celery's handler of bodies that cannot be decoded, ``(message, exc)`` (see :meth:`guard_body`)."""

        def handler(message: Any, exc: BaseException) -> Any:
            if self._copied(message, reason, why, exc):
                return original(message, exc)
            return None
        return handler

    def _copied(self, message: Any, reason: str, why: str, exc: BaseException | None) -> bool:
        """Whether Celery's handler may go on: the message is not on a rare queue, or its copy in the bug
        queue is confirmed. False keeps it unacked (redelivered after a reconnect)."""
        queue = queue_of(self.c, message)
        if queue not in self.queues:
            return True
        d = Delivery.received(self.c.app, None, message, queue)
        text = why.format(exc=exc, name=d.task_name)
        try:
            settle(endings.bugs(d, hdr.Attempt(1, time.time()), reason, hdr.HeaderError(text), attempts=0),
                   lambda: None, self.reporter())  # Celery's handler acks or rejects it, and reports
        except Exception as err:  # noqa: BLE001 - kept unacked: redelivered after a reconnect
            log.error("rare_celery: could not copy a bad message from %s to its bug queue (%s); "
                      "it stays unacked", queue, err)
            return False
        return True


def _look_again(message: Any, again: Callable[[], Any]) -> None:
    """A put-back copy kept while the same copy's attempt ran here, screened again (from the consumer's
    timer); unless its channel closed meanwhile: then the broker has it back and gives it again."""
    if message.acknowledged or not getattr(message.channel, "is_open", True):
        return
    try:
        again()
    except Exception as exc:  # noqa: BLE001 - never into the timer: back to the broker (redelivered), not lost
        log.error("rare_celery: a put-back message could not be screened again (%r); it is rejected back to "
                  "its queue", exc)
        with contextlib.suppress(Exception):
            message.reject(requeue=True)


def _arguments(message: Any) -> tuple[Any, Any]:
    """A task message's ``(args, kwargs)`` (for a payload handler's policy), or ``(None, None)``."""
    try:
        body = message.decode()
        return (body[0], body[1]) if isinstance(body, (list, tuple)) and len(body) >= 2 else (None, None)
    except Exception:  # noqa: BLE001 - the task's own policy decides
        return None, None


def queue_of(c: Any, message: Any) -> str | None:
    """The queue ``message`` was delivered from, by its consumer tag (kombu has no public map from
    tags to queues; ``Consumer._active_tags`` is the one it keeps)."""
    tag = (message.delivery_info or {}).get("consumer_tag")
    tags = getattr(c.task_consumer, "_active_tags", {}) if c.task_consumer else {}
    return next((queue for queue, t in tags.items() if t == tag), None)
