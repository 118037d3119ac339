"""Bug queues on a live broker: read messages without taking them, move or delete chosen ones.

How a queue is read without consuming it: messages are fetched with ``basic.get`` (manual ack) on a
channel of their own, at most as many as the queue held when reading began, and never acked. When
the read ends (or the process dies) that channel is closed and RabbitMQ puts every unacked message
back. On a classic queue they go back where they were: same order, same bytes, only the delivery's
``redelivered`` flag is set. A quorum queue (RabbitMQ 3.10) keeps every message but not their order,
and adds or increments an ``x-delivery-count`` header (with an ``x-delivery-limit`` set by a policy,
repeated reading counts against it).

Moving is the same read: a chosen message is published with publisher confirms (mandatory) and only
then acked from the bug queue; the others are put back in order. New messages that workers publish
while this runs are behind the ones read and are not touched. If the command dies between the confirm
and the ack, that one message exists in both queues: at least once, never lost.

A connection that dies silently (no reset, nothing more arrives) does not hang a tool: every
connection the tools open has a read timeout (:data:`READ_TIMEOUT`) and asks for heartbeats
(:data:`HEARTBEAT`; the broker then sends one every ``HEARTBEAT / 2`` s, so a live but idle connection
is never silent that long). A connection given up on is dropped without the closing handshake;
:class:`Interrupted` says how many messages were moved before.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import amqp
from amqp.exceptions import AMQPError, ChannelError, MessageNacked, NotFound

from ..publish import prepare, to_line
from . import records

CONNECT_TIMEOUT = 5.0  # seconds to connect and log in
READ_TIMEOUT = 20.0  # seconds without a byte from the broker before a connection is given up
HEARTBEAT = 30  # seconds asked for (the broker may ask for less)


def connection_options() -> dict[str, Any]:
    """What every connection of the tools is made with (kombu ``Connection`` / Celery ``connection_for_*``)."""
    return {"connect_timeout": CONNECT_TIMEOUT, "heartbeat": HEARTBEAT,
            "transport_options": {"read_timeout": READ_TIMEOUT, "write_timeout": READ_TIMEOUT}}


def connect(conn: Any) -> Any:
    """Connect ``conn`` (a kombu Connection) and give its socket a timeout of :data:`READ_TIMEOUT` for
    every read and write.

    The ``read_timeout`` of :func:`connection_options` alone is not enough: py-amqp sets it as
    ``SO_RCVTIMEO`` on a blocking socket, and when the connection goes silent in the middle of a frame
    (a message's body half read) py-amqp retries the read that timed out for ever, at full speed. A
    socket timeout raises :class:`socket.timeout` wherever the read stands. (The login waits at most
    ``connect_timeout``, the same way.)
    """
    conn.connect()
    sock = getattr(getattr(conn.connection, "transport", None), "sock", None)
    if sock is not None:
        sock.settimeout(READ_TIMEOUT)
    return conn


class QueueMissing(LookupError):
    """The queue does not exist in the broker's vhost."""


class MoveFailed(RuntimeError):
    """The broker did not take a message where it was sent; it stays in the bug queue."""

    done = 0  # messages moved before this one


class Interrupted(RuntimeError):
    """The connection failed (timed out, reset, closed) in the middle of :func:`take`: ``done`` messages
    were taken before; ``unsure`` when a message was being moved then, its copy maybe published and
    its ack maybe lost: it may now be in both queues (at least once, never lost)."""

    def __init__(self, cause: BaseException, queue: str, done: int, unsure: bool, moving: bool) -> None:
        silent = isinstance(cause, socket.timeout)
        text = " ".join(str(cause).split())
        why = (f"the broker stopped answering (nothing for {READ_TIMEOUT:g} s)" if silent
               else f"the connection failed ({type(cause).__name__}{': ' + text if text else ''})")
        super().__init__(why)
        self.queue, self.done, self.unsure, self.moving = queue, done, unsure, moving

    def describe(self) -> str:
        """What was done before the failure, and what the failure may have left, in one line."""
        verb = "moving" if self.moving else "deleting"
        text = f"{self.args[0]}: stopped after {verb} {self.done} messages of {self.queue}; the rest stays there"
        if self.unsure and self.moving:
            text += ("; the message being moved then may now be in both queues (its copy was sent, its removal "
                     "may not have arrived): look for it with inspect-bugs before moving it again")
        elif self.done and not self.moving:
            text += " (the last removal may not have arrived: that message may still be there)"
        return text


@dataclass
class Held:
    """A message fetched and not acked: it goes back to its queue unless :meth:`ack` is called."""

    message: amqp.Message
    record: records.Record

    @cached_property
    def fingerprint(self) -> str:
        return records.fingerprint(self.message.body, self.message.properties, self.message.headers)

    def ack(self) -> None:
        self.message.channel.basic_ack(self.message.delivery_tag)


def depth(conn: Any, queue: str) -> tuple[int, int] | None:
    """``(messages ready, consumers)`` of ``queue``, or ``None`` if it does not exist (passive declare)."""
    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue, passive=True)
        return ok.message_count, ok.consumer_count
    except NotFound:
        return None
    finally:
        _close(channel)


