"""Publishing the copy a decision needs: confirmed, mandatory, never silently dropped.

Every message rare_celery publishes (a retry, a bug-queue entry, a hop, a delayed start, a copy of a
bad message, a message put back after a failed ending) is a :class:`Copy` and leaves through
:func:`send`: the target is declared first (once per connection), the publish is ``mandatory`` and
waits for the broker's confirm. (The retries a pool process hands to the worker's main process are
written by :func:`write` instead, their confirms read as they come: :mod:`rare_celery.pipeline`.) A message no queue takes comes back; the target is declared again
and the publish tried once more. Anything the broker refuses raises :class:`PublishRefused`, so the
caller keeps (does not ack) the original message.

:func:`send_patiently` is the refusal back-off: a refusal the broker may get over (a nack from a
full queue, a lost connection) is tried again after 1, 2, 4 ... seconds within a time budget, while
the original stays unacked; soft time limits cannot interrupt it (see :func:`shielded`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, cast

from amqp import spec
from amqp.exceptions import ChannelError, MessageNacked
from kombu import Queue
from kombu.exceptions import OperationalError
from kombu.serialization import dumps

from . import context, declare
from . import headers as hdr
from .exceptions import ConfirmMissing, PublishRefused
from .topology import (
    CLASSIC,
    DELAY_EXCHANGE,
    LINE_HEAD_PRIORITY,
    MAX_DELAY_MS,
    RETURN_EXCHANGE,
    UNROUTED_QUEUE,
    bug_queue,
    delay_queue,
    grid_floor,
    line_queue,
    name_problem,
    unrouted_queue,
)

log = logging.getLogger(__name__)
NO_ROUTE, NOT_FOUND = 312, 404
CONFIRM_TIMEOUT = 30.0  # seconds a publish waits for the broker's confirm before it counts as refused
PATIENCE = 240.0  # seconds a refused publish is tried again for, at most
FIRST_PAUSE, LONGEST_PAUSE = 1.0, 30.0  # between tries of a refused publish


@dataclass(frozen=True)
class Copy:
    """One message to publish, and where: ``exchange`` + ``routing_key``, ``target`` declared first.

    ``returns_to``: for a message waiting in a delay queue, the work queue it comes back to; it is
    bound to ``rare.return`` before the publish, so the due message finds its way back.
    """

    body: bytes | str
    headers: dict[str, Any]
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    target: Queue | None
    returns_to: str | None = None
    waits: float = field(default=0.0, compare=False)  # seconds the delay queue holds it (<= the delay)
    unrouted: Queue = UNROUTED_QUEUE  # for a delay copy: where due messages go whose work queue is gone

    @property
    def where(self) -> str:
        if self.returns_to is not None:
            return f"delay queue {cast(Queue, self.target).name!r} (back to {self.returns_to!r})"
        if self.target is not None:
            return f"queue {self.target.name!r}"
        return f"exchange {self.exchange!r} key {self.routing_key!r}"


def to_queue(queue: Queue, body: Any, headers: dict[str, Any], properties: dict[str, Any]) -> Copy:
    """A copy for ``queue`` itself, through the default exchange (a hop, a message put back)."""
    return Copy(body, headers, properties, "", queue.name, queue)


def to_bugs(name: str, body: Any, headers: dict[str, Any], properties: dict[str, Any], kind: str = CLASSIC) -> Copy:
    """A copy for the bug queue ``name`` (durable, classic unless ``kind`` says, declared if missing)."""
    return Copy(body, headers, properties, "", name, bug_queue(name, kind))


def to_delay(work_queue: str, delay: float, kind: str, body: Any, headers: dict[str, Any], properties: dict[str, Any],
             slack: float = 0.0, own_kind: str = CLASSIC) -> Copy:
    """A copy that waits ``delay`` seconds (at most; see ``Copy.waits``) and comes back to ``work_queue``.

    It waits in the delay queue of the largest grid value not above ``delay`` (+ ``slack``: a message
    may come back that much late, to save a round); the rest is sent round again by the worker when
    it arrives early (see ``x-rare-due``). Under 1 ms: straight back. ``own_kind``: the kind of the
    app's ``rare.unrouted`` (see :func:`rare_celery.topology.own_kind`).
    """
    ms = min(int((delay + slack) * 1000), MAX_DELAY_MS)
    if ms < 1:
        return Copy(body, headers, properties, "", work_queue, None)
    queue = delay_queue(grid_floor(ms), kind)
    ttl = queue.queue_arguments["x-message-ttl"]
    # The queue's TTL once more, on the message: a quorum queue that another client is still creating
    # takes messages before it knows its TTL (RabbitMQ 3.10 to 4.0 start it without one and set it a
    # moment later) and never expires such a message, nor, as it only expires from its head, any behind
    # it. Dead-lettering removes ``expiration``: the message comes back without it. kombu takes seconds
    # and writes int(seconds * 1000) ms: the half ms keeps the value exact.
    properties = {**properties, "expiration": (ttl + 0.5) / 1000}
    return Copy(body, {**headers, "BCC": [queue.routing_key]}, properties, DELAY_EXCHANGE.name, work_queue, queue,
                returns_to=work_queue, waits=ttl / 1000, unrouted=unrouted_queue(own_kind))


def to_line(work_queue: str, service: str, kind: str, body: Any, headers: dict[str, Any], properties: dict[str, Any],
            expires_in: float | None = None, own_kind: str = CLASSIC, head: bool = False) -> Copy:
    """A copy that waits in ``service``'s line (:func:`rare_celery.topology.line_queue`) until it is woken,
    then comes back to ``work_queue``; ``expires_in`` seconds at most (its shelf life's rest). ``head``: at
    the head of the line (:data:`~rare_celery.topology.LINE_HEAD_PRIORITY`), not its end."""
    queue = line_queue(service, kind)
    if head:  # its own priority goes with it, and comes back on every copy made of it (message.own_priority)
        own = properties.get("priority") or 0
        properties = {**properties, "priority": max(LINE_HEAD_PRIORITY, own)}
        headers = {**headers, hdr.OWN_PRIORITY: own}
    if expires_in is not None:  # dead-lettered back when its shelf life ends (the worker then ends it)
        properties = {**properties, "expiration": max(int(expires_in * 1000), 1) / 1000}
    return Copy(body, {**headers, "BCC": [queue.routing_key]}, properties, DELAY_EXCHANGE.name, work_queue, queue,
                returns_to=work_queue, unrouted=unrouted_queue(own_kind))


def encoded(copy: Copy) -> Copy:
    """``copy`` with its body as bytes, encoded as kombu's producer would (its default serializer, JSON),
    unless it is already: a pool process hands its retries to the worker's main process encoded, and
    that process, the busiest of a worker, only writes them (:func:`write`)."""
    if copy.properties.get("content_type"):
        return copy
    content_type, content_encoding, body = dumps(copy.body)
    return replace(copy, body=body, properties={**copy.properties, "content_type": content_type,
                                                "content_encoding": content_encoding})


def write(channel: Any, copy: Copy) -> None:
    """Write ``copy`` to ``channel``, persistent and mandatory, without waiting for anything: the message
    kombu's ``Producer.publish`` makes of it (priority 0 unless it has one, ``expiration`` in whole ms),
    without a producer per message. Its body is encoded unless it is already (:func:`encoded`)."""
    copy = encoded(copy)
    properties = {k: v for k, v in copy.properties.items() if k not in _MADE_HERE}
    properties["delivery_mode"] = 2
    expiration = copy.properties.get("expiration")
    if expiration is not None:
        properties["expiration"] = str(int(expiration * 1000))
    body = copy.body.encode(copy.properties.get("content_encoding") or "utf-8") if isinstance(copy.body, str) else copy.body
    message = channel.prepare_message(body, copy.properties.get("priority") or 0, copy.properties["content_type"],
                                      copy.properties.get("content_encoding") or "binary", copy.headers, properties)
    channel.basic_publish(message, exchange=copy.exchange, routing_key=copy.routing_key, mandatory=True,
                          timeout=CONFIRM_TIMEOUT)  # of the write: a socket that takes nothing for that long is dead


_MADE_HERE = ("priority", "content_type", "content_encoding", "expiration")  # by write(), from the copy's own


def send(producer: Any, copy: Copy, timeout: float = CONFIRM_TIMEOUT, confirm_wait: float = 0.0) -> None:
    """Publish ``copy`` with confirms, mandatory; raises :class:`PublishRefused` if the broker does not
    take it.

    A publish is never sent twice to answer one missing confirm (the first copy may be in its queue
    already): a lost connection is renewed and the publish tried again only while nothing was
    written. Once it is written, a confirm that does not come within ``timeout`` seconds is waited
    for ``confirm_wait`` seconds more on the same channel; then (or if the connection is lost
    meanwhile) :class:`~rare_celery.exceptions.ConfirmMissing`: the copy may exist or not, and the
    connection is dropped, so that its late confirm is never taken for another publish's."""
    problem = name_problem(copy.routing_key if copy.target is None else copy.target.name)
    if problem:
        raise PublishRefused(f"cannot publish to {copy.where}: {problem}")

    def publish() -> None:
        _closed_meanwhile(producer)
        _prepare(producer, copy)
        wire = producer.channel.connection  # py-amqp counts the frames it wrote (after each write)
        before = getattr(wire, "bytes_sent", None)
        try:
            producer.publish(copy.body, exchange=copy.exchange, routing_key=copy.routing_key, headers=copy.headers,
                             mandatory=True, delivery_mode=2, retry=False, timeout=timeout, **copy.properties)
        except (MessageNacked, ChannelError):
            raise  # certain answers: not taken (a nack, a return, a queue not found)
        except Exception as exc:
            if before is not None and getattr(wire, "bytes_sent", before) == before:
                raise  # nothing written: kombu may renew the connection and publish it
            if isinstance(exc, TimeoutError):
                _await_confirm(producer, copy, timeout, confirm_wait)
                return
            _drop(producer)
            raise ConfirmMissing(f"the connection failed before the broker confirmed the copy for {copy.where} "
                                 f"({why(exc)}): it may be there or not") from None

    # a lost connection (also while declaring) is renewed and the publish tried again while nothing was written
    ensured = producer.connection.ensure(producer, publish, max_retries=3, interval_start=0, interval_step=0.5,
                                         interval_max=1)
    for last_try in (False, True):
        try:
            ensured()
            return
        except PublishRefused:
            raise
        except ChannelError as exc:
            code = getattr(exc, "reply_code", None)
            if code == NO_ROUTE:
                with contextlib.suppress(Exception):  # the returned message is still confirmed: take that ack
                    producer.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=10)
            if code not in (NO_ROUTE, NOT_FOUND) or last_try:
                raise PublishRefused(f"the broker did not take the message for {copy.where}: {why(exc)}",
                                     transient=code in (NO_ROUTE, NOT_FOUND)) from None
            log.warning("rare_celery: %s was missing; declaring it again", copy.where)
            with contextlib.suppress(Exception):
                declare.forget(producer.channel)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the caller must keep the original
            # kombu renews the connection after a nack (py-amqp files MessageNacked under connection
            # errors) and then re-raises it as OperationalError: look for the nack behind it.
            cause = exc if isinstance(exc, MessageNacked) else (exc.__cause__ or exc.__context__)
            if isinstance(cause, MessageNacked):
                raise PublishRefused(f"the broker refused (nacked) the message for {copy.where}",
                                     transient=True) from None
            transient = isinstance(exc, (OperationalError, TimeoutError, *producer.connection.connection_errors))
            raise PublishRefused(f"the publish to {copy.where} failed: {why(exc)}", transient=transient) from None


