"""The worker side: a consumer bootstep that declares what the rare queues need (at start and after
every reconnect), looks at each message of a rare task before Celery does, and copies messages
Celery would reject or drop on a rare queue to its bug queue."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time

from celery import bootsteps
from celery.exceptions import InvalidTaskError
from celery.utils.imports import symbol_by_name
from celery.utils.objects import Bunch
from kombu import Consumer, Queue, binding
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils.uuid import uuid

from . import breaker as br
from . import breaker_io, events, signals
from . import headers as hdr
from . import request as rare_request
from .app import check, fold_expires
from .declare import declare_queue, declare_worker_topology, learn_types
from .exceptions import ConfigurationError, TopologyError
from .inventory import breakers, is_rare, rare_tasks
from .policy import EARLY_SLEEP, REJECTED, UNREGISTERED, slack
from .publish import main_process, properties_of, send_patiently, to_bugs, to_delay
from .topology import BREAKER_EXCHANGE, breaker_listener, bug_queue_name, delay_kind, name_problem, own_kind

log = logging.getLogger(__name__)


def rare_queues(app) -> dict[str, set[str]]:
    """Work queue -> bug queues, for every RareTask registered in ``app`` (task_routes respected)."""
    out: dict[str, set[str]] = {}
    for info in rare_tasks(app):
        out.setdefault(info.queue, {bug_queue_name(info.queue)}).add(info.bug_queue)
    return out


class RareConsumerStep(bootsteps.StartStopStep):
    """Declares the delay exchange, the way back and the bug queues; screens rare task messages;
    catches bad messages on rare queues."""

    name = "rare_celery"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        if sys.version_info >= (3, 11):  # py-amqp decodes header tables recursively; a 128 KB frame can
            sys.setrecursionlimit(max(sys.getrecursionlimit(), 30_000))  # nest ~26,000 deep (3.11+: no C stack)
        try:
            check(c.app)
            preflight(c.app)
        except (ConfigurationError, TopologyError) as exc:  # one line, no traceback: a setting to change
            raise SystemExit(f"{exc}") from None
        main_process(c.app)
        self.queues: set[str] = set()  # the rare work queues this worker consumes
        c.on_unknown_task = self._guard_body(c, c.on_unknown_task, UNREGISTERED, "task {name!r} is not registered")
        c.on_invalid_task = self._guard_body(c, c.on_invalid_task, REJECTED, "invalid task message: {exc}")
        c.on_unknown_message = self._guard_body(c, c.on_unknown_message, REJECTED, "not a Celery task message")
        c.on_decode_error = self._guard_decode(c, c.on_decode_error, REJECTED, "body could not be decoded: {exc}")

    def start(self, c):
        for name, task in c.app.tasks.items():  # Celery made new strategies for this connection
            if is_rare(task) and name in c.strategies:
                c.strategies[name] = self._screen(c, task, c.strategies[name])
        rare_request.timer = c.timer
        wanted = rare_queues(c.app)
        self.queues = {q.name for q in c.task_consumer.queues if q.name in wanted}
        bugs = sorted({b for q in self.queues for b in wanted[q]})
        declare_worker_topology(c.connection, sorted(self.queues), bugs, own_kind(c.app))
        log.info("rare_celery: managing %s", ", ".join(sorted(self.queues)) or "no queue")

    def _screen(self, c, task, strategy):
        """Celery's strategy for a RareTask, behind rare_celery's look at the message: which queue it
        came from (for the pool process), Celery's ``expires`` folded into the deadline, a redelivered
        message put back (see :mod:`rare_celery.request`), headers too deep for the pool process
        (billiard pickles them: a list nested ~500 deep fails, and the worker with it)."""

        def screened(message, *args, **kwargs):
            headers = message.headers
            queue = _queue_of(c, message)
            if isinstance(message.delivery_info, dict):
                message.delivery_info[rare_request.QUEUE] = queue
            if isinstance(headers, dict) and hdr.too_deep(headers):
                return self._too_deep(c, message, queue)
            if isinstance(headers, dict) and hdr.protocol_problem(headers):
                return self._too_deep(c, message, queue, hdr.protocol_problem(headers))
            if (message.delivery_info or {}).get("redelivered"):
                rare_request.put_back(task, message, queue, "redelivered: a worker stopped, died or lost its "
                                      "connection with it unacked", lost=True, ack=message.ack,
                                      requeue=lambda: message.reject(requeue=True))
                return None
            if isinstance(headers, dict) and headers.get(hdr.REQUEUED) is True and isinstance(message.delivery_info, dict):
                message.delivery_info["redelivered"] = True  # Reject(requeue=True): as Celery shows it
            if isinstance(headers, dict) and headers.get("expires") is not None:
                fold_expires(headers)
            if isinstance(headers, dict) and headers.get(hdr.DUE) is not None and wait_more(c, task, message, queue):
                return None
            watch = getattr(c, "rare_breakers", None)
            if watch is not None and task.rare_breaker is not None and wait_for_breaker(c, task, message, queue, watch):
                return None
            try:
                return strategy(message, *args, **kwargs)
            except (InvalidTaskError, ContentDisallowed, DecodeError):
                raise
            except Exception as exc:  # Celery cannot make a request of it (a body not [args, kwargs, embed]):
                raise InvalidTaskError(f"{type(exc).__name__}: {exc}") from exc  # to the bug queue, not a crash
        return screened

    def _too_deep(self, c, message, queue, problem: str | None = None):
        headers = message.headers
        if problem is None:
            key = next(k for k, v in headers.items() if hdr.too_deep(v, hdr.MAX_DEPTH - 1))
            problem = f"header {key} is nested deeper than {hdr.MAX_DEPTH} levels"
        exc = hdr.HeaderError(problem)
        try:
            _copy_to_bugs(c.app, message, queue, REJECTED, str(exc))
        except Exception as err:  # noqa: BLE001 - kept unacked: redelivered after a reconnect
            log.error("rare_celery: could not copy a message with nested headers to %s (%s); it stays unacked",
                      bug_queue_name(queue or "?"), err)
            return
        message.ack()
        request = Bunch(name=headers.get("task"), chord=None, root_id=headers.get("root_id"), errbacks=None,
                        correlation_id=message.properties.get("correlation_id"),
                        reply_to=message.properties.get("reply_to"))
        if not isinstance(headers.get("id"), str):  # no task id: no result to mark (a key-value backend raises)
            return
        try:
            c.app.backend.mark_as_failure(headers["id"], exc, request=request)  # .get() must not hang
        except Exception as err:  # noqa: BLE001 - the message is in the bug queue; the worker goes on
            log.warning("rare_celery: could not store the failure of %s: %r", headers["id"], err)

    def _guard_body(self, c, original, reason: str, why: str):
        """Wrap one of Celery's handlers of bad task messages, ``(body, message[, exc])``: copy the
        message to its bug queue first, then let Celery's handler run (it acks or rejects)."""

        def handler(body, message, *exc):
            if self._copied(c, message, reason, why, exc[0] if exc else None):
                return original(body, message, *exc)
            return None
        return handler

    def _guard_decode(self, c, original, reason: str, why: str):
        """Wrap Celery's handler of bodies that cannot be decoded, ``(message, exc)`` (see :meth:`_guard_body`)."""

        def handler(message, exc):
            if self._copied(c, message, reason, why, exc):
                return original(message, exc)
            return None
        return handler

    def _copied(self, c, message, reason: str, why: str, exc: BaseException | None) -> bool:
        """Whether Celery's handler may go on: the message is not on a rare queue, or its copy in the bug
        queue is confirmed. False keeps it unacked (redelivered after a reconnect)."""
        queue = _queue_of(c, message)
        if queue not in self.queues:
            return True
        name = (message.headers or {}).get("task") if isinstance(message.headers, dict) else None
        try:
            _copy_to_bugs(c.app, message, queue, reason, why.format(exc=exc, name=name))
        except Exception as err:  # noqa: BLE001 - kept unacked: redelivered after a reconnect
            log.error("rare_celery: could not copy a bad message from %s to its bug queue (%s); "
                      "it stays unacked", queue, err)
            return False
        return True