@contextlib.contextmanager
def browse(conn: Any, queue: str) -> Iterator[Iterator[Held]]:
    """The messages of ``queue`` from its head, held (not acked) until the ``with`` block ends.

    At most as many as the queue held at the start: messages published meanwhile, behind them, are
    not read. Raises :class:`QueueMissing`.
    """
    records.allow_deep_headers()
    channel = conn.channel()
    channel.auto_decode = False  # py-amqp would turn bodies with a content_encoding into str: keep the bytes
    try:
        try:
            count = channel.queue_declare(queue, passive=True).message_count
        except NotFound:
            raise QueueMissing(queue) from None
        yield _fetch(channel, queue, count)
    except OSError:  # timed out or reset: no closing handshake on a connection that does not answer
        abandon(channel)
        raise
    finally:
        _close(channel)  # RabbitMQ puts back every message not acked


def _fetch(channel: Any, queue: str, count: int) -> Iterator[Held]:
    for position in range(count):
        message = channel.basic_get(queue, no_ack=False)
        if message is None:  # another client holds the rest
            return
        yield Held(message, records.read(queue, position, message.body, message.properties, message.headers))


class Publisher:
    """Publishes on a confirm channel of its own; :meth:`send` returns once the broker has the message."""

    def __init__(self, conn: Any) -> None:
        records.allow_deep_headers()  # a message read with a deep header is written back with it
        self.channel = conn.channel()
        self.channel.confirm_select()
        self._returned: list[str] = []
        self.channel.events["basic_return"].add(lambda exc, *rest: self._returned.append(str(exc)))

    def send(self, message: amqp.Message, queue: str, headers: dict[str, Any], body: bytes | None = None,
             line: tuple[str, str] | None = None) -> None:
        """``message`` (same body and properties, ``headers`` instead of its own; ``body`` instead of its own if
        given: an edit, UTF-8 JSON) to ``queue``; with ``line`` (a service and the kind of its line), to that
        service's line, which lets it go to ``queue`` within the service's limits."""
        props = {k: v for k, v in message.properties.items() if k not in ("application_headers", "expiration")}
        if body is not None:
            props.update(content_type="application/json", content_encoding="utf-8")
        exchange, key = "", queue
        if line is not None:
            via = to_line(queue, line[0], line[1], b"", headers, {})
            prepare(self.channel, via)
            exchange, key, headers = via.exchange, via.routing_key, via.headers
        self._returned.clear()
        try:
            self.channel.basic_publish_confirm(amqp.Message(message.body if body is None else body,
                                                            application_headers=headers, **props),
                                               exchange=exchange, routing_key=key, mandatory=True, confirm_timeout=30)
        except MessageNacked:
            raise MoveFailed(f"the broker refused (nacked) a message for queue {queue!r}") from None
        except ChannelError as exc:
            raise MoveFailed(f"the broker refused a message for queue {queue!r}: {exc}") from None
        if self._returned:
            raise MoveFailed(f"no queue {queue!r} took the message ({self._returned[0]})")

    def close(self) -> None:
        _close(self.channel)


def take(conn: Any, queue: str, wanted: Callable[[Held], bool], send: Callable[[Held, Publisher], None] | None = None,
         progress: Callable[[Held], None] | None = None) -> int:
    """Remove the ``wanted`` messages of ``queue``, each after ``send`` (if given) had it confirmed.

    Returns how many were removed; the others stay where they were. A :class:`MoveFailed` stops it
    (its ``done`` says how many were moved before): that message and every later one stay. A
    connection that fails raises :class:`Interrupted` (how many were taken, whether one may be in
    both queues).
    """
    publisher = Publisher(conn) if send is not None else None
    done, unsure = 0, False
    try:
        with browse(conn, queue) as messages:
            for held in messages:
                unsure = False
                if not wanted(held):
                    continue
                if send is not None:
                    unsure = True  # from here the copy may exist and the ack may be lost
                    try:
                        send(held, cast(Publisher, publisher))  # made when send is given
                    except MoveFailed as exc:
                        exc.done = done
                        raise
                held.ack()
                done += 1
                if progress is not None:
                    progress(held)
    except (OSError, AMQPError, RecursionError) as exc:  # (RecursionError: a deep header, Python < 3.11)
        raise Interrupted(exc, queue, done, unsure, send is not None) from None
    finally:
        if publisher is not None:
            publisher.close()
    return done


def headers_of(held: Held) -> Mapping[str, Any]:
    """The message's own headers (a requeue keeps them, however deep they nest)."""
    headers = held.message.headers
    return headers if isinstance(headers, Mapping) else {}


def abandon(channel: Any) -> None:
    """Drop ``channel``'s connection at once (no closing handshake: it does not answer); the broker puts
    back what it held when it notices the connection is gone (heartbeats: within ``2 * HEARTBEAT`` s)."""
    connection = getattr(channel, "connection", None)
    if connection is not None:
        with contextlib.suppress(Exception):
            connection.collect()


def _close(channel: Any) -> None:
    with contextlib.suppress(Exception):  # a channel the broker closed, a connection gone: all put back anyway
        channel.close()
