"""RareTask: a Celery Task whose retries wait in RabbitMQ delay queues, not in worker memory.

One delivery, inside the pool process that runs it::

    admit   headers nonsense?        -> bug queue (rejected)
            a copy of a success?     -> acked, not run (the worker lost its ack before)
            early (x-rare-due)?      -> delay queue for the rest, not run, nothing counted
            shelf life over?         -> fallback task, or bug queue (expired)
            its breaker open?        -> delay queue until the probe time, not run, nothing counted
    run()   Policy.decide()          -> RetryIn: delay queue   GiveUp: bug queue   HopTo: fallback
            raise Hop(...)           -> the next task's queue

Every way out of a delivery goes through :meth:`RareTask._end`: the copy of the message is
published to its next place, confirmed and mandatory, and only then is Celery told what to do
(``Retry``, the exception, or ``Ignore``), which makes it ack. A delivery ends once. Anything that
fails before the broker confirmed the copy raises :class:`~rare_celery.exceptions.RoutingFailed`:
the message is not acked, and the worker's main process puts it back (:mod:`rare_celery.request`).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable, ClassVar, NamedTuple, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from . import backoff as _backoff
from . import batch, breaker_io, events, hops, signals
from . import breaker as br
from . import headers as hdr
from .app import setup_app
from .exceptions import Bug, Exhausted, Expired, Hop, HopLimit, NoHandler, RoutingFailed
from .inventory import resolve_task_name, target_queue, work_queue_of
from .message import rebuild, retry_call
from .policy import BUG, EARLY_SLEEP, EXPIRED, REJECTED, GiveUp, HopTo, Policy, RetryIn, slack
from .publish import PATIENCE, Copy, send_patiently, shielded, to_bugs, to_delay, to_queue
from .request import ENDING, QUEUE, tracer_for
from .topology import bug_queue_name, delay_kind, name_problem, own_kind
from .worker import BreakerStep, RareConsumerStep

log = logging.getLogger(__name__)
ROUTING_PAUSE = 1.0  # after a failed ending, before the message is put back: never a hot loop
HOPPED = "HOPPED"  # result state of a task whose work moved on (not ready: .get() waits for the target)
_OVERRIDABLE = ("max_attempts", "backoff", "expires_in", "retry_on", "fallback")


@dataclass(frozen=True)
class Handler:
    """A payload handler: the function and its policy (the task's, with the handler's overrides)."""

    key: str
    fn: Callable
    policy: Policy


class Current(NamedTuple):
    """The attempt running now and the policy that decides what follows it."""

    attempt: hdr.Attempt
    policy: Policy


class _EagerRetry(Retry):
    """``retry()`` called in an eager run: the eager loop (not the broker) runs the next attempt."""

    def __init__(self, exc, countdown, limit):
        super().__init__(exc=exc, when=countdown)
        self.countdown, self.limit = countdown, limit


class _AttemptNumber:
    """``self.attempt``: the number of the attempt running now (1 = the first run; a hop starts again
    at 1). Read-only for rare_celery, yet a task's own ``self.attempt = ...`` (or ``del``) is its own
    attribute and wins: a non-data descriptor never takes a user's attribute over."""

    def __get__(self, task, owner=None):
        if task is None:
            return self
        current = getattr(task.request, "rare_current", None)
        return current.attempt.number if current else hdr.read(task.request.headers).number


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
      and ``breaker_max_open`` (s, the longest after failed probes).
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
    breaker_failures: int = 5
    breaker_within: object = 60
    breaker_open: object = 30
    breaker_max_open: object = 300
    rare_breaker: br.Settings | None = None

    Request = "rare_celery.request:RareRequest"  # the worker's side: lost workers, time limits, put-backs
    acks_late = True
    acks_on_failure_or_timeout = True  # Celery 5.4; 5.5+ reads the two below
    acks_on_failure = True  # a final failure is acked once its bug-queue copy is confirmed
    acks_on_timeout = False  # a hard time limit is routed by the worker (request.py), never acked unrouted
    reject_on_worker_lost = True  # a killed pool process is routed by the worker (request.py)
    retry_on_worker_lost = False  # Celery 5.7's own ETA retry on worker loss: not for RareTask
    serializer = "json"
    max_retries = None  # attempts are counted by rare_celery, not by Celery's retries
    rare_policy: Policy | None = Policy.build("RareTask", max_attempts=5, backoff=backoff, expires_in=None,
                                              retry_on=(Exception,))
    handlers: ClassVar[dict[str, Handler]] = {}

    def __init_subclass__(cls, **kwargs):
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
                                             max_open=cls.breaker_max_open)
        _check_routing(cls._owner(), cls.bug_queue, cls.max_hops, cls.dispatch_on)
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
        policy = Policy.build(f"{cls._owner()}[{key}]", **settings)

        def register(fn: Callable) -> Callable:
            cls.handlers[key] = Handler(key, fn, policy)
            return fn
        return register

    @classmethod
    def bind(cls, app):
        setup_app(app, RareConsumerStep, BreakerStep)
        return super().bind(app)

    # -- the pool process's tracer, guarded (see rare_celery.request) -----------------------------

    @property
    def __trace__(self):
        return self.__dict__.get("_rare_tracer")

    @__trace__.setter
    def __trace__(self, tracer):
        self.__dict__["_rare_tracer"] = None if tracer is None else tracer_for(self, tracer)

    @property
    def backend(self):
        """Celery's result backend, except that the RETRY a retry stored before its publish is not
        stored again after it (a next attempt that already finished would lose its SUCCESS)."""
        backend = self._backend if self._backend is not None else self.app.backend
        req = self.request_stack.top
        return _RetryStored(backend) if getattr(req, "rare_retry_stored", False) else backend

    @backend.setter
    def backend(self, value):
        self._backend = value

    # -- publisher side ------------------------------------------------------------------------

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None, link=None,
                    link_error=None, shadow=None, **options):
        """Celery's ``apply_async``, with the first-publish time in headers.

        ``countdown``/``eta`` become a due time (``x-rare-due``): the first worker to see the message
        sends it to a delay queue (the worker holds nothing) and runs it when it is due. It counts
        toward nothing: the first run is still attempt 1, and the shelf life starts now. Celery's
        ``expires`` becomes part of the deadline (see :func:`rare_celery.app.fold_expires`).
        """
        now = time.time()
        headers = dict(options.pop("headers", None) or {})
        headers.setdefault(hdr.FIRST_AT, now)
        countdown, eta = options.pop("countdown", None), options.pop("eta", None)
        delay = _epoch(eta, now) - now if eta is not None else countdown
        if delay is not None and delay >= 0.001:
            if delay > hdr.MAX_DELAY:
                raise ValueError(f"{self.name}: a delayed start of {delay:.0f} s is longer than 10 years "
                                 f"(RabbitMQ's longest wait)")
            expires = options.get("expires", self.expires)
            if expires is not None and _epoch(expires, now) < now + delay:
                raise ValueError(f"{self.name}: the delayed start ({delay:g} s from now) is after its expires: "
                                 f"the task could never run")
            headers[hdr.DUE] = now + delay
        together = batch.current(self.app) if producer is None else None
        if together is not None:  # inside ``with bulk(app):`` its channel, confirmed when the block ends
            producer, options["retry"] = together.producer, False
        return super().apply_async(args, kwargs, task_id=task_id, producer=producer, link=link,
                                   link_error=link_error, shadow=shadow, headers=headers, **options)

    # -- worker side ---------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        req = self.request
        if req.called_directly:
            return self.run(*args, **kwargs)
        if req.is_eager:
            return self._eagerly(args, kwargs)
        req.rare_started = time.monotonic()
        fn = self._admit(args, kwargs)
        try:
            return self._attempt(fn, args, kwargs)
        finally:  # a breaker hears of every attempt; all but a retryable failure (told in retry) say it answered
            self._breaker_told(failed=False)

    def _attempt(self, fn: Callable, args, kwargs):
        req = self.request
        signals.attempt_started.send(sender=self, request=req, attempt=req.rare_current.attempt.number)
        try:
            result = fn(*args, **kwargs)
        except (Ignore, Reject):
            raise  # the task's own choice (Task.replace raises Ignore): Celery acks or rejects
        except Hop as hop:
            self._hop_raised(hop)
        except Retry as r:  # a Retry raised by hand, not through self.retry()
            self._ended_before()
            _end_here(self.retry, r.exc)
        except Exception as exc:  # noqa: BLE001 - every failure is the policy's to decide
            self._ended_before()
            if isinstance(exc, TypeError) and not _accepts(fn, args, kwargs):  # never retried: a bug
                wrong = TypeError(f"wrong arguments for {self.name}: {exc}").with_traceback(exc.__traceback__)
                _end_here(lambda exc: self._to_bugs(BUG, exc, req.rare_current), wrong)
            _end_here(self.retry, exc)
        self._ended_before()  # retry(throw=False), then returned: the retry is this delivery's ending
        return result

    def _admit(self, args, kwargs) -> Callable:
        """Check a delivery before it runs; route it elsewhere (raising) when it must not run now."""
        req, now = self.request, time.time()
        try:
            state = hdr.read(req.headers, now)
        except hdr.HeaderError as exc:
            self._to_bugs(REJECTED, exc, Current(hdr.Attempt(1, now), self.rare_policy))
        if hdr.deliveries(req.headers) and self._succeeded_before():
            log.warning("rare_celery: %s[%s] came back after it had succeeded (its ack was lost): not run again",
                        self.name, req.id)
            self._end(None, Ignore())
        try:
            policy, fn = self._dispatch(args, kwargs)
        except NoHandler as exc:
            self._to_bugs(exc.rare_reason, exc, Current(state, self.rare_policy))
        if state.deadline is None and policy.expires_in is not None:
            state = replace(state, deadline=policy.deadline(state.first_at))
        current = req.rare_current = Current(state, policy)
        if state.due is not None and state.deadline is not None and state.due > state.deadline:
            exc = hdr.HeaderError(f"header {hdr.DUE} is after the end of the shelf life ({_iso(state.deadline)}): "
                                  f"the message could never run")
            self._to_bugs(REJECTED, exc, current)
        if state.due is not None and state.due > now:
            if state.due - now > EARLY_SLEEP:
                self._wait(current)
            time.sleep(state.due - now)
        if state.deadline is not None and time.time() > state.deadline:
            exc = Expired(f"shelf life ended at {_iso(state.deadline)} before attempt {state.number}")
            self._out_of(policy.out_of(EXPIRED), exc, current, keep_error=True)
        if self.rare_breaker is not None:
            self._breaker_gate(current)
        return fn

    # -- the circuit breaker (rare_celery.breaker): run, probe or wait; then tell it the outcome ----

    def _breaker_gate(self, current: Current) -> None:
        """Let the attempt run (the breaker is closed), make it the probe (the breaker is due for one
        and this process took its lock), or send it to wait, unrun, nothing counted."""
        req, name = self.request, self.breaker
        now = time.time()
        state = breaker_io.board_state(name) or br.State(name)
        action, until = br.verdict(state, now)
        if action == br.PROBE:
            lock, last = breaker_io.try_probe(self.app, name)
            if lock is None:  # another attempt probes (or the broker cannot say): look again soon
                action, until = br.WAIT, now + br.PROBE_WAIT
            else:  # the broker's last state, newer than this worker's board if a note is on its way
                state = last if last is not None and last.order() > state.order() else state
                action, until = br.verdict(state, time.time())
                if action == br.PROBE:
                    state = br.probing(state, req.hostname or "", req.id, time.time())
                    breaker_io.announce(self.app, state.as_note(req.hostname or "", req.id))
                    req.rare_probe = (lock, state)
                else:
                    lock.release()
        if action == br.WAIT:
            self._wait(current, due=until, breaker=name)
        req.rare_breaker_gen, req.rare_breaker_failures = state.gen, bool(state.failures)

    def _breaker_told(self, failed: bool) -> None:
        """Tell the breaker how this delivery's attempt went, once: a probe announces the new state
        and lets its lock go; another attempt sends a failure (or, after failures, a success) note."""
        req = self.request
        gen = getattr(req, "rare_breaker_gen", None)
        if gen is None:
            return
        req.rare_breaker_gen = None
        by, now = req.hostname or "", time.time()
        probe = getattr(req, "rare_probe", None)
        if probe is not None:
            req.rare_probe = None
            lock, state = probe
            try:
                after = br.after_probe(state, self.rare_breaker, failed=failed, now=now)
                breaker_io.announce(self.app, after.as_note(by, req.id))
            finally:
                lock.release()
        elif failed or req.rare_breaker_failures:
            note = br.count_note(self.breaker, br.FAILURE if failed else br.SUCCESS, gen, now, by, req.id)
            breaker_io.announce(self.app, note)

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

    attempt = _AttemptNumber()

    def hop(self, target, *args, reason: str = "", **kwargs) -> NoReturn:
        """Move the work to ``target`` now (see :class:`~rare_celery.Hop`); does not return."""
        raise Hop(target, *args, reason=reason, **kwargs)

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None,
              max_retries=None, **options):
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
            countdown = _epoch(eta, now) - now
        limit = None if max_retries is None else max_retries + 1
        if req.called_directly:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        if req.is_eager:
            raise _EagerRetry(exc, countdown, limit)
        if isinstance(exc, Hop):  # autoretry_for=(Exception,) caught a Hop: it is a hop, not a failure
            self._hop_raised(exc)
        if args is not None or kwargs is not None:
            args, kwargs = retry_call(self.run, req.args, req.kwargs, args, kwargs)
        try:
            self._ended_before()
            current = getattr(req, "rare_current", None) or Current(hdr.read(req.headers), self.rare_policy)
            self._breaker_told(failed=exc is not None and not isinstance(exc, Bug)
                               and isinstance(exc, current.policy.retry_on))
            decision = current.policy.decide(current.attempt, exc=exc, now=now, countdown=countdown, max_attempts=limit)
            if not isinstance(decision, RetryIn):
                if exc is None:
                    exc = (Expired if decision.reason == EXPIRED else Exhausted)(
                        f"{self.name}[{req.id}]: {decision.reason} after {current.attempt.number} attempts")
                self._out_of(decision, exc, current, args=args, kwargs=kwargs)
            self._retry_in(decision.delay, current, exc, args, kwargs)
        except Retry as ret:
            if throw:
                raise
            return ret

    # -- where the message goes next: every way leads through _end ------------------------------

    def _end(self, make: Callable[[], Copy] | None, outcome: BaseException, report: Callable[[], None] | None = None,
             before: Callable[[], None] | None = None) -> NoReturn:
        """The one way out of a delivery: publish the copy ``make()`` builds (confirmed, mandatory),
        then raise ``outcome``, which makes Celery ack. ``before`` runs first (best effort: a result
        state that must be stored before the copy exists), ``report`` after (signals, events, logs).

        A delivery ends once: asked again (a Hop inside autoretry, ``retry(throw=False)``), the first
        ending is raised again and nothing is published twice. Whatever fails before the broker has
        confirmed the copy, of any exception type, raises RoutingFailed: the message stays unacked.
        """
        req = self.request
        self._ended_before()
        with shielded():
            try:
                if before is not None:
                    try:
                        before()
                    except Exception as exc:  # noqa: BLE001 - a result state is a report, the copy is what counts
                        log.warning("rare_celery: %s[%s]: could not store its state first: %r", self.name, req.id, exc)
                if make is not None:
                    send_patiently(self.app, make(), budget=self._patience(), on_refused=self._refused)
            except BaseException as exc:  # noqa: BLE001 - ours, Celery's, the broker's: the message is kept
                why = f"{type(exc).__name__}: {exc}"[: hdr.MAX_ERROR]
                log.error("rare_celery: %s[%s] could not go to its next place (%s); it stays unacked and the "
                          "worker puts it back", self.name, req.id, why)
                time.sleep(ROUTING_PAUSE)
                raise RoutingFailed(why) from None
            _ending_of(req).append(outcome)
        if report is not None:
            try:
                report()
            except Exception as exc:  # noqa: BLE001 - the message is where it belongs already
                log.warning("rare_celery: %s[%s]: reporting its ending failed: %r", self.name, req.id, exc)
        raise outcome

    def _ended_before(self) -> None:
        """Raise this delivery's ending again if it has one already."""
        ending = _ending_of(self.request)
        if ending:
            raise ending[0]

    def _retry_in(self, delay: float, current: Current, exc, args=None, kwargs=None) -> NoReturn:
        req, state = self.request, current.attempt
        nxt = replace(state, number=state.number + 1, due=time.time() + delay)
        queue = self._work_queue()
        retry = Retry(exc=exc, when=delay)

        def make() -> Copy:
            failure = hdr.error(exc)
            retry.rare_traceback = failure.get(hdr.TRACEBACK, "")  # what Celery reports too (RetryInfo)
            extra = {**hdr.write(replace(nxt, queue=queue)), **failure}
            return to_delay(queue, delay, self._kind(queue),
                            *rebuild(self, args=args, kwargs=kwargs, retries=nxt.number - 1, extra=extra),
                            own_kind=own_kind(self.app))

        def store_retry_first() -> None:
            if self._stores_results():
                self.backend.mark_as_retry(req.id, exc, request=req)
                req.rare_retry_stored = True

        def report() -> None:
            signals.retry_scheduled.send(sender=self, request=req, attempt=state.number, delay=delay, exception=exc)
            events.emit(self, events.RETRY, req.id, attempt=state.number, delay=delay,
                        **events.failure(exc), queue=queue)

        self._end(make, retry, report, before=store_retry_first)

    def _out_of(self, decision: GiveUp | HopTo, exc, current: Current, args=None, kwargs=None,
                keep_error=False) -> NoReturn:
        """No more attempts here: hop to the fallback, or the bug queue."""
        req = self.request
        if decision.reason == EXPIRED:
            signals.expired.send(sender=self, request=req, deadline=current.attempt.deadline,
                                 attempts=current.attempt.number)
            events.emit(self, events.EXPIRED, req.id, deadline=current.attempt.deadline,
                        attempts=current.attempt.number)
        if isinstance(decision, HopTo):
            self._hop(decision.target, decision.reason, current, args, kwargs)
        self._to_bugs(decision.reason, exc, current, args, kwargs, keep_error)

    def _hop_raised(self, hop: Hop) -> NoReturn:
        self._ended_before()
        current = getattr(self.request, "rare_current", None) or Current(hdr.read(self.request.headers),
                                                                         self.rare_policy)
        new = hop.args or hop.kwargs  # no arguments given: the current ones go along
        self._hop(hop.target, hop.reason, current, hop.args if new else None, hop.kwargs if new else None)

    def _hop(self, target, reason: str, current: Current, args=None, kwargs=None) -> NoReturn:
        """Publish the work to ``target``'s queue (same id, fresh attempts), then end this run."""
        req, now, state = self.request, time.time(), current.attempt
        queue = self._work_queue()
        try:
            name = resolve_task_name(self.app, target)
            dest = target_queue(self.app, name, self.app.tasks.get(name))
        except Exception as exc:  # noqa: BLE001 - a fallback or Hop that leads nowhere is a bug, not a loop
            self._to_bugs(BUG, Bug(f"{self.name}[{req.id}] cannot hop to {target!r}: {exc}"), current, args, kwargs)
        history = [*hops.read((req.headers or {}).get(hdr.HOPS)),
                   hops.entry(self.name, queue, reason, state.number, state.first_at, now)]
        refused = hops.refusal(history, name, self.max_hops)
        if refused:
            self._to_bugs(HopLimit.rare_reason, HopLimit(f"{self.name}[{req.id}] cannot hop to {name}: {refused}"),
                          current, args, kwargs)

        def make() -> Copy:
            extra = {**hdr.write(hdr.Attempt(1, now, queue=dest.name)), hdr.HOPS: history}
            return to_queue(dest, *rebuild(self, name=name, args=args, kwargs=kwargs, retries=0, extra=extra))

        def store_hopped_first() -> None:  # the target may finish (and store SUCCESS) before this run ends
            if self._stores_results():
                self.update_state(state=HOPPED, meta={"hopped_to": name, "queue": dest.name, "reason": reason,
                                                      "hops": len(history)})

        def report() -> None:
            log.info("rare_celery: %s[%s] hopped to %s on %s: %s", self.name, req.id, name, dest.name, reason)
            signals.hopped.send(sender=self, request=req, source=self.name, target=name, reason=reason,
                                queue=dest.name)
            events.emit(self, events.HOP, req.id, target=name, reason=reason, queue=dest.name)

        self._end(make, Ignore(), report, before=store_hopped_first)

    def _to_bugs(self, reason: str, exc, current: Current, args=None, kwargs=None, keep_error=False) -> NoReturn:
        """Publish the message to its bug queue, then re-raise ``exc`` (FAILURE, errbacks, task_failure)."""
        req, state = self.request, current.attempt
        queue = self._work_queue()
        bugs = self.bug_queue or bug_queue_name(queue)

        def make() -> Copy:
            extra = {**hdr.write(replace(state, due=None, queue=queue)), **self._error_headers(exc, keep_error),
                     **hdr.bug(reason, state.number, self.name)}
            history = hops.read((req.headers or {}).get(hdr.HOPS))
            if history:
                extra[hdr.HOPS] = [*history, hops.entry(self.name, queue, reason, state.number, state.first_at,
                                                           time.time())]
            return to_bugs(bugs, *rebuild(self, args=args, kwargs=kwargs, retries=state.number - 1, extra=extra),
                           own_kind(self.app))

        def report() -> None:
            log.warning("rare_celery: %s[%s] routed to %s: %s (%s)", self.name, req.id, bugs, reason,
                        type(exc).__name__)
            signals.routed_to_bugs.send(sender=self, request=req, reason=reason, attempts=state.number,
                                        exception=exc, queue=bugs)
            events.emit(self, events.BUGS, req.id, reason=reason, attempts=state.number,
                        **events.failure(exc), queue=bugs)

        self._end(make, exc, report)

    def _wait(self, current: Current, due: float | None = None, breaker: str | None = None) -> NoReturn:
        """An early arrival (off-grid delay, delayed start): back to a delay queue for the rest, unrun.
        With ``due``: an attempt its ``breaker`` holds back, until then (or its deadline, if sooner)."""
        req, state = self.request, current.attempt
        if due is not None:
            state = replace(state, due=due if state.deadline is None else min(due, state.deadline))
        queue = self._work_queue()
        rest = state.due - time.time()

        def make() -> Copy:
            extra = {**hdr.write(replace(state, queue=queue)), **self._error_headers(None, keep_error=True)}
            return to_delay(queue, rest, self._kind(queue), *rebuild(self, retries=req.retries or 0, extra=extra),
                            slack=slack(rest), own_kind=own_kind(self.app))

        def report() -> None:
            events.emit(self, events.WAIT, req.id, due=state.due, queue=queue, **({"breaker": breaker} if breaker else {}))

        self._end(make, Ignore(), report)

    # -- helpers -------------------------------------------------------------------------------

    def _error_headers(self, exc, keep_error: bool) -> dict:
        """The new error's headers; with ``keep_error``, the message's last error where there is none."""
        kept = {k: v for k, v in (self.request.headers or {}).items() if k in hdr.LAST_ERROR} if keep_error else {}
        return {**kept, **hdr.error(exc)}

    def _work_queue(self) -> str:
        """The queue this delivery came from (the worker's main process knows it; ``x-rare-queue`` is
        never trusted for routing)."""
        req = self.request
        return (req.delivery_info or {}).get(QUEUE) or work_queue_of(self, req.delivery_info)

    def _kind(self, queue: str) -> str:
        return delay_kind(self.app, queue)

    def _stores_results(self) -> bool:
        from celery.backends.base import DisabledBackend

        req = self.request
        ignore = req.ignore_result if getattr(req, "ignore_result", None) is not None else self.ignore_result
        return not ignore and not isinstance(self.backend, DisabledBackend)

    def _succeeded_before(self) -> bool:
        """Whether the result backend holds SUCCESS for this task id (a lost ack, not a lost run)."""
        if not self._stores_results() or "rpc" in type(self.backend).__name__.lower():
            return False
        try:
            return self.backend.get_state(self.request.id) == "SUCCESS"
        except Exception:  # noqa: BLE001 - unknown: run it (at least once)
            return False

    def _patience(self) -> float:
        """How long a refused publish may be tried again: the back-off, within the hard time limit."""
        req = self.request
        hard = (req.timelimit or (None, None))[0] if getattr(req, "timelimit", None) else None
        hard = hard or self.time_limit or self.app.conf.task_time_limit
        if not hard:
            return PATIENCE
        spent = time.monotonic() - getattr(req, "rare_started", time.monotonic())
        return max(0.0, min(PATIENCE, hard - spent - 2.0))

    def _refused(self, exc, pause: float | None) -> None:
        log.error("rare_celery: %s[%s] kept in its queue (not acked): %s; %s", self.name, self.request.id, exc,
                  f"trying again in {pause:g} s" if pause is not None else "giving up on it for this delivery")

    # -- eager runs (task.apply(), task_always_eager) -------------------------------------------

    def _eagerly(self, args, kwargs):
        """The policy without the waits: attempts, retry_on, Bug, shelf life (on a clock that jumps
        over each delay), fallback and Hop; the final exception is raised."""
        req = self.request
        policy, fn = self._dispatch(args, kwargs)
        clock = start = time.time()
        state = hdr.Attempt(1, start, policy.deadline(start))
        while True:
            req.rare_current = Current(state, policy)
            countdown = limit = None
            try:
                return fn(*args, **kwargs)
            except Hop as hop:
                new = hop.args or hop.kwargs
                return self._eager_hop(hop.target, hop.reason, hop.args if new else args,
                                       hop.kwargs if new else kwargs)
            except _EagerRetry as again:
                exc, countdown, limit = again.exc, again.countdown, again.limit
                if isinstance(exc, Hop):
                    return self._eager_hop(exc.target, exc.reason, exc.args or args, exc.kwargs or kwargs)
            except (Ignore, Reject):
                raise
            except Exception as error:  # noqa: BLE001 - decided by the policy below
                exc = error
                if isinstance(exc, TypeError) and not _accepts(fn, args, kwargs):
                    raise TypeError(f"wrong arguments for {self.name}: {exc}") from None
            decision = policy.decide(state, exc=exc, now=clock, countdown=countdown, max_attempts=limit)
            if isinstance(decision, RetryIn):
                clock += decision.delay
                state = replace(state, number=state.number + 1)
                continue
            if isinstance(decision, HopTo):
                return self._eager_hop(decision.target, decision.reason, args, kwargs)
            if exc is None:
                exc = (Expired if decision.reason == EXPIRED else Exhausted)(
                    f"{self.name}: {decision.reason} after {state.number} attempts")
            raise exc

    def _eager_hop(self, target, reason: str, args, kwargs):
        name = resolve_task_name(self.app, target)
        history = [*hops.read((self.request.headers or {}).get(hdr.HOPS)),
                   hops.entry(self.name, self.name, reason, 1, time.time(), time.time())]
        refused = hops.refusal(history, name, self.max_hops)
        if refused:
            raise HopLimit(f"{self.name} cannot hop to {name}: {refused}")
        result = self.app.tasks[name].apply(args, kwargs, task_id=self.request.id, headers={hdr.HOPS: history})
        return result.get(propagate=True, disable_sync_subtasks=False)


class _RetryStored:
    """A result backend whose ``mark_as_retry`` does nothing: the retry stored it before its publish."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def mark_as_retry(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name):
        return getattr(self._backend, name)


def _ending_of(req) -> list:
    """The list this delivery's ending is recorded in (put in delivery_info by the guarded tracer)."""
    if not isinstance(req.delivery_info, dict):
        req.delivery_info = {}
    return req.delivery_info.setdefault(ENDING, [])


def _end_here(retry, exc) -> NoReturn:
    """``retry(exc=exc)`` for a failed attempt, shielded from the soft time limit (the attempt has
    failed: the limit changes nothing now). Its ending is raised from here with the traceback it
    had when the task raised it: rare_celery's own frames stay out of the tracebacks Celery formats
    and stores (less to show, and less to format on every retry)."""
    tb = exc.__traceback__ if exc is not None else None
    with shielded():
        try:
            retry(exc=exc)
        except BaseException as outcome:  # noqa: BLE001 - re-raised at once
            if outcome is exc:  # the bug queue: Celery stores the task's own exception and traceback
                raise outcome.with_traceback(tb)
            raise outcome.with_traceback(None) from None
    raise AssertionError("unreachable: retry() raises")


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