def wait_more(c, task, message, queue: str | None) -> bool:
    """An early arrival (a delayed start, an off-grid delay): back to a delay queue for the rest, from
    the main process, before Celery makes a request of it (no pool process, no task events). False
    when the pool process must look at it instead (nonsense headers, a deadline, a publish refused)."""
    now = time.time()
    try:
        state = hdr.read(message.headers, now)
    except hdr.HeaderError:
        return False
    if state.due is None:
        return False
    return _send_round(c, task, message, queue, state, state.due, now)


def wait_for_breaker(c, task, message, queue: str | None, watch: breaker_io.Watch) -> bool:
    """An attempt whose breaker is open: to a delay queue until the probe time, from the main process
    (see :func:`wait_more`). When the breaker is due for a probe, one attempt at a time goes on to the
    pool to try for the probe lock; the others wait :data:`~rare_celery.breaker.PROBE_WAIT` s."""
    name, now = task.breaker, time.time()
    action, until = br.verdict(watch.states.get(name), now)
    if action == br.RUN:
        return False
    if action == br.PROBE:
        if now - watch.candidates.get(name, 0.0) > 2 * br.PROBE_WAIT:
            watch.candidates[name] = now
            return False
        until = now + br.PROBE_WAIT
    try:
        state = hdr.read(message.headers, now)
    except hdr.HeaderError:
        return False
    return _send_round(c, task, message, queue, state, until, now, breaker=name)