def _await_confirm(producer: Any, copy: Copy, waited: float, more: float) -> None:
    """The confirm of a written publish did not come in ``waited`` s: wait ``more`` s on the same channel."""
    def answer(method: Any, *args: Any) -> None:
        if method == spec.Basic.Nack:
            raise MessageNacked()

    if more > 0:
        log.warning("rare_celery: the broker has not confirmed the copy for %s in %g s; waiting up to %g s more "
                    "(never publishing it again)", copy.where, waited, more)
        try:
            producer.channel.wait([spec.Basic.Ack, spec.Basic.Nack], callback=answer, timeout=more)
            return
        except MessageNacked:
            raise
        except Exception:  # noqa: BLE001, S110 - unknown, as below
            pass
    _drop(producer)
    raise ConfirmMissing(f"the broker did not confirm the copy for {copy.where} in {waited + max(more, 0):g} s: "
                         f"it may be there or not")


def _closed_meanwhile(producer: Any) -> None:
    """Read, without waiting, what the broker sent on the producer's connection since it last published:
    a connection the broker closed meanwhile (a restart, an operator, missed heartbeats of an idle pool
    process) raises its connection error here, before anything is written, and the publish goes out on a
    new connection. Written into the dead one, its fate would be unknown: the original kept and its
    attempt run again."""
    wire = getattr(producer.channel, "connection", None)
    transport = getattr(wire, "transport", None)
    sock = getattr(transport, "sock", None)
    if wire is None or sock is None:
        return
    for _ in range(100):  # heartbeats piled up in an idle connection: read them all
        if not getattr(transport, "_read_buffer", b"") and not _readable(sock):
            return
        try:
            wire.drain_events(timeout=0.05)
        except socket.timeout:
            return


