"""RareTask: a Celery Task whose retries wait in RabbitMQ delay queues, not in worker memory.

This module is the task's options (checked when the class is defined) and the publisher's side
(``apply_async``). A delivery's run is :mod:`rare_celery.pool` (in the pool process, or eagerly); the
endings it can have are :mod:`rare_celery.endings`; the worker's main process is :mod:`rare_celery.worker`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NoReturn, cast

from celery import Task
from celery.backends.base import DisabledBackend
from celery.exceptions import Retry

from . import backoff as _backoff
from . import batch, hops
from . import breaker as br
from . import headers as hdr
from .app import setup_app
from .durations import MAX_DELAY, epoch
from .endings import SUCCESS, record_ended
from .exceptions import Hop
from .policy import Policy
from .pool import attempt as pool
from .pool.eager import EagerRetry
from .pool.eager import run as run_eagerly
from .pool.tracer import tracer_for
from .topology import name_problem
from .worker.bootsteps import BreakerStep, RareConsumerStep
from .worker.lines import LinesStep

log = logging.getLogger(__name__)
_OVERRIDABLE = ("max_attempts", "backoff", "expires_in", "retry_on", "fallback")


@dataclass(frozen=True)
class Handler:
    """A payload handler: the function and its policy (the task's, with the handler's overrides)."""

    key: str
    fn: Callable[..., Any]
    policy: Policy


class _AttemptNumber:
    """``self.attempt``: the number of the attempt running now (1 = the first run; a hop starts again
    at 1). Read-only for rare_celery, yet a task's own ``self.attempt = ...`` (or ``del``) is its own
    attribute and wins: a non-data descriptor never takes a user's attribute over."""

    def __get__(self, task: Any, owner: Any = None) -> Any:
        if task is None:
            return self
        found = getattr(task.request, "rare_current", None)
        return found.attempt.number if found else hdr.read(task.request.headers).number


# Celery's built-in tasks (celery.chord_unlock, celery.group, ...) become subclasses of the app's
# task_cls: with task_cls = RareTask they keep Celery's own behaviour, attribute by attribute.
_CELERYS_OWN = ("__call__", "apply_async", "retry", "__trace__", "backend", "Request", "acks_late",
                "acks_on_failure_or_timeout", "acks_on_failure", "acks_on_timeout", "reject_on_worker_lost",
                "retry_on_worker_lost", "serializer", "max_retries")