def _send_round(c, task, message, queue: str | None, state: hdr.Attempt, due: float, now: float,
                breaker: str | None = None) -> bool:
    """Send ``message`` to a delay queue until ``due`` (its deadline, if sooner), acked once the copy
    is confirmed; False when the pool process must look at it instead."""
    if not queue or task.dispatch_on:
        return False
    deadline = state.deadline if state.deadline is not None else task.rare_policy.deadline(state.first_at)
    if deadline is not None and (now > deadline or (state.due or 0) > deadline):
        return False
    due = due if deadline is None else min(due, deadline)
    if due - now <= EARLY_SLEEP:
        return False
    # the first-publish time and the deadline as this worker read them: a message that came without
    # them (another producer's) keeps its shelf life from here on instead of starting it anew each round
    headers = {**rare_request.raw_headers(message), hdr.QUEUE: queue, hdr.DUE: due, hdr.FIRST_AT: state.first_at,
               **({hdr.DEADLINE: deadline} if deadline is not None else {})}
    rest = due - now
    copy = to_delay(queue, rest, delay_kind(c.app, queue), message.body, hdr.fit(headers),
                    properties_of(message), slack=slack(rest), own_kind=own_kind(c.app))
    try:
        send_patiently(c.app, copy, budget=0, timeout=rare_request.MAIN_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - the pool process tries (and reports) it instead
        log.warning("rare_celery: could not send an early arrival round again from the main process (%s)", exc)
        return False
    message.ack()
    dispatcher = getattr(c, "event_dispatcher", None)
    if dispatcher is not None and dispatcher.enabled:
        with contextlib.suppress(Exception):
            dispatcher.send(events.WAIT, uuid=headers.get("id"), name=task.name, due=due, queue=queue,
                            **({"breaker": breaker} if breaker else {}))
    return True


class BreakerStep(bootsteps.ConsumerStep):
    """The worker's main process hears every note about the breakers its tasks use (a queue of its
    own on ``rare.breakers``), after reading their last states, and keeps them for the screen and
    the pool processes (:class:`rare_celery.breaker_io.Watch`). The change an attempt of this
    worker made is reported from here: signals, events and, for a trip, the state note."""

    name = "rare_celery.breakers"
    requires = ("celery.worker.consumer:Connection", "celery.worker.consumer.tasks:Tasks")

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        c.rare_breakers = self.watch = None
        try:
            settings = breakers(c.app)
        except ConfigurationError as exc:
            raise SystemExit(f"{exc}") from None
        if settings:
            board = breaker_io.Board.for_this_worker()
            breaker_io.BOARD = board  # pool processes forked from here read it
            c.rare_breakers = self.watch = breaker_io.Watch(settings, board)

    def start(self, c):
        self.consumers = []
        if self.watch is None:
            return
        channel = c.connection.channel()
        queue = Queue(breaker_listener(c.hostname, uuid()[:8]), exchange=BREAKER_EXCHANGE, durable=False,
                      exclusive=True, auto_delete=True, queue_arguments={"x-queue-type": "classic"},
                      bindings=[binding(BREAKER_EXCHANGE, routing_key=f"{name}.*") for name in sorted(self.watch.settings)])
        BREAKER_EXCHANGE.declare(channel=channel)
        consumer = Consumer(channel, queues=[queue], on_message=lambda message: self._heard(c, message), no_ack=True)
        consumer.consume()  # listening before the last states are read: no note falls in between
        self.consumers = [consumer]
        self.watch.load(c.connection)
        log.info("rare_celery: breakers %s", ", ".join(f"{n} {s.phase}" for n, s in sorted(self.watch.states.items())))

    def shutdown(self, c):
        super().shutdown(c)
        if self.watch is not None:
            self.watch.board.remove()

    def _heard(self, c, message) -> None:
        try:
            note = json.loads(message.body)
        except (TypeError, ValueError, UnicodeDecodeError):
            note = None
        change = self.watch.hear(note)
        if change is None or change.note.get("by") != c.hostname:
            return
        try:
            report_change(c, change)
        except Exception as exc:  # noqa: BLE001 - a report; the state is kept either way
            log.warning("rare_celery: could not report breaker %s %s: %r", change.state.name, change.kind, exc)


def report_change(c, change: br.Change) -> None:
    """Log, announce (a trip: its state note), signal and send the event of a change this worker made."""
    state, note = change.state, change.note
    if change.kind == br.OPENED and note["kind"] == br.FAILURE:
        breaker_io.announce(c.app, state.as_note(c.hostname, note.get("task")))
    fields = {"breaker": state.name, "gen": state.gen}
    if change.kind == br.OPENED:
        fields.update(until=state.until, open_for=state.open_for, reopened=note["kind"] != br.FAILURE)
        log.warning("rare_celery: breaker %s opened for %.3g s (%s)", state.name, state.open_for,
                    "its probe failed" if fields["reopened"] else "failures in a row")
        signals.breaker_opened.send(sender=state.name, task_id=note.get("task"), **fields)
    elif change.kind == br.PROBE:
        fields["worker"] = state.probe
        log.info("rare_celery: breaker %s: %s probes", state.name, note.get("task"))
        signals.breaker_probe.send(sender=state.name, task_id=note.get("task"), **fields)
    else:
        log.warning("rare_celery: breaker %s closed", state.name)
        signals.breaker_closed.send(sender=state.name, task_id=note.get("task"), **fields)
    dispatcher = getattr(c, "event_dispatcher", None)
    if dispatcher is not None and dispatcher.enabled:
        dispatcher.send(events.BREAKER[change.kind], uuid=note.get("task"), name=None, **fields)


def preflight(app) -> None:
    """Before the worker consumes: check the names of its rare queues' bug queues and declare its rare
    work queues as the app defines them, so a queue that exists with other arguments is one clear
    error now instead of a traceback in a restart loop. A broker that cannot be reached yet is left to
    Celery's own connection retries."""
    wanted = rare_queues(app)
    for work, bug_queues in sorted(wanted.items()):
        for name in sorted(bug_queues):
            problem = name_problem(name)
            if problem:
                raise ConfigurationError(f"rare_celery: the bug queue of work queue {work[:60]!r} cannot exist: "
                                         f"{problem}; shorten the queue name or set a shorter bug_queue")
    for info in rare_tasks(app):
        request = info.task.Request
        request = symbol_by_name(request) if isinstance(request, str) else request
        if not (isinstance(request, type) and issubclass(request, rare_request.RareRequest)):
            raise ConfigurationError(
                f"rare_celery: {info.name} sets Request = {request!r}; a RareTask's Request must subclass "
                f"rare_celery.request.RareRequest (it ends the deliveries a lost pool process cannot)")
    queues = [q for name, q in app.amqp.queues.consume_from.items() if name in wanted]
    if not queues:
        return
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            channel = conn.channel()
            for queue in queues:
                declare_queue(channel, queue)
            quorum = learn_types(conn, queues)
    except TopologyError:
        raise
    except Exception as exc:  # noqa: BLE001 - Celery reports and retries connection problems itself
        log.warning("rare_celery: could not check the work queues before starting (%s)", exc)
        return
    if quorum and not app.conf.get("worker_detect_quorum_queues"):
        raise ConfigurationError(
            f"rare_celery: {', '.join(quorum)} {'is a quorum queue' if len(quorum) == 1 else 'are quorum queues'} "
            f"(declared so, or the vhost's default queue type) and this Celery consumes with global QoS, which "
            f"quorum queues refuse: use Celery 5.5 or newer with worker_detect_quorum_queues on (its default), "
            f"or declare the queue classic (queue_arguments={{'x-queue-type': 'classic'}}) on a new queue")


def _queue_of(c, message) -> str | None:
    """The queue ``message`` was delivered from, by its consumer tag (kombu has no public map from
    tags to queues; ``Consumer._active_tags`` is the one it keeps)."""
    tag = (message.delivery_info or {}).get("consumer_tag")
    tags = getattr(c.task_consumer, "_active_tags", {}) if c.task_consumer else {}
    return next((queue for queue, t in tags.items() if t == tag), None)


def _copy_to_bugs(app, message, queue: str, reason: str, text: str) -> None:
    headers = message.headers if isinstance(message.headers, dict) else {}
    task = headers.get("task") if isinstance(headers.get("task"), str) else ""
    extra = {**hdr.bug(reason, 0, task), hdr.QUEUE: queue, hdr.ERROR: text[: hdr.MAX_ERROR]}
    send_patiently(app, to_bugs(bug_queue_name(queue), message.body, hdr.fit({**hdr.carried(headers), **extra}),
                                properties_of(message), own_kind(app)), budget=0, timeout=rare_request.MAIN_TIMEOUT)
    log.warning("rare_celery: a message on %s went to %s: %s (%s)", queue, bug_queue_name(queue), reason, text)