def _readable(sock: Any) -> bool:
    """Something to read on ``sock`` now (``poll``: any descriptor number; ``select`` only where it lacks)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


def _drop(producer: Any) -> None:
    """Close the producer's connection: a confirm still to come on it must never answer another publish."""
    with contextlib.suppress(Exception):
        producer.connection.collect()


def _prepare(producer: Any, copy: Copy) -> None:
    prepare(producer.channel, copy)


def prepare(channel: Any, copy: Copy) -> None:
    """Declare what ``copy`` needs on ``channel``, once per connection: its target; for a copy that waits
    (a delay queue, a service's line), the way back."""
    if copy.returns_to is not None:
        declare.once(channel, copy.unrouted)
        declare.once(channel, RETURN_EXCHANGE)
    if copy.target is not None:
        declare.once(channel, copy.target)
    if copy.returns_to is not None:
        declare.bind_return_once(channel, copy.returns_to)


def why(exc: BaseException) -> str:
    """An exception on one line, with its type: what the log says a publish failed of."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def log_refused(who: str, reason: object, pause: float | None) -> None:
    """The one log line of a copy the broker did not take, its original kept: tried again after
    ``pause`` seconds, or (``None``) given up on for this delivery."""
    log.error("rare_celery: %s kept in its queue (not acked): %s; %s", who, reason,
              f"trying again in {pause:g} s" if pause is not None else "giving up on it for this delivery")


def send_patiently(app: Any, copy: Copy, *, budget: float = PATIENCE, timeout: float = CONFIRM_TIMEOUT,
                   confirm_wait: float = 0.0,
                   on_refused: Callable[[PublishRefused, float | None], None] | None = None) -> None:
    """:func:`send` through ``app``'s producer pool; a transient refusal is tried again (1, 2, 4 ... 30 s)
    for at most ``budget`` seconds. Raises the last :class:`PublishRefused` when it gives up (a
    :class:`~rare_celery.exceptions.ConfirmMissing` at once: it is not a refusal).

    ``on_refused(exc, pause)`` is told about each refusal (``pause`` is ``None`` for the last)."""
    started, pause = time.monotonic(), FIRST_PAUSE
    while True:
        try:
            with producer_for(app, timeout) as producer:
                send(producer, copy, timeout, confirm_wait)
            return
        except PublishRefused as exc:
            left = budget - (time.monotonic() - started)
            again = exc.transient and left > pause
            if on_refused is not None:
                on_refused(exc, pause if again else None)
            if not again:
                raise
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE)


@contextlib.contextmanager
def producer_for(app: Any, timeout: float) -> Iterator[Any]:
    """A producer to publish with: in a worker's main process its own (see
    :class:`rare_celery.context.WorkerContext`: a connection the pool processes it forks never touch,
    as the app's producer pool is reset in every new pool process), else one of the app's pool."""
    ctx = context.of(app)
    if ctx is None or not ctx.in_main():
        with app.producer_pool.acquire(block=True, timeout=timeout) as producer:
            yield producer
        return
    with ctx.lock:  # one publish at a time (solo, threads or greenlet pools run tasks here too)
        if ctx.producer is None:
            ctx.producer = app.amqp.Producer(app.connection_for_write())
        try:
            yield ctx.producer
        except Exception:
            # A failed publish may leave the producer on a channel of a connection kombu gave up
            # renewing (Connection.ensure collects it, then fails to connect: a failover URL whose next
            # node is down), and it is never revived: every later publish of this process would fail
            # (AttributeError: 'NoneType' object has no attribute 'client'). The next one starts afresh.
            producer, ctx.producer = ctx.producer, None
            with contextlib.suppress(Exception):
                producer.connection.release()
            raise


# -- soft time limits ---------------------------------------------------------------------------

_SOFT: signal.Signals | None = getattr(signal, "SIGUSR1", None)  # billiard's soft time limit signal


class shielded:
    """``with shielded() as fired:`` while the block runs, a soft time limit (billiard's SIGUSR1) does
    not raise inside it: it is noted in ``fired``. Deciding and publishing where a message goes is not
    interrupted half-way; the hard time limit still ends the process (its message is routed by the
    worker). A class, not a generator: an exception leaving the block passes through no extra frames.
    Inside another shield it does nothing (``fired`` is then the outer one's)."""

    __slots__ = ("fired", "previous")
    _outer: shielded | None = None  # the shield in force (main thread only)

    def __init__(self) -> None:
        self.fired: list[Any] = []
        self.previous: Callable[[int, FrameType | None], Any] | int | None = None

    def __enter__(self) -> list[Any]:
        if _SOFT is None or threading.current_thread() is not threading.main_thread():
            return self.fired
        if shielded._outer is not None:
            return shielded._outer.fired
        try:
            self.previous = signal.signal(_SOFT, lambda signum, frame: self.fired.append(time.monotonic()))
        except (ValueError, OSError):  # not allowed here: nothing to shield
            return self.fired
        shielded._outer = self
        return self.fired

    def __exit__(self, *exc_info: object) -> None:
        if shielded._outer is self:
            shielded._outer = None
            if self.previous is not None:
                signal.signal(cast(signal.Signals, _SOFT), self.previous)  # set in __enter__: not None
