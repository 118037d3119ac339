"""One delivery of a RareTask, inside the pool process that runs it::

    admit   headers nonsense?        -> bug queue (rejected)
            a copy of a success?     -> acked, not run (the worker lost its ack before)
            early (x-rare-due)?      -> delay queue for the rest, not run, nothing counted
            shelf life over?         -> fallback task, or bug queue (expired)
            its breaker open?        -> delay queue until the probe time, not run, nothing counted
            its service's limits?    -> the service's line until woken, not run, nothing counted
    run()   Policy.decide()          -> RetryIn: delay queue   GiveUp: bug queue   HopTo: fallback
            raise Hop(...)           -> the next task's queue

Every way out goes through :func:`end`: the ending is built (:mod:`rare_celery.endings`), its copy
published, confirmed and mandatory, and only then is Celery told what to do (``Retry``, the
exception, or ``Ignore``), which makes it ack. A delivery ends once. Anything that fails before the
broker confirmed the copy raises :class:`~rare_celery.exceptions.RoutingFailed`: the message is not
acked, and the worker's main process puts it back (:mod:`rare_celery.worker.request`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, NamedTuple, NoReturn, cast

from celery.exceptions import Ignore, Reject, Retry

from .. import breaker as br
from .. import breaker_io, context, endings, limits_io, signals, spans
from .. import headers as hdr
from ..durations import iso
from ..exceptions import Bug, Exhausted, Expired, Handed, Hop, NoHandler, PublishRefused, RetryAfter, RoutingFailed
from ..message import QUEUE_KEY, Delivery, retry_call
from ..policy import EARLY_SLEEP, Policy, RetryIn
from ..publish import PATIENCE, Copy, encoded, log_refused, send_patiently, shielded
from ..reasons import BUG, EXPIRED, REJECTED
from ..topology import delay_kind
from .tracer import ending_of

log = logging.getLogger(__name__)
ROUTING_PAUSE = 1.0  # after a failed ending, before the message is put back: never a hot loop
CONCURRENCY, RATE = "concurrency", "rate"  # the limit that sent an attempt to its service's line


class Current(NamedTuple):
    """The attempt running now and the policy that decides what follows it."""

    attempt: hdr.Attempt
    policy: Policy


def current(task: Any) -> Current:
    """The attempt running now (read from the headers when admission did not run)."""
    found = getattr(task.request, "rare_current", None)
    return found or Current(hdr.read(task.request.headers), task.rare_policy)


# -- the way out -------------------------------------------------------------------------------------

def end(task: Any, build: Callable[[], endings.Ending]) -> NoReturn:
    """The pool process's one way out of a delivery: build the ending, store the result state that
    must come first (best effort), publish its copy (confirmed, mandatory), then raise its outcome,
    which makes Celery ack. Reports (signals, events, logs) come after.

    A retry in a worker is handed over instead (:func:`hands_over`): its outcome carries the copy to
    the worker's main process, which publishes it, confirms pipelined, and acks the original once
    the broker confirmed it (:mod:`rare_celery.pipeline`); this process takes its next message at once.
    Its reports are made here when it is handed (a copy the broker then does not take puts the message
    back, logged and reported as such: the retry is reported again when it runs again).

    A delivery ends once: asked again (a Hop inside autoretry, ``retry(throw=False)``), the first
    ending is raised again and nothing is published twice. Whatever fails before the broker has
    confirmed the copy, of any exception type, raises RoutingFailed: the message stays unacked.
    """
    req = task.request
    ended_before(task)
    reporter = endings.Reporter(send=_sender(task), celery_reports=False, stores=endings.stores_results(task))
    with shielded():
        try:
            ending = build()
            try:
                endings.store_first(ending, reporter)
                if ending.first == endings.RETRY_STATE and reporter.stores:
                    req.rare_retry_stored = True
            except Exception as exc:  # noqa: BLE001 - a result state is a report, the copy is what counts
                log.warning("rare_celery: %s[%s]: could not store its state first: %r", task.name, req.id, exc)
            outcome: BaseException = ending.outcome
            if ending.copy is not None and hands_over(task, ending):
                with spans.publishing(ending):  # the copy carries its span's context from here
                    outcome = handed(ending)
            elif ending.copy is not None:
                budget = patience(task)
                with spans.publishing(ending):
                    send_patiently(task.app, ending.copy, budget=budget, confirm_wait=budget,
                                   on_refused=lambda exc, pause: _refused(task, exc, pause))
                if ending.kind in endings.NEW_WORK:  # this copy has ended, whatever becomes of its ack
                    endings.record_ended(task, ending.delivery.headers, ending.kind)
        except BaseException as exc:  # noqa: BLE001 - ours, Celery's, the broker's: the message is kept
            why = f"{type(exc).__name__}: {exc}"[: hdr.MAX_ERROR]
            log.error("rare_celery: %s[%s] could not go to its next place (%s); it stays unacked and the "
                      "worker puts it back", task.name, req.id, why)
            time.sleep(ROUTING_PAUSE)
            raise RoutingFailed(why) from None
        ending_of(req).append(outcome)
    endings.report(ending, reporter)  # a handed ending's when it is handed (its task's process runs the receivers)
    raise outcome


def hands_over(task: Any, ending: endings.Ending) -> bool:
    """Whether the worker's main process publishes this ending's copy (:mod:`rare_celery.pipeline`): a
    retry, in a worker, of a delivery a RareRequest holds (it publishes the copy, then acks)."""
    req = task.request
    info = req.delivery_info if isinstance(req.delivery_info, dict) else {}
    return (ending.kind == endings.RETRY and not getattr(req, "is_eager", False) and QUEUE_KEY in info
            and context.of(task.app) is not None)


def handed(ending: endings.Ending) -> Handed:
    """``ending``'s outcome, carrying its copy to the worker's main process."""
    retry = cast(Retry, ending.outcome)
    # encoded here: the main process, the busiest, only writes it; with its rare_traceback (pool.tracer.RetryInfo)
    return Handed.of(retry, encoded(cast(Copy, ending.copy)), ending.kind, ending.fields)


def ended_before(task: Any) -> None:
    """Raise this delivery's ending again if it has one already."""
    ending = ending_of(task.request)
    if ending:
        raise ending[0]


