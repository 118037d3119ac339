"""The worker's consumer bootsteps, in its main process.

:class:`RareConsumerStep` makes the worker's context (:mod:`rare_celery.context`), checks the app and
its queues before the worker consumes, declares what the rare queues need (at start and after every
reconnect), and puts the screen (:mod:`rare_celery.worker.screen`) in front of Celery's strategies and
bad-message handlers. :class:`BreakerStep` listens to the breakers' notes and keeps the board."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, cast

from celery import bootsteps
from celery.utils.imports import symbol_by_name
from kombu import Consumer, Queue, binding
from kombu.utils.uuid import uuid

from .. import breaker as br
from .. import breaker_io, context, events, signals
from ..app import check
from ..declare import declare_queue, declare_worker_topology, learn_types
from ..exceptions import ConfigurationError, TopologyError
from ..inventory import breakers, is_rare, rare_tasks
from ..pipeline import Pipeline
from ..reasons import REJECTED, UNREGISTERED
from ..topology import BREAKER_EXCHANGE, breaker_listener, bug_queue_name, name_problem, own_kind
from .request import RareRequest
from .screen import Screen

log = logging.getLogger(__name__)


def rare_queues(app: Any) -> dict[str, set[str]]:
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

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        if sys.version_info >= (3, 11):  # py-amqp decodes header tables recursively; a 128 KB frame can
            sys.setrecursionlimit(max(sys.getrecursionlimit(), 30_000))  # nest ~26,000 deep (3.11+: no C stack)
        try:
            check(c.app)
            preflight(c.app)
        except (ConfigurationError, TopologyError) as exc:  # one line, no traceback: a setting to change
            raise SystemExit(f"{exc}") from None
        self.context = context.start(c.app)
        self.screen = Screen(c)
        c.on_unknown_task = self.screen.guard_body(c.on_unknown_task, UNREGISTERED, "task {name!r} is not registered")
        c.on_invalid_task = self.screen.guard_body(c.on_invalid_task, REJECTED, "invalid task message: {exc}")
        c.on_unknown_message = self.screen.guard_body(c.on_unknown_message, REJECTED, "not a Celery task message")
        c.on_decode_error = self.screen.guard_decode(c.on_decode_error, REJECTED, "body could not be decoded: {exc}")

    def start(self, c: Any) -> None:
        for name, task in c.app.tasks.items():  # Celery made new strategies for this connection
            if is_rare(task) and name in c.strategies:
                c.strategies[name] = self.screen.strategy(task, c.strategies[name])
        self.context.timer = c.timer
        hub = getattr(c, "hub", None)
        if hub is not None:  # the endings pool processes hand over are published from the event loop
            if self.context.pipeline is None:
                self.context.pipeline = Pipeline(c.app, hub)
            self.context.pipeline.attach(hub)
        self.context.waiting.clear()  # what waited on a connection before this one is dropped by Celery
        wanted = rare_queues(c.app)
        self.screen.queues = {q.name for q in c.task_consumer.queues if q.name in wanted}
        queues = sorted(self.screen.queues)
        bugs = sorted({b for q in queues for b in wanted[q]})
        declare_worker_topology(c.connection, queues, bugs, own_kind(c.app))
        log.info("rare_celery: managing %s", ", ".join(queues) or "no queue")

    def close(self, c: Any) -> None:
        """A worker that stops warm gives back the rare tasks' messages it had received and never
        started: each goes back to its queue as the same message, confirmed, then acked. No other
        worker then sees it redelivered: a redelivery always means a worker that died or lost its
        connection (:func:`rare_celery.worker.request.came_back`). The pool has closed by now (Celery
        closes it first and drops what it had not started); what runs finishes and is acked as usual.
        Only with the prefork pool, which drops what it had not started (a thread pool runs its queue
        out, and solo holds nothing unstarted), and while the connection is up (else the broker returns
        them all anyway)."""
        waiting = list(self.context.waiting.values())
        self.context.waiting.clear()
        prefork = type(c.pool).__module__.endswith(".prefork") if c.pool is not None else False
        if not prefork or c.connection is None or not c.connection.connected:
            return
        given = [request for request in waiting if request.give_back()]
        if given:
            log.info("rare_celery: gave back %d message(s) this worker received and never started", len(given))

    def shutdown(self, c: Any) -> None:
        """The worker stops: the confirms of the endings still on their way are waited for (a while),
        so that their messages are acked; what is not confirmed by then is put back."""
        pipeline, self.context.pipeline = self.context.pipeline, None
        if pipeline is not None:
            pipeline.close()


class BreakerStep(bootsteps.ConsumerStep):
    """The worker's main process hears every note about the breakers its tasks use (a queue of its
    own on ``rare.breakers``), after reading their last states, and keeps them for the screen and
    the pool processes (:class:`rare_celery.breaker_io.Watch`). The change an attempt of this
    worker made is reported from here: signals, events and, for a trip, the state note."""

    name = "rare_celery.breakers"
    requires = ("celery.worker.consumer:Connection", "celery.worker.consumer.tasks:Tasks")

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        c.rare_breakers = self.watch = None
        try:
            settings = breakers(c.app)
        except ConfigurationError as exc:
            raise SystemExit(f"{exc}") from None
        if settings:
            board = context.start(c.app).board = breaker_io.Board.for_this_worker()  # pool processes read it
            c.rare_breakers = self.watch = breaker_io.Watch(settings, board)

    def start(self, c: Any) -> None:
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

    def shutdown(self, c: Any) -> None:
        super().shutdown(c)
        if self.watch is not None:
            self.watch.board.remove()

    def _heard(self, c: Any, message: Any) -> None:
        try:
            note = json.loads(message.body)
        except (TypeError, ValueError, UnicodeDecodeError):
            note = None
        change = cast(breaker_io.Watch, self.watch).hear(note)  # listening: a watch is set
        if change is None:
            return
        if change.note.get("by") != c.hostname:  # another worker's change (it reports it), or an operator's
            if change.kind != br.PROBE and (change.state.why or change.kind == br.CLOSE):
                log.info("rare_celery: breaker %s %s by %r%s", change.state.name,  # by, why: any publisher's text
                         "held open" if change.kind == br.OPENED else "closed", change.note.get("by"),
                         f": {change.state.why!r}" if change.state.why else "")
            return
        try:
            report_change(c, change)
        except Exception as exc:  # noqa: BLE001 - a report; the state is kept either way
            log.warning("rare_celery: could not report breaker %s %s: %r", change.state.name, change.kind, exc)


def report_change(c: Any, change: br.Change) -> None:
    """Log, announce (a trip: its state note), signal and send the event of a change this worker made."""
    state, note = change.state, change.note
    if change.kind == br.OPENED and note["kind"] == br.FAILURE:
        breaker_io.announce(c.app, state.as_note(c.hostname, note.get("task")))
    fields = {"breaker": state.name, "gen": state.gen}
    if change.kind == br.OPENED:
        fields.update(until=state.until, open_for=state.open_for, reopened=note["kind"] != br.FAILURE and not state.why,
                      **({"why": state.why} if state.why else {}))
        log.warning("rare_celery: breaker %s opened for %.3g s (%s)", state.name, state.open_for,
                    state.why or ("its probe failed" if fields["reopened"] else "failures in a row"))
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


def preflight(app: Any) -> None:
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
        if not (isinstance(request, type) and issubclass(request, RareRequest)):
            raise ConfigurationError(
                f"rare_celery: {info.name} sets Request = {request!r}; a RareTask's Request must subclass "
                f"rare_celery.worker.request.RareRequest (it ends the deliveries a lost pool process cannot)")
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
