"""RareTask: a Celery Task whose retries wait in RabbitMQ delay queues, not in worker memory.

Data flow of one failed attempt (inside the pool process that ran it)::

    run() raises -> Policy.decide() -> RetryIn(delay): publish the same message (same id, args,
                                       canvas, ids, reply_to) to a delay queue, confirmed; raise
                                       Celery's Retry (RETRY state, task_retry, task-retried; ack)
                                    -> GiveUp(reason): publish it to the bug queue, confirmed;
                                       re-raise (FAILURE state, task_failure, errbacks; ack)

If a confirmed publish is refused, the original message is rejected with requeue: it is never
acked before its copy is safe in the broker.
"""

from __future__ import annotations

import inspect
import logging
import time
from datetime import datetime, timezone

from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from . import backoff as _backoff
from . import headers as hdr
from .exceptions import Bug, Exhausted, Expired, PublishRefused
from .policy import EXPIRED, REJECTED, GiveUp, Policy
from .publish import send_delayed, send_to_bugs
from .topology import queue_kind

log = logging.getLogger(__name__)
EARLY_SLEEP = 0.02  # a message this close to its due time waits in the worker instead of going round again
REFUSED_PAUSE = 1.0  # pause before requeueing a message whose copy the broker refused


class RareTask(Task):
    """Base class for tasks that retry through broker-side delay queues.

    Class attributes (also accepted as ``@app.task(base=RareTask, ...)`` options):

    * ``max_attempts`` - executions in all, the first included (``None``: until the shelf life ends);
    * ``backoff`` - seconds to wait before attempt 2, 3, ...: a :mod:`rare_celery.backoff` schedule,
      a list (manual schedule, last value repeats), a number or a timedelta;
    * ``expires_in`` - shelf life from the first publish (seconds or timedelta);
    * ``retry_on`` - exceptions that are retried; others go to the bug queue at once;
    * ``bug_queue`` - where final failures go (default ``<queue>.bugs``).
    """

    abstract = True  # no registration of the base class itself
    max_attempts: int | None = 5
    backoff: object = _backoff.exponential(5, cap=600)
    expires_in: object = None
    retry_on: object = (Exception,)
    bug_queue: str | None = None

    acks_late = True
    acks_on_failure_or_timeout = True
    reject_on_worker_lost = True
    serializer = "json"
    max_retries = None  # attempts are counted by rare_celery, not by Celery's retries
    rare_policy: Policy = Policy.build("RareTask", 5, backoff, None, (Exception,))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name") or cls.__name__
        cls.rare_policy = Policy.build(name, cls.max_attempts, cls.backoff, cls.expires_in, cls.retry_on)

    @classmethod
    def bind(cls, app):
        from .app import setup_app

        setup_app(app)
        return super().bind(app)

    # -- publisher side ------------------------------------------------------------------------

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None, link=None,
                    link_error=None, shadow=None, **options):
        """Celery's ``apply_async``, with the first-publish time and the deadline in headers.

        Celery's ``expires`` becomes part of the deadline (a RareTask is never revoked silently).
        """
        now = time.time()
        headers = dict(options.pop("headers", None) or {})
        headers.setdefault(hdr.PREFIX + "first-at", now)
        deadline = self.rare_policy.deadline(headers[hdr.PREFIX + "first-at"])
        expires = options.pop("expires", None)
        if expires is not None:
            at = _epoch(expires, now)
            deadline = at if deadline is None else min(deadline, at)
        if deadline is not None:
            headers[hdr.PREFIX + "deadline"] = deadline
        return super().apply_async(args, kwargs, task_id=task_id, producer=producer, link=link,
                                   link_error=link_error, shadow=shadow, headers=headers, **options)

    # -- worker side ---------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        req = self.request
        if req.called_directly or req.is_eager:
            return self.run(*args, **kwargs)
        try:
            state = hdr.read(req.headers)
        except hdr.HeaderError as exc:
            self._give_up(REJECTED, exc, hdr.Attempt(1, time.time()))
            raise
        now = time.time()
        if state.due is not None and state.due > now:
            if state.due - now > EARLY_SLEEP:
                self._publish(state.due - now, state, None, keep_error=True)
                raise Ignore()
            time.sleep(state.due - now)
        if state.deadline is not None and time.time() > state.deadline:
            exc = Expired(f"shelf life ended at {_iso(state.deadline)} before attempt {state.number}")
            self._give_up(EXPIRED, exc, state, keep_error=True)
            raise exc
        try:
            return self.run(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            if getattr(exc, "_rare_routed", False):
                raise
            if isinstance(exc, TypeError) and not _accepts(self.run, args, kwargs):
                exc = Bug(f"wrong arguments for {self.name}: {exc}")
            self.retry(exc=exc)

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None,
              max_retries=None, **options):
        """Schedule the next attempt through a delay queue, or route to the bug queue.

        Same signature as Celery's ``Task.retry``: ``countdown``/``eta`` override the backoff
        schedule once, ``max_retries`` the attempt limit (as ``max_retries + 1`` attempts).
        Raises ``Retry`` when scheduled; when no attempt is left, raises ``exc`` (or
        :class:`Exhausted`/:class:`Expired` without one) after the message is in the bug queue.
        """
        req = self.request
        if req.called_directly or req.is_eager:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        state = hdr.read(req.headers)
        now = time.time()
        if eta is not None:
            countdown = _epoch(eta, now) - now
        limit = None if max_retries is None else max_retries + 1
        decision = self.rare_policy.decide(state.number, exc, now, state.deadline, countdown, limit)
        if isinstance(decision, GiveUp):
            if exc is None:
                exc = (Expired if decision.reason == EXPIRED else Exhausted)(
                    f"{self.name}[{req.id}]: {decision.reason} after {state.number} attempts")
            self._give_up(decision.reason, exc, state, args, kwargs)
            exc._rare_routed = True
            raise exc
        self._publish(decision.delay, hdr.Attempt(state.number + 1, state.first_at, state.deadline,
                                                  now + decision.delay, state.queue),
                      exc, args=args, kwargs=kwargs)
        ret = Retry(exc=exc, when=decision.delay)
        if throw:
            raise ret
        return ret

    # -- publishing copies of the current message ---------------------------------------------

    def _publish(self, delay: float, nxt: hdr.Attempt, exc, keep_error=False, args=None, kwargs=None):
        queue = self._work_queue(nxt)
        nxt = hdr.Attempt(nxt.number, nxt.first_at, nxt.deadline, nxt.due, queue)
        extra = hdr.write(nxt)
        extra.update(self._error_headers(exc, keep_error))
        body, headers, props = self._message(args, kwargs, extra, retries=nxt.number - 1)
        self._send(lambda p: send_delayed(p, body, work_queue=queue, delay=delay, kind=self._kind(queue),
                                          headers=headers, **props))

    def _give_up(self, reason: str, exc, state: hdr.Attempt, args=None, kwargs=None, keep_error=False):
        queue = self._work_queue(state)
        state = hdr.Attempt(state.number, state.first_at, state.deadline, None, queue)
        extra = hdr.write(state)
        extra.update(self._error_headers(exc, keep_error))
        extra.update(hdr.bug(reason, state.number, self.name))
        body, headers, props = self._message(args, kwargs, extra, retries=state.number - 1)
        bugs = self.bug_queue or f"{queue}.bugs"
        self._send(lambda p: send_to_bugs(p, body, queue=bugs, kind=self._kind(queue),
                                          headers=headers, **props))
        log.warning("rare_celery: %s[%s] routed to %s: %s (%s)", self.name, self.request.id, bugs,
                    reason, type(exc).__name__)

    def _send(self, publish) -> None:
        try:
            with self.app.producer_pool.acquire(block=True) as producer:
                publish(producer)
        except PublishRefused as exc:
            log.error("rare_celery: %s[%s] kept in its queue: %s", self.name, self.request.id, exc)
            time.sleep(REFUSED_PAUSE)  # no hot loop while the broker refuses
            raise Reject(str(exc), requeue=True) from None

    def _error_headers(self, exc, keep_error: bool) -> dict:
        """The new error's headers; with ``keep_error``, the message's last error where there is none."""
        kept = {k: v for k, v in (self.request.headers or {}).items() if k in hdr.ERROR} if keep_error else {}
        return {**kept, **hdr.error(exc)}

    def _message(self, args, kwargs, extra: dict, retries: int):
        """The current message rebuilt for a republish: same id, args, canvas, ids and reply_to."""
        req = self.request
        opts = req.as_execution_options()
        stamps = {k: opts[k] for k in (opts.get("stamped_headers") or []) if k in opts}
        msg = self.app.amqp.as_task_v2(
            req.id, self.name, req.args if args is None else args, req.kwargs if kwargs is None else kwargs,
            group_id=req.group, group_index=req.group_index, retries=retries, chord=req.chord,
            callbacks=req.callbacks, errbacks=req.errbacks, reply_to=req.reply_to,
            time_limit=opts["time_limit"], soft_time_limit=opts["soft_time_limit"],
            root_id=req.root_id, parent_id=req.parent_id, shadow=req.shadow, chain=req.chain,
            origin=req.origin, ignore_result=bool(req.ignore_result),
            stamped_headers=opts.get("stamped_headers"),
            replaced_task_nesting=req.replaced_task_nesting or 0, **stamps,
        )
        headers = {**hdr.carried(req.headers), **msg.headers, **extra}
        props = dict(msg.properties)
        priority = (req.delivery_info or {}).get("priority")
        if priority is not None:
            props["priority"] = priority
        return msg.body, headers, props

    def _work_queue(self, state: hdr.Attempt) -> str:
        """The work queue this message belongs to: its header, else where it was delivered from."""
        if state.queue:
            return state.queue
        info = self.request.delivery_info or {}
        exchange, key = info.get("exchange"), info.get("routing_key")
        if exchange == "" and key:
            return key
        for queue in self.app.amqp.queues.values():
            if queue.exchange is not None and queue.exchange.name == exchange and queue.routing_key == key:
                return queue.name
        return getattr(self, "queue", None) or self.app.conf.task_default_queue

    def _kind(self, queue: str) -> str:
        return queue_kind(self.app.amqp.queues.get(queue))


def _accepts(fn, args, kwargs) -> bool:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _epoch(when, now: float) -> float:
    """A Celery ``expires``/``eta`` (seconds from now, datetime or ISO string) as epoch seconds."""
    if isinstance(when, (int, float)):
        return now + when
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")