def end_here(retry: Callable[..., Any], exc: BaseException | None) -> NoReturn:
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
                raise outcome.with_traceback(tb) from None
            raise outcome.with_traceback(None) from None
    raise AssertionError("unreachable: retry() raises")


def _sender(task: Any) -> Callable[..., None] | None:
    """How the pool process sends a Celery event (``None``: the worker sends no task events)."""
    if not getattr(task, "send_events", True) or not task.app.conf.worker_send_task_events:
        return None

    def send(kind: str, **fields: Any) -> None:
        with task.app.events.default_dispatcher(hostname=getattr(task.request, "hostname", None)) as dispatcher:
            dispatcher.send(kind, **fields)
    return send


def patience(task: Any) -> float:
    """How long a refused publish may be tried again: the back-off, within the hard time limit."""
    req = task.request
    hard = (req.timelimit or (None, None))[0] if getattr(req, "timelimit", None) else None
    hard = hard or task.time_limit or task.app.conf.task_time_limit
    if not hard:
        return PATIENCE
    spent = time.monotonic() - getattr(req, "rare_started", time.monotonic())
    return cast(float, max(0.0, min(PATIENCE, hard - spent - 2.0)))


def _refused(task: Any, exc: PublishRefused, pause: float | None) -> None:
    log_refused(f"{task.name}[{task.request.id}]", exc, pause)


# -- admission -----------------------------------------------------------------------------------