def _check_routing(owner: str, bug_queue: object, max_hops: object, dispatch_on: object) -> None:
    """``bug_queue``, ``max_hops`` and ``dispatch_on``, checked when the class is defined (the other
    options are checked by :meth:`Policy.build`); ``ValueError`` names the task and the option."""
    problem = None
    if bug_queue is not None:
        problem = name_problem(bug_queue)
        problem = problem and f"bug_queue: {problem}"
    if problem is None and (not isinstance(max_hops, int) or isinstance(max_hops, bool)
                            or not 0 <= max_hops <= hops.MAX_HOPS_LIMIT):
        problem = f"max_hops must be a whole number from 0 to {hops.MAX_HOPS_LIMIT}, got {max_hops!r:.80}"
    if problem is None and dispatch_on is not None and (not isinstance(dispatch_on, str) or not dispatch_on):
        problem = f"dispatch_on must be a payload key (a non-empty string) or None, got {dispatch_on!r:.80}"
    if problem:
        raise ValueError(f"{owner}: {problem}")


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
    * ``dispatch_on`` - payload key that picks a handler registered with :meth:`handler`;
    * ``breaker`` - the downstream service's name: tasks that name the same one share a circuit
      breaker across all workers (:mod:`rare_celery.breaker`), set by ``breaker_failures`` (failures
      in a row that open it), ``breaker_within`` (s), ``breaker_open`` (s, the first open period)
      and ``breaker_max_open`` (s, the longest after failed probes); ``service_rate`` (``"30/s"``,
      ``"1000/h"``: at most that many attempts in any such window) and ``service_concurrency``
      (attempts in flight at most), both across all workers of all hosts.
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
    breaker: str | None = None
    breaker_failures: int = br.DEFAULTS.failures
    breaker_within: object = br.DEFAULTS.within
    breaker_open: object = br.DEFAULTS.open_for
    breaker_max_open: object = br.DEFAULTS.max_open
    service_rate: str | None = None
    service_concurrency: int | None = None
    rare_breaker: br.Settings | None = None

    Request = "rare_celery.worker.request:RareRequest"  # the main process's side: lost workers, time limits, put-backs
    acks_late = True
    acks_on_failure_or_timeout = True  # Celery 5.4; 5.5+ reads the two below
    acks_on_failure = True  # a final failure is acked once its bug-queue copy is confirmed
    acks_on_timeout = False  # a hard time limit is routed by the worker (worker/request.py), never acked unrouted
    reject_on_worker_lost = True  # a killed pool process is routed by the worker (worker/request.py)
    retry_on_worker_lost = False  # Celery 5.7's own ETA retry on worker loss: not for RareTask
    serializer = "json"
    max_retries = None  # attempts are counted by rare_celery, not by Celery's retries
    rare_policy: Policy | None = Policy.build("RareTask", max_attempts=5, backoff=backoff, expires_in=None,
                                              retry_on=(Exception,))
    handlers: ClassVar[dict[str, Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if str(cls.__dict__.get("name") or "").startswith("celery."):  # a built-in made from task_cls
            for attr in _CELERYS_OWN:
                if attr not in cls.__dict__:  # Celery 5.4 has no acks_on_failure: None, as unset
                    setattr(cls, attr, Task.__dict__.get(attr))
            cls.rare_policy = cls.rare_breaker = None
            return
        cls.rare_policy = Policy.build(cls._owner(), **{k: getattr(cls, k) for k in _OVERRIDABLE})
        cls.rare_breaker = br.Settings.build(cls._owner(), cls.breaker, failures=cls.breaker_failures,
                                             within=cls.breaker_within, open_for=cls.breaker_open,
                                             max_open=cls.breaker_max_open, rate=cls.service_rate,
                                             concurrency=cls.service_concurrency)
        _check_routing(cls._owner(), cls.bug_queue, cls.max_hops, cls.dispatch_on)
        cls.handlers = dict(cls.handlers)

    @classmethod
    def _owner(cls) -> str:
        return cls.__dict__.get("name") or cls.__name__

    @classmethod
    def handler(cls, key: str, **overrides: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register ``fn(payload)`` for payloads whose ``dispatch_on`` key equals ``key``.

        ``overrides`` may set ``max_attempts``, ``backoff``, ``expires_in``, ``retry_on``, ``fallback``.
        """
        unknown = set(overrides) - set(_OVERRIDABLE)
        if unknown:
            raise ValueError(f"{cls._owner()}.handler({key!r}): unknown option(s) {sorted(unknown)}; "
                             f"handlers may set {', '.join(_OVERRIDABLE)}")
        settings = {k: overrides.get(k, getattr(cls, k)) for k in _OVERRIDABLE}
        policy = Policy.build(f"{cls._owner()}[{key}]", **settings)

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            cls.handlers[key] = Handler(key, fn, policy)
            return fn
        return register

    @classmethod
    def bind(cls, app: Any) -> Any:
        setup_app(app, RareConsumerStep, BreakerStep, LinesStep)
        return super().bind(app)

    # -- the pool process's tracer, guarded (see rare_celery.request) -----------------------------

    @property
    def __trace__(self) -> Any:
        return self.__dict__.get("_rare_tracer")

    @__trace__.setter
    def __trace__(self, tracer: Any) -> None:
        self.__dict__["_rare_tracer"] = None if tracer is None else tracer_for(self, tracer)

    @property
    def backend(self) -> Any:
        """Celery's result backend; during an attempt on a worker, as :class:`_AttemptBackend` sees it."""
        backend = self._backend if self._backend is not None else self.app.backend
        req = self.request_stack.top
        if req is None or req.called_directly or req.is_eager or isinstance(backend, DisabledBackend):
            return backend
        return _AttemptBackend(backend, self, req)

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    # -- publisher side ------------------------------------------------------------------------

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None, producer: Any = None,
                    link: Any = None, link_error: Any = None, shadow: str | None = None, **options: Any) -> Any:
        """Celery's ``apply_async``, with the first-publish time in headers.

        ``countdown``/``eta`` become a due time (``x-rare-due``): the first worker to see the message
        sends it to a delay queue (the worker holds nothing) and runs it when it is due. It counts
        toward nothing: the first run is still attempt 1, and the shelf life starts now. Celery's
        ``expires`` becomes part of the deadline (see :func:`rare_celery.app.fold_expires`).
        """
        now = time.time()
        headers = dict(options.pop("headers", None) or {})
        headers.setdefault(hdr.FIRST_AT, now)
        headers.update(hdr.new_copy())
        countdown, eta = options.pop("countdown", None), options.pop("eta", None)
        delay = epoch(eta, now) - now if eta is not None else countdown
        if delay is not None and delay >= 0.001:
            if delay > MAX_DELAY:
                raise ValueError(f"{self.name}: a delayed start of {delay:.0f} s is longer than 10 years "
                                 f"(RabbitMQ's longest wait)")
            expires = options.get("expires", self.expires)
            if expires is not None and epoch(expires, now) < now + delay:
                raise ValueError(f"{self.name}: the delayed start ({delay:g} s from now) is after its expires: "
                                 f"the task could never run")
            headers[hdr.DUE] = now + delay
        together = batch.current(self.app) if producer is None else None
        if together is not None:  # inside ``with bulk(app):`` its channel, confirmed when the block ends
            producer, options["retry"] = together.producer, False
        return super().apply_async(args, kwargs, task_id=task_id, producer=producer, link=link,
                                   link_error=link_error, shadow=shadow, headers=headers, **options)

    # -- worker side ---------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        req = self.request
        if req.called_directly:
            return self.run(*args, **kwargs)
        if req.is_eager:
            return run_eagerly(self, args, kwargs)
        return pool.run(self, args, kwargs)

    attempt = _AttemptNumber()

    def policy_for(self, args: Any, kwargs: Any) -> Policy:
        """The policy that decides what follows an attempt with these arguments: its payload
        handler's (``dispatch_on``), else the task's own."""
        try:
            return pool.dispatch(self, args, kwargs)[0]
        except Exception:  # noqa: BLE001 - no handler: the task's own policy decides
            return cast(Policy, self.rare_policy)

    def hop(self, target: object, *args: Any, reason: str = "", **kwargs: Any) -> NoReturn:
        """Move the work to ``target`` now (see :class:`~rare_celery.Hop`); does not return."""
        raise Hop(target, *args, reason=reason, **kwargs)

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
              eta: object = None, countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Any:
        """Schedule the next attempt through a delay queue, or route to the bug queue or fallback.

        Same signature as Celery's ``Task.retry``: ``countdown``/``eta`` override the backoff
        schedule once, ``max_retries`` the attempt limit (as ``max_retries + 1`` attempts).
        Raises ``Retry`` when scheduled (returns it with ``throw=False``: the retry is then this
        delivery's ending, whatever the task does next); when no attempt is left, raises ``exc`` (or
        :class:`Exhausted`/:class:`Expired` without one) after the message is in the bug queue.
        """
        req = self.request
        now = time.time()
        if eta is not None:
            countdown = epoch(eta, now) - now
        limit = None if max_retries is None else max_retries + 1
        if req.called_directly:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        if req.is_eager:
            raise EagerRetry(exc, countdown, limit)
        try:
            pool.retry(self, exc, args=args, kwargs=kwargs, countdown=countdown, limit=limit)
        except Retry as ret:
            if throw:
                raise
            return ret


class _AttemptBackend:
    """The result backend as an attempt on a worker uses it: a RETRY stored before the retry's publish
    is not stored again after it (a next attempt that already finished would lose its SUCCESS), and
    the message's copy is recorded as ended (:func:`rare_celery.endings.record_ended`) as soon as its
    SUCCESS is stored: the same copy coming back after a lost ack is acked unrun."""

    def __init__(self, backend: Any, task: Any, req: Any) -> None:
        self.rare_raw, self._task, self._req = backend, task, req

    def mark_as_retry(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._req, "rare_retry_stored", False):
            return None
        return self.rare_raw.mark_as_retry(*args, **kwargs)

    def mark_as_done(self, task_id: str, result: Any, request: Any = None, *args: Any, **kwargs: Any) -> Any:
        out = self.rare_raw.mark_as_done(task_id, result, request, *args, **kwargs)
        record_ended(self._task, self._req.headers, SUCCESS)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rare_raw, name)
