"""RareTask: a Celery Task whose retries wait in RabbitMQ delay queues, not in worker memory.

One attempt, inside the pool process that runs it::

    headers -> early? send round again | expired? -> run() -> Policy.decide()
        RetryIn(delay)  publish the same message to a delay queue (confirmed), raise Celery's Retry
                        (RETRY state, task_retry, task-retried, ack)
        GiveUp(reason)  publish it to the bug queue (confirmed), re-raise
                        (FAILURE state, task_failure, errbacks, ack)
        HopTo(task)     publish it to the fallback task's queue (confirmed), store HOPPED, ack

Nothing is acked before its copy is confirmed; a refused publish requeues the original.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, ClassVar

from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from . import backoff as _backoff
from . import headers as hdr
from . import hops, signals
from .exceptions import Bug, Exhausted, Expired, Hop, HopLimit, NoHandler, PublishRefused, WorkerLost
from .message import rebuild
from .policy import EXPIRED, REJECTED, GiveUp, HopTo, Policy, RetryIn
from .publish import send, send_delayed, send_to_bugs
from .topology import DELAY_EXCHANGE, delay_queue, grid_floor, queue_kind

log = logging.getLogger(__name__)
EARLY_SLEEP = 0.02  # a message this close to its due time waits in the worker instead of going round again
REFUSED_PAUSE, REFUSED_TRIES = 1.0, 12  # a refused publish is tried again for about 4 minutes
HOPPED = "HOPPED"  # result state of a task whose work moved on (not ready: .get() waits for the target)
_OVERRIDABLE = ("max_attempts", "backoff", "expires_in", "retry_on", "fallback")


@dataclass(frozen=True)
class Handler:
    """A payload handler: the function and its policy (the task's, with the handler's overrides)."""

    key: str
    fn: Callable
    policy: Policy


class RareTask(Task):
    """Base class for tasks that retry through broker-side delay queues.

    Class attributes (also accepted as ``@app.task(base=RareTask, ...)`` options):

    * ``max_attempts`` - executions in all, the first included (``None``: until the shelf life ends);
    * ``backoff`` - seconds to wait before attempt 2, 3, ...: a :mod:`rare_celery.backoff` schedule,
      a list (manual schedule, last value repeats), a number or a timedelta;
    * ``expires_in`` - shelf life from the first publish (seconds or timedelta);
    * ``retry_on`` - exceptions that are retried; others go to the bug queue at once;
    * ``bug_queue`` - where final failures go (default ``<queue>.bugs``);
    * ``fallback`` - task (name or class) that takes the work when attempts or shelf life run out;
    * ``max_hops`` - hops a message may make before it ends in the bug queue (``hop_limit``);
    * ``dispatch_on`` - payload key that picks a handler registered with :meth:`handler`.
    """

    abstract = True  # no registration of the base class itself
    max_attempts: int | None = 5
    backoff: object = _backoff.exponential(5, cap=600)
    expires_in: object = None
    retry_on: object = (Exception,)
    bug_queue: str | None = None
    fallback: object = None
    max_hops: int = hops.MAX_HOPS
    dispatch_on: str | None = None

    acks_late = True
    acks_on_failure_or_timeout = True  # Celery 5.4; 5.5+ reads the two below
    acks_on_failure = True  # a final failure is acked once its bug-queue copy is confirmed
    acks_on_timeout = False  # a hard time limit requeues: it counts as a lost attempt
    reject_on_worker_lost = True  # a killed pool process requeues: it counts as a lost attempt
    retry_on_worker_lost = False  # Celery 5.7's own ETA retry on worker loss: not for RareTask
    serializer = "json"
    max_retries = None  # attempts are counted by rare_celery, not by Celery's retries
    rare_policy: Policy = Policy.build("RareTask", 5, backoff, None, (Exception,))
    handlers: ClassVar[dict[str, Handler]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.rare_policy = Policy.build(cls._owner(), *(getattr(cls, k) for k in _OVERRIDABLE))
        cls.handlers = dict(cls.handlers)

    @classmethod
    def _owner(cls) -> str:
        return cls.__dict__.get("name") or cls.__name__

    @classmethod
    def handler(cls, key: str, **overrides) -> Callable[[Callable], Callable]:
        """Register ``fn(payload)`` for payloads whose ``dispatch_on`` key equals ``key``.

        ``overrides`` may set ``max_attempts``, ``backoff``, ``expires_in``, ``retry_on``, ``fallback``.
        """
        unknown = set(overrides) - set(_OVERRIDABLE)
        if unknown:
            raise ValueError(f"{cls._owner()}.handler({key!r}): unknown option(s) {sorted(unknown)}; "
                             f"handlers may set {', '.join(_OVERRIDABLE)}")
        settings = {k: overrides.get(k, getattr(cls, k)) for k in _OVERRIDABLE}
        policy = Policy.build(f"{cls._owner()}[{key}]", *settings.values())

        def register(fn: Callable) -> Callable:
            cls.handlers[key] = Handler(key, fn, policy)
            return fn
        return register

    @classmethod
    def bind(cls, app):
        from .app import setup_app

        setup_app(app)
        return super().bind(app)

    # -- publisher side ------------------------------------------------------------------------

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None, link=None,
                    link_error=None, shadow=None, **options):
        """Celery's ``apply_async``, with the first-publish time in headers.

        Celery's ``expires`` becomes part of the deadline (a RareTask is never revoked silently).
        ``countdown``/``eta`` wait in a delay queue, like retries (the worker holds nothing), and
        count toward nothing: the first run is still attempt 1, the shelf life starts now.
        """
        now = time.time()
        headers = dict(options.pop("headers", None) or {})
        headers.setdefault(hdr.PREFIX + "first-at", now)
        expires = options.pop("expires", None)
        if expires is not None:
            headers[hdr.PREFIX + "deadline"] = _epoch(expires, now)
        countdown, eta = options.pop("countdown", None), options.pop("eta", None)
        delay = _epoch(eta, now) - now if eta is not None else countdown
        if delay is not None and delay >= 0.001:
            queue = self._route_for(args, kwargs, options)
            waits_in = delay_queue(grid_floor(int(delay * 1000)), queue_kind(queue))
            headers.update({hdr.PREFIX + "due": now + delay, hdr.PREFIX + "queue": queue.name,
                            "BCC": [waits_in.name]})
            options.update(queue=queue, exchange=DELAY_EXCHANGE.name, routing_key=queue.name,
                           declare=[queue, waits_in])
        return super().apply_async(args, kwargs, task_id=task_id, producer=producer, link=link,
                                   link_error=link_error, shadow=shadow, headers=headers, **options)

    def _route_for(self, args, kwargs, options):
        """The kombu Queue Celery's router picks for this task with these options."""
        wanted = dict(options)
        if not wanted.get("queue") and getattr(self, "queue", None):
            wanted["queue"] = self.queue
        return self.app.amqp.router.route(wanted, self.name, args, kwargs, self)["queue"]

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
                self._publish_delayed(state.due - now, state, None, keep_error=True)
                raise Ignore()
            time.sleep(state.due - now)
        try:
            policy, fn = self._dispatch(args, kwargs)
        except NoHandler as exc:
            self._conclude(GiveUp(exc.rare_reason), exc, state, self.rare_policy)
        if state.deadline is None and policy.expires_in is not None:
            state = hdr.Attempt(state.number, state.first_at, policy.deadline(state.first_at), None, state.queue)
        req._rare = (state, policy)
        if state.deadline is not None and time.time() > state.deadline:
            exc = Expired(f"shelf life ended at {_iso(state.deadline)} before attempt {state.number}")
            self._conclude(policy.out_of(EXPIRED), exc, state, policy, keep_error=True)
        if (req.delivery_info or {}).get("redelivered"):
            self._lost(state, policy)
        signals.attempt_started.send(sender=self, request=req, attempt=state.number)
        try:
            return fn(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise
        except Hop as hop:
            new = hop.args or hop.kwargs  # no arguments given: the current ones go along
            self._hop(hop.target, hop.reason, state, hop.args if new else None, hop.kwargs if new else None)
        except Exception as exc:
            if getattr(exc, "_rare_routed", False):
                raise
            if isinstance(exc, TypeError) and not _accepts(fn, args, kwargs):
                exc = Bug(f"wrong arguments for {self.name}: {exc}")
            self.retry(exc=exc)

    def _lost(self, state: hdr.Attempt, policy: Policy):
        """A redelivered message: its attempt was lost with its worker. Count it, never loop."""
        exc = WorkerLost(f"attempt {state.number} was delivered before and never acked: "
                         f"the worker running it died or lost its connection")
        decision = policy.after_loss(state.number, time.time(), state.deadline)
        if not isinstance(decision, RetryIn):
            self._conclude(decision, exc, state, policy)
        raise self._schedule(decision.delay, state, exc)

    def _dispatch(self, args, kwargs) -> tuple[Policy, Callable]:
        """The policy and function for this message: the task's own, or its payload handler's."""
        if not self.dispatch_on:
            return self.rare_policy, self.run
        payload = args[0] if args else kwargs.get("payload")
        kind = payload.get(self.dispatch_on) if isinstance(payload, dict) else None
        handler = self.handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise NoHandler(f"{self.name}: no handler for {self.dispatch_on}={_short(kind)} "
                            f"(payload {_short(payload)}); handlers: {sorted(self.handlers)}")
        return handler.policy, handler.fn

    @property
    def attempt(self) -> int:
        """The number of the attempt running now (1 = the first run; a hop starts again at 1)."""
        state = getattr(self.request, "_rare", None)
        return state[0].number if state else hdr.read(self.request.headers).number

    def hop(self, target, *args, reason: str = "", **kwargs):
        """Move the work to ``target`` now (see :class:`~rare_celery.Hop`); does not return."""
        raise Hop(target, *args, reason=reason, **kwargs)

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None,
              max_retries=None, **options):
        """Schedule the next attempt through a delay queue, or route to the bug queue or fallback.

        Same signature as Celery's ``Task.retry``: ``countdown``/``eta`` override the backoff
        schedule once, ``max_retries`` the attempt limit (as ``max_retries + 1`` attempts).
        Raises ``Retry`` when scheduled; when no attempt is left, raises ``exc`` (or
        :class:`Exhausted`/:class:`Expired` without one) after the message is in the bug queue.
        """
        req = self.request
        if req.called_directly or req.is_eager:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        state, policy = getattr(req, "_rare", None) or (hdr.read(req.headers), self.rare_policy)
        now = time.time()
        if eta is not None:
            countdown = _epoch(eta, now) - now
        limit = None if max_retries is None else max_retries + 1
        decision = policy.decide(state.number, exc, now, state.deadline, countdown, limit)
        if not isinstance(decision, RetryIn):
            if exc is None:
                exc = (Expired if decision.reason == EXPIRED else Exhausted)(
                    f"{self.name}[{req.id}]: {decision.reason} after {state.number} attempts")
            self._conclude(decision, exc, state, policy, args=args, kwargs=kwargs)
        ret = self._schedule(decision.delay, state, exc, args, kwargs)
        if throw:
            raise ret
        return ret

    def _schedule(self, delay: float, state: hdr.Attempt, exc, args=None, kwargs=None) -> Retry:
        """Publish the next attempt to come back in ``delay`` seconds; the ``Retry`` to raise."""
        nxt = hdr.Attempt(state.number + 1, state.first_at, state.deadline, time.time() + delay, state.queue)
        self._publish_delayed(delay, nxt, exc, args=args, kwargs=kwargs)
        signals.retry_scheduled.send(sender=self, request=self.request, attempt=state.number, delay=delay,
                                     exception=exc)
        return Retry(exc=exc, when=delay)

    # -- where the message goes next -------------------------------------------------------------

    def _conclude(self, decision, exc, state: hdr.Attempt, policy: Policy, args=None, kwargs=None,
                  keep_error=False):
        """No more attempts here: hop to the fallback, or the bug queue. Always raises."""
        if decision.reason == EXPIRED:
            signals.expired.send(sender=self, request=self.request, deadline=state.deadline,
                                 attempts=state.number)
        if isinstance(decision, HopTo):
            self._hop(decision.target, decision.reason, state, args, kwargs)
        self._give_up(decision.reason, exc, state, args, kwargs, keep_error)
        exc._rare_routed = True
        raise exc

    def _hop(self, target, reason: str, state: hdr.Attempt, args=None, kwargs=None):
        """Publish the work to ``target``'s queue (same id, fresh attempts), then end this run."""
        req, now = self.request, time.time()
        name = _task_name(self.app, target)
        queue = self._work_queue(state)
        history = [*hops.read((req.headers or {}).get(hops.HEADER)),
                   hops.entry(self.name, queue, reason, state.number, state.first_at, now)]
        refused = hops.refusal(history, name, self.max_hops)
        if refused:
            exc = HopLimit(f"{self.name}[{req.id}] cannot hop to {name}: {refused}")
            self._give_up(exc.rare_reason, exc, state, args, kwargs)
            exc._rare_routed = True
            raise exc
        target_task = self.app.tasks.get(name)
        dest = _target_queue(self.app, name, target_task)
        extra = {hdr.PREFIX + "attempt": 1, hdr.PREFIX + "first-at": now, hdr.PREFIX + "queue": dest.name,
                 hops.HEADER: history}
        body, headers, props = rebuild(self, name=name, args=args, kwargs=kwargs, retries=0, extra=extra)
        if not self.ignore_result and not req.ignore_result:  # before the publish: the target may finish first
            self.update_state(state=HOPPED, meta={"hopped_to": name, "queue": dest.name, "reason": reason,
                                                  "hops": len(history)})
        self._send(lambda p: send(p, body, exchange="", routing_key=dest.name, target=dest,
                                  headers=headers, **props))
        log.info("rare_celery: %s[%s] hopped to %s on %s: %s", self.name, req.id, name, dest.name, reason)
        signals.hopped.send(sender=self, request=req, source=self.name, target=name, reason=reason,
                            queue=dest.name)
        raise Ignore()

    def _give_up(self, reason: str, exc, state: hdr.Attempt, args=None, kwargs=None, keep_error=False):
        req = self.request
        queue = self._work_queue(state)
        extra = hdr.write(hdr.Attempt(state.number, state.first_at, state.deadline, None, queue))
        extra.update(self._error_headers(exc, keep_error))
        extra.update(hdr.bug(reason, state.number, self.name))
        history = hops.read((req.headers or {}).get(hops.HEADER))
        if history:
            extra[hops.HEADER] = [*history, hops.entry(self.name, queue, reason, state.number, state.first_at,
                                                       time.time())]
        body, headers, props = rebuild(self, args=args, kwargs=kwargs, retries=state.number - 1, extra=extra)
        bugs = self.bug_queue or f"{queue}.bugs"
        self._send(lambda p: send_to_bugs(p, body, queue=bugs, headers=headers, **props))
        log.warning("rare_celery: %s[%s] routed to %s: %s (%s)", self.name, req.id, bugs, reason,
                    type(exc).__name__)
        signals.routed_to_bugs.send(sender=self, request=req, reason=reason, attempts=state.number,
                                    exception=exc, queue=bugs)

    def _publish_delayed(self, delay: float, nxt: hdr.Attempt, exc, keep_error=False, args=None, kwargs=None):
        queue = self._work_queue(nxt)
        extra = hdr.write(hdr.Attempt(nxt.number, nxt.first_at, nxt.deadline, nxt.due, queue))
        extra.update(self._error_headers(exc, keep_error))
        body, headers, props = rebuild(self, args=args, kwargs=kwargs, retries=nxt.number - 1, extra=extra)
        self._send(lambda p: send_delayed(p, body, work_queue=queue, delay=delay, kind=self._kind(queue),
                                          headers=headers, **props))

    def _send(self, publish) -> None:
        """Publish a copy of this message; until the broker confirms it, this message stays unacked.

        A refusal the broker may get over (a nack: a full queue; a lost connection) is tried again,
        waiting 1, 2, 4 ... 30 s, while the message stays unacked and its attempt is not counted
        again. Anything else, or a refusal that lasts ``REFUSED_TRIES`` tries, requeues the message:
        its next delivery counts as a failed attempt, so nothing loops for ever.
        """
        pause = REFUSED_PAUSE
        for tries in range(1, REFUSED_TRIES + 1):
            try:
                with self.app.producer_pool.acquire(block=True) as producer:
                    publish(producer)
                return
            except PublishRefused as exc:
                again = exc.transient and tries < REFUSED_TRIES
                log.error("rare_celery: %s[%s] kept in its queue (not acked): %s; %s", self.name, self.request.id,
                          exc, f"trying again in {pause:g} s" if again else "requeued")
                time.sleep(pause)  # no hot loop, whatever happens next
                if not again:
                    raise Reject(str(exc), requeue=True) from None
                pause = min(pause * 2, 30.0)

    def _error_headers(self, exc, keep_error: bool) -> dict:
        """The new error's headers; with ``keep_error``, the message's last error where there is none."""
        kept = {k: v for k, v in (self.request.headers or {}).items() if k in hdr.ERROR} if keep_error else {}
        return {**kept, **hdr.error(exc)}

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


def _task_name(app, target) -> str:
    """A fallback or hop target as a task name: a name, a task, or a task class registered in ``app``."""
    if isinstance(target, str):
        return target
    if isinstance(target, type):
        found = [t.name for t in app.tasks.values() if type(t) is target]
        if found:
            return found[0]
    name = getattr(target, "name", None)
    if not name:
        raise ValueError(f"cannot hop to {target!r}: not a task name and not registered in {app.main!r}")
    return name


def _target_queue(app, name: str, task):
    """The kombu Queue a hop to task ``name`` goes to (its ``queue``, or Celery's routing)."""
    wanted = {"queue": task.queue} if getattr(task, "queue", None) else {}
    return app.amqp.router.route(wanted, name, task_type=task)["queue"]


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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