def admit(task: Any, args: Any, kwargs: Any) -> Callable[..., Any]:
    """Check a delivery before it runs; end it elsewhere (raising) when it must not run now. Returns
    the function that runs it (the task's, or its payload handler's). The :class:`Delivery` is made
    only for an ending: a delivery that runs reads its state from the headers as they came."""
    req, now = task.request, time.time()
    headers = req.headers if isinstance(req.headers, Mapping) else None

    def d() -> Delivery:
        return Delivery.running(task)
    try:
        state = hdr.read(headers, now)  # the x-rare-* headers: the broker's own are never among them
    except hdr.HeaderError as exc:
        bad = exc
        end(task, lambda: endings.bugs(d(), hdr.Attempt(1, now), REJECTED, bad))
    how = endings.copy_ended(task, headers) if hdr.deliveries(headers) else None
    if how is not None:  # a put-back copy of a delivery that ended (its ack was lost)
        end(task, lambda: endings.done(d(), how))
    try:
        policy, fn = dispatch(task, args, kwargs)
    except NoHandler as exc:
        missing = exc
        end(task, lambda: endings.bugs(d(), state, missing.rare_reason, missing))
    if state.deadline is None and policy.expires_in is not None:
        state = replace(state, deadline=policy.deadline(state.first_at))
    req.rare_current = Current(state, policy)
    if state.due is not None and state.deadline is not None and state.due > state.deadline:
        never = hdr.HeaderError(f"header {hdr.DUE} is after the end of the shelf life ({iso(state.deadline)}): "
                                f"the message could never run")
        end(task, lambda: endings.bugs(d(), state, REJECTED, never))
    if state.due is not None and state.due > now:
        if state.due - now > EARLY_SLEEP:
            due = state.due
            end(task, lambda: endings.wait(d(), state, due))
        time.sleep(state.due - now)
    if state.deadline is not None and time.time() > state.deadline:
        late = Expired(f"shelf life ended at {iso(state.deadline)} before attempt {state.number}")
        end(task, lambda: endings.next_place(d(), state, policy.out_of(EXPIRED), late, keep_error=True))
    if task.rare_breaker is not None:
        _breaker_gate(task, d(), state)
        if task.rare_breaker.concurrency is not None or task.rare_breaker.rate is not None:
            _limits_gate(task, d(), state)
    return fn


def dispatch(task: Any, args: Any, kwargs: Any) -> tuple[Policy, Callable[..., Any]]:
    """The policy and function for this message: the task's own, or its payload handler's."""
    if not task.dispatch_on:
        return task.rare_policy, task.run
    payload = args[0] if args else (kwargs or {}).get("payload")
    kind = payload.get(task.dispatch_on) if isinstance(payload, dict) else None
    handler = task.handlers.get(kind) if isinstance(kind, str) else None
    if handler is None:
        raise NoHandler(f"{task.name}: no handler for {task.dispatch_on}={_short(kind)} "
                        f"(payload {_short(payload)}); handlers: {sorted(task.handlers)}")
    return handler.policy, handler.fn


# -- the circuit breaker (rare_celery.breaker): run, probe or wait; then tell it the outcome -----------

def _breaker_gate(task: Any, d: Delivery, attempt: hdr.Attempt) -> None:
    """Let the attempt run (the breaker is closed), make it the probe (the breaker is due for one
    and this process took its lock), or send it to wait, unrun, nothing counted."""
    req, name = task.request, task.breaker
    now = time.time()
    state = breaker_io.board_state(task.app, name) or br.State(name)
    action, until = br.verdict(state, now)
    if action == br.PROBE:
        lock, last = breaker_io.try_probe(task.app, name)
        if lock is None:  # another attempt probes (or the broker cannot say): wait for its verdict, at most its lease
            action, until = br.WAIT, now + br.PROBE_LEASE
        else:  # the broker's last state, newer than this worker's board if a note is on its way
            state = last if last is not None and last.order() > state.order() else state
            action, until = br.verdict(state, time.time())
            if action == br.PROBE:
                state = br.probing(state, req.hostname or "", req.id, time.time())
                breaker_io.announce(task.app, state.as_note(req.hostname or "", req.id))
                req.rare_probe = (lock, state)
            else:
                lock.release()
    if action == br.WAIT:
        end(task, lambda: endings.wait(d, attempt, cast(float, until), breaker=name))  # a WAIT verdict has one
    req.rare_breaker_gen, req.rare_breaker_failures = state.gen, bool(state.failures)


def _limits_gate(task: Any, d: Delivery, attempt: hdr.Attempt) -> None:
    """Let the attempt start within its service's limits (:mod:`rare_celery.limits_io`): a slot of
    those in flight (held until the attempt ends), then a place in the rate's window; else it waits in
    the service's line, unrun, nothing counted, until it is woken. A new attempt (not one woken from
    the line) that finds attempts waiting joins the end of the line, not to go before them, unless a
    slot was let go of a moment ago (its hint): the attempt woken to take it may be behind a backlog
    in its work queue, and the slot would stand idle until it comes. A woken attempt that finds no slot
    (another took it first) waits again at the head of the line. An attempt that had a slot and
    found the window full was woken by an ending to take its place: it waits a moment in a delay queue
    and asks again, so that the chain of endings waking the next goes on. Last, the service's pause
    queue: an attempt of another worker asked for a pause a moment ago (its note may not be here yet):
    it waits a moment (1-1.5 s; 1-2 s when the broker could not say), and the breaker's gate holds it
    from then on."""
    settings, name = task.rare_breaker, task.breaker
    woken = limits_io.from_line(task.request.headers, name)  # if it must wait again: at the head of the line
    behind = not woken and limits_io.others_wait(task.app, name, delay_kind(task.app, d.queue or ""))
    if behind and settings.concurrency is None:
        _not_run(task, None)  # others came first: to the end of the line
        end(task, lambda: endings.line(d, attempt, name, RATE))
    slot = None
    if settings.concurrency is not None:
        slot = limits_io.take_slot(task.app, name, settings.concurrency, hinted_only=behind)
        if slot is None:
            _not_run(task, None)
            end(task, lambda: endings.line(d, attempt, name, CONCURRENCY, head=woken))
    placed = limits_io.take_rate(task.app, name, settings.rate) if settings.rate is not None else True
    if not placed:
        _not_run(task, slot)
        if slot is None:
            end(task, lambda: endings.line(d, attempt, name, RATE, head=woken))
        # it had a slot: it is the one an ending woke, and asks again in a moment (not at the end of the line)
        due = time.time() + limits_io.rate_pause(cast("tuple[int, float]", settings.rate), asked=placed is False)
        end(task, lambda: endings.wait(d, attempt, due, breaker=name))
    paused = limits_io.paused(task.app, name)  # last: another worker's attempt was told to pause a moment ago
    if paused is not False:  # by the next round the breaker's board holds it (or the broker can say)
        _not_run(task, slot)
        due = time.time() + limits_io.paused_wait(asked=paused is True)
        end(task, lambda: endings.wait(d, attempt, due, breaker=name))
    task.request.rare_limited = True
    task.request.rare_slot = slot


def _limited_end(task: Any) -> None:
    """An attempt that started within its service's limits has ended: its slot is let go of, and the
    next attempt in the line is woken, shielded from the soft time limit (the attempt has ended: a wake
    cut between its publish and its ack would leave the woken attempt in its line and its work queue)."""
    if task.rare_breaker is None:  # no limits without a breaker: no slot, no line
        return
    req = task.request
    slot, req.rare_slot = getattr(req, "rare_slot", None), None
    if not getattr(req, "rare_limited", False):
        return
    req.rare_limited = False
    with shielded():
        limits_io.wake_after(task.app, task.breaker, delay_kind(task.app, Delivery.running(task).queue or ""),
                             task.rare_breaker.rate, slot)


def _not_run(task: Any, slot: limits_io.Slot | None) -> None:
    """An attempt the limits send to wait lets go of what it took: its slot, and the breaker's probe
    lock if it was to probe (another attempt probes, once the probe's lease has passed)."""
    req = task.request
    if slot is not None:
        slot.release()
    probe, req.rare_probe, req.rare_breaker_gen = getattr(req, "rare_probe", None), None, None
    if probe is not None:
        probe[0].release()


def breaker_told(task: Any, failed: bool, pause: float | None = None) -> None:
    """Tell the breaker how this delivery's attempt went, once: a probe announces the new state
    and lets its lock go; another attempt sends a failure (or, after failures, a success) note.
    ``pause``: the service asked for a pause of that many seconds (:class:`RetryAfter`): the breaker
    is held open until then, for every worker."""
    if task.rare_breaker is None:  # no breaker: nothing to tell (nor a probe, nor limits)
        return
    req = task.request
    gen = getattr(req, "rare_breaker_gen", None)
    if gen is None:
        return
    req.rare_breaker_gen = None
    by, now = req.hostname or "", time.time()
    probe = getattr(req, "rare_probe", None)
    if pause is not None:
        req.rare_probe = None
        known = breaker_io.board_state(task.app, task.breaker) or br.State(task.breaker)
        if probe is not None and probe[1].order() > known.order():
            known = probe[1]
        held = br.paused(known, pause, f"Retry-After {pause:g} s ({task.name})", now)
        try:
            if task.rare_breaker.concurrency is not None or task.rare_breaker.rate is not None:
                limits_io.pause(task.app, task.breaker, pause)  # every limited attempt's gate reads it at once
            breaker_io.announce(task.app, held.as_note(by, req.id))
        finally:
            if probe is not None:
                probe[0].release()
        return
    if probe is not None:
        req.rare_probe = None
        lock, state = probe
        try:
            after = br.after_probe(state, task.rare_breaker, failed=failed, now=now)
            breaker_io.announce(task.app, after.as_note(by, req.id))
        finally:
            lock.release()
    elif failed or req.rare_breaker_failures:
        note = br.count_note(task.breaker, br.FAILURE if failed else br.SUCCESS, gen, now, by, req.id)
        breaker_io.announce(task.app, note)


# -- the attempt ---------------------------------------------------------------------------------

def run(task: Any, args: Any, kwargs: Any) -> Any:
    """Admit the delivery, run the attempt, and end it: the result, or the ending a failure makes."""
    req = task.request
    req.rare_started = time.monotonic()
    fn = admit(task, args, kwargs)
    try:
        return _attempt(task, fn, args, kwargs)
    finally:  # a breaker hears of every attempt; all but a retryable failure (told in retry) say it answered
        try:
            breaker_told(task, failed=False)
        finally:
            _limited_end(task)  # after the attempt's ending: the next attempt may start


def _attempt(task: Any, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    req = task.request
    spans.mark_attempt(req.rare_current.attempt.number)
    signals.attempt_started.send(sender=task, request=req, attempt=req.rare_current.attempt.number)
    try:
        result = fn(*args, **kwargs)
    except (Ignore, Reject):
        raise  # the task's own choice (Task.replace raises Ignore): Celery acks or rejects
    except Hop as hop:
        hop_raised(task, hop)
    except Retry as r:  # a Retry raised by hand, not through self.retry()
        ended_before(task)
        end_here(task.retry, r.exc)
    except Exception as exc:  # noqa: BLE001 - every failure is the policy's to decide
        ended_before(task)
        if isinstance(exc, TypeError) and not accepts(fn, args, kwargs):  # never retried: a bug
            wrong = TypeError(f"wrong arguments for {task.name}: {exc}").with_traceback(exc.__traceback__)
            d, state = Delivery.running(task), req.rare_current.attempt
            end_here(lambda exc: end(task, lambda: endings.bugs(d, state, BUG, exc)), wrong)
        end_here(task.retry, exc)
    ended_before(task)  # retry(throw=False), then returned: the retry is this delivery's ending
    return result


def retry(task: Any, exc: BaseException | None, *, args: Any = None, kwargs: Any = None,
          countdown: float | None = None, limit: int | None = None) -> NoReturn:
    """``RareTask.retry`` in the pool process: the policy decides; a retry, a hop to the fallback or
    the bug queue ends the delivery."""
    req = task.request
    if isinstance(exc, Hop):  # autoretry_for=(Exception,) caught a Hop: it is a hop, not a failure
        hop_raised(task, exc)
    if args is not None or kwargs is not None:
        args, kwargs = retry_call(task.run, req.args, req.kwargs, args, kwargs)
    ended_before(task)
    now = time.time()
    current_state = current(task)
    pause = exc.seconds if isinstance(exc, RetryAfter) and exc.seconds > 0 else None
    breaker_told(task, failed=exc is not None and not isinstance(exc, Bug)
                 and isinstance(exc, (current_state.policy.retry_on, RetryAfter)), pause=pause)
    state = current_state.attempt
    decision = current_state.policy.decide(state, exc=exc, now=now, countdown=countdown, max_attempts=limit)
    if not isinstance(decision, RetryIn) and exc is None:
        exc = (Expired if decision.reason == EXPIRED else Exhausted)(
            f"{task.name}[{req.id}]: {decision.reason} after {state.number} attempts")
    d = Delivery.running(task)
    end(task, lambda: endings.next_place(d, state, decision, exc, args=args, kwargs=kwargs, now=now))


def hop_raised(task: Any, hop: Hop) -> NoReturn:
    """``raise Hop(...)`` (or ``self.hop``): the work moves on now."""
    ended_before(task)
    state = current(task).attempt
    new = hop.args or hop.kwargs  # no arguments given: the current ones go along
    d = Delivery.running(task)
    end(task, lambda: endings.hop(d, state, hop.target, hop.reason, args=hop.args if new else None,
                                  kwargs=hop.kwargs if new else None))


def accepts(fn: Callable[..., Any], args: Any, kwargs: Any) -> bool:
    """Whether ``fn`` can be called with these arguments (a TypeError from a wrong call is a bug)."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
