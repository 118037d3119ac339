"""A service's limits on the broker: ``service_rate`` and ``service_concurrency``, fleet-wide, with
no server but RabbitMQ.

* **The rate** (:func:`take_rate`) is a sliding window kept by the broker: the queue
  :func:`rare_celery.topology.rate_window_queue` holds one message per attempt started in the last
  window (``x-message-ttl``) and refuses one more than the limit (``x-max-length`` with
  ``reject-publish``: the broker nacks the publish). An attempt runs only once its message is
  confirmed, so at most ``count`` attempts of all workers start in any window of its length. The
  messages are persistent in a durable queue: a broker restart does not empty the window (no burst
  after it), and no worker holds anything (a worker's death changes nothing).
* **Attempts in flight** (:func:`take_slot`): slot ``i`` of ``n`` is the exclusive queue
  :func:`rare_celery.topology.slot_lock_name`. The broker lets one connection declare it and answers
  every other with ``RESOURCE_LOCKED``, as for the breaker's probe lock. A pool process holds its
  slots on a connection of its own (one per process, kept) for the attempt's run and deletes the
  queue after it; if the process or its worker dies, the connection closes and the broker frees the
  slot at once.

* **A pause** the service asked for (``RetryAfter``, :func:`pause`) is the breaker's, held by its note;
  for a service with limits it is also a message in :func:`rare_celery.topology.pause_queue` for the
  pause's length, which each attempt's gate reads last (:func:`paused`): an attempt of another worker
  holds back at once, not only once the note has reached its worker.

* **The line** (:func:`rare_celery.topology.line_queue`): an attempt outside the limits waits there,
  in arrival order (:func:`rare_celery.endings.line`), until it is woken (:func:`wake`): read with
  ``basic.get``, published again to its work queue (confirmed), then acked. An
  attempt that ends wakes the next one (:func:`wake_after`); each worker's main process wakes as many
  as the service's free slots and window places allow, every second (:class:`rare_celery.worker.lines.
  Waker`), so that none waits for a wake that was lost (a process that died before it woke the next).

Neither is the message's safety: an attempt whose limit could not be asked (the broker refused
something else, the connection failed) waits and asks again, it does not run unlimited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from typing import Any, cast

import amqp
from amqp.exceptions import ChannelError, MessageNacked, NotFound, ResourceLocked

from . import headers as hdr
from .topology import (
    CLASSIC,
    QUORUM,
    RETURN_EXCHANGE,
    free_slots_queue,
    line_queue,
    pause_queue,
    rate_window_queue,
    slot_lock_name,
)

log = logging.getLogger(__name__)
TIMEOUT = 5.0  # seconds a window publish or a slot declare may take


def take_rate(app: Any, service: str, rate: tuple[int, float]) -> bool | None:
    """One attempt's place in ``service``'s rate window: True when the broker confirmed it (the attempt
    may start now), False when the window is full (the publish was nacked), ``None`` when the broker
    could not be asked. On this process's holding connection, a channel of its own in confirm mode: a
    refusal there closes that channel only. A window queue deleted meanwhile returns the publish
    (mandatory): ``None``, and it is declared again at the next ask."""
    queue = rate_window_queue(service, *rate)
    try:
        with _holder.lock:
            channel = _holder.confirming(app)
            _holder.declare(queue, channel)
            _holder.returned.clear()
            channel.basic_publish_confirm(amqp.Message(b"", delivery_mode=2), exchange="", routing_key=queue.name,
                                          mandatory=True, confirm_timeout=TIMEOUT)
            if _holder.returned:  # the queue is gone: declared again at the next ask
                _holder.declared.discard(queue.name)
                log.warning("rare_celery: service %s: its rate window %s was missing", service, queue.name)
                return None
        return True
    except MessageNacked:
        return False
    except Exception as exc:  # noqa: BLE001 - unknown: the attempt waits rather than run unlimited
        if isinstance(exc, ChannelError):
            _holder.channels.pop("confirming", None)  # the broker closed it (or will be asked on a new one)
            _holder.declared.discard(queue.name)
        else:
            _holder.drop()
        log.warning("rare_celery: service %s: could not ask for a place in its rate window: %s", service,
                    f"{type(exc).__name__}: {exc}")
        return None


def pause(app: Any, service: str, seconds: float) -> None:
    """``service`` asked for a pause of ``seconds`` (``Retry-After``): a message that lives as long in its
    pause queue (confirmed, so that it is there before this attempt's ending wakes the next). Best
    effort: the breaker's note holds the service as well."""
    queue = pause_queue(service)
    try:
        with _holder.lock:
            channel = _holder.confirming(app)
            _holder.declare(queue, channel)
            message = amqp.Message(b"", delivery_mode=2, expiration=str(max(1, round(seconds * 1000))))
            channel.basic_publish_confirm(message, exchange="", routing_key=queue.name, confirm_timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - the note holds the service; this only makes it sooner
        _lost("confirming", queue.name, exc)
        log.warning("rare_celery: service %s: could not mark its pause on the broker: %s", service,
                    f"{type(exc).__name__}: {exc}")


def paused(app: Any, service: str) -> bool | None:
    """Whether ``service`` is in a pause it asked for (a message in its pause queue); ``None`` when the
    broker could not say. A declare, not a passive one: a queue not there yet is no pause, and closes
    no channel."""
    queue = pause_queue(service)
    try:
        with _holder.lock:
            ok = _holder.quiet(app).queue_declare(queue.name, durable=True, auto_delete=False,
                                                  arguments=queue.queue_arguments)
            return bool(ok.message_count)
    except Exception as exc:  # noqa: BLE001 - unknown: the attempt waits rather than run through a pause
        _lost("quiet", queue.name, exc)
        log.warning("rare_celery: service %s: could not read its pause queue: %s", service,
                    f"{type(exc).__name__}: {exc}")
        return None


def _lost(channel: str, queue: str, exc: BaseException) -> None:
    """After ``exc`` on one of the holding connection's channels: a channel the broker closed is opened
    again at its next use (the connection, and the slots it holds, stay); any other failure drops
    the connection."""
    if isinstance(exc, ChannelError):
        _holder.channels.pop(channel, None)
        _holder.declared.discard(queue)
    else:
        _holder.drop()


class Slot:
    """One of a service's slots for attempts in flight, held until :meth:`release` (or until the
    process holding it dies: its connection closes, and the broker deletes the queue)."""

    def __init__(self, service: str, slots: int, number: int, connection: int) -> None:
        self.service, self.slots, self.number = service, slots, number
        self.name: str | None = slot_lock_name(service, number)
        self.connection = connection  # the holding connection's number (_Holder.made) it was taken on

    def release(self) -> None:
        """Let go of the slot and leave the hint that it is free (best effort)."""
        name, self.name = self.name, None
        if name is None:
            return
        try:
            with _holder.lock:
                channel = _holder.quiet()
                if _holder.made == self.connection:  # else it went with the connection it was taken on
                    # not waited for: the hint and the wake go at once, after it on this channel; the queue
                    # is this connection's own, so the broker has no reason to refuse the delete
                    channel.queue_delete(name, nowait=True)
                hints = free_slots_queue(self.service, self.slots)
                _holder.declare(hints)
                channel.basic_publish(amqp.Message(str(self.number), delivery_mode=1), exchange="",
                                      routing_key=hints.name)
        except Exception as exc:  # noqa: BLE001 - not let go: the connection is dropped, which lets go of all
            log.warning("rare_celery: could not let go of slot %s (%s); dropping its connection", name,
                        f"{type(exc).__name__}: {exc}")
            _holder.drop()


class _Holder:
    """This process's connection that holds its slots (one per process: a forked pool process makes
    its own), made when first needed and made again after a failure; used by one thread at a time
    (``lock``: a threads or gevent pool runs several attempts in one process). Two channels: one for
    the slots' exclusive declares (the broker closes it when it refuses one), and a quiet one for what
    it does not refuse (a slot's delete, the hints, a line's ``basic.get``)."""

    def __init__(self) -> None:
        self.app: Any = None
        self.conn: Any = None
        self.pid = 0
        self.channels: dict[str, Any] = {}
        self.declared: set[str] = set()
        self.returned: list[Any] = []  # publishes of the confirming channel that no queue took
        self.lock = threading.RLock()
        self.made = 0  # connections made so far: a slot taken on an earlier one is gone with it

    def connection(self, app: Any = None) -> Any:
        if self.conn is not None and self.pid != os.getpid():  # inherited through a fork: never used here
            self.conn = None
            self.channels, self.declared = {}, set()
        if self.conn is None:
            self.app = app or self.app
            # no heartbeats: nothing services them while an attempt runs, and the broker would close the
            # connection (freeing the slot) under a long one; a process that dies closes its socket at once
            conn = self.app.connection_for_write(heartbeat=0)
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT)
            self.conn, self.pid, self.made = conn, os.getpid(), self.made + 1
        return self.conn

    def _channel(self, which: str, app: Any) -> Any:
        conn = self.connection(app)
        channel = self.channels.get(which)
        if channel is None or channel.connection is None or not channel.is_open:
            channel = self.channels[which] = conn.channel()
        return channel

    def quiet(self, app: Any = None) -> Any:
        return self._channel("quiet", app)

    def confirming(self, app: Any = None) -> Any:
        """The channel the rate's places are published on, in confirm mode."""
        fresh = "confirming" not in self.channels or not self.channels["confirming"].is_open
        channel = self._channel("confirming", app)
        if fresh:
            channel.confirm_select()
            channel.events["basic_return"].add(lambda *args: self.returned.append(args))
        return channel

    def locking(self, app: Any = None) -> Any:
        return self._channel("locking", app)

    def refused(self) -> None:
        """The broker refused a declare on the locking channel, and closed it."""
        self.channels.pop("locking", None)

    def declare(self, queue: Any, channel: Any = None) -> None:
        """Declare ``queue`` (on ``channel``, else the quiet one), once per connection."""
        if queue.name not in self.declared:
            queue.bind(channel if channel is not None else self.quiet()).declare()
            self.declared.add(queue.name)

    def drop(self) -> None:
        self.channels, self.declared = {}, set()
        conn, self.conn = self.conn, None
        if conn is not None and self.pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.release()


_holder = _Holder()


def take_slot(app: Any, service: str, slots: int, *, hinted_only: bool = False) -> Slot | None:
    """A free slot of ``service``'s ``slots``, on this process's holding connection; ``None`` when all
    are held (or the broker could not be asked). ``hinted_only``: only a slot a hint says was just let
    go of."""
    for tries in (1, 2):  # a kept connection the broker closed meanwhile: once more on a new one
        try:
            with _holder.lock:
                return _take(app, service, slots, hinted_only)
        except Exception as exc:  # noqa: BLE001 - unknown: the attempt waits rather than run unlimited
            _holder.drop()
            if tries == 2:
                log.warning("rare_celery: service %s: could not ask for a slot: %s", service,
                            f"{type(exc).__name__}: {exc}")
    return None


def _take(app: Any, service: str, slots: int, hinted_only: bool) -> Slot | None:
    """A free slot: first the one a hint says was just let go of, then the others in a random order;
    ``None`` when all are held."""
    order = [] if hinted_only else random.sample(range(slots), slots)
    hint = _hint(app, service, slots)
    if hint is not None:
        order = [hint, *(n for n in order if n != hint)]
    for number in order:
        try:
            _holder.locking(app).queue_declare(queue=slot_lock_name(service, number), durable=False, exclusive=True,
                                               auto_delete=False, arguments={"x-queue-type": "classic"})
        except ResourceLocked:  # held by another attempt: the broker closed the channel (a new one next)
            _holder.refused()
            continue
        return Slot(service, slots, number, _holder.made)
    return None


def _hint(app: Any, service: str, slots: int) -> int | None:
    """The number of a slot just let go of, if a hint is there (anyone may publish one: it only orders
    the tries)."""
    hints = free_slots_queue(service, slots)
    _holder.connection(app)
    _holder.declare(hints)
    message = _holder.quiet().basic_get(hints.name, no_ack=True)
    body = getattr(message, "body", None)
    text = body.decode("ascii", "replace") if isinstance(body, bytes) else body
    return int(text) if isinstance(text, str) and text.isdigit() and int(text) < slots else None


# -- what is in use, and the line --------------------------------------------------------------------

def held(conn: Any, slot: str) -> bool | None:
    """Whether slot queue ``slot`` is held now (its exclusive queue answers a passive declare with
    RESOURCE_LOCKED); ``None`` when the broker could not say."""
    channel = conn.channel()
    try:
        channel.queue_declare(slot, passive=True)
        return False  # it exists and nobody holds it (a slot just let go of)
    except NotFound:
        return False
    except ResourceLocked:
        return True
    except ChannelError:
        return None
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def depth(conn: Any, queue: str) -> int | None:
    """The messages in ``queue`` (0: no such queue); ``None`` when the broker could not say."""
    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue, passive=True).message_count)
    except NotFound:
        return 0
    except ChannelError:
        return None
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def in_flight(conn: Any, service: str, slots: int) -> int | None:
    """How many of ``service``'s ``slots`` are held now (``None``: the broker could not say)."""
    found = [held(conn, slot_lock_name(service, i)) for i in range(slots)]
    return None if None in found else sum(1 for h in found if h)


def in_window(conn: Any, service: str, rate: tuple[int, float]) -> int | None:
    """How many attempts of ``service`` started in its rate's last window."""
    return depth(conn, rate_window_queue(service, *rate).name)


def waiting(conn: Any, service: str) -> int | None:
    """How many attempts of ``service`` wait in its lines (classic and quorum)."""
    found = [depth(conn, line_queue(service, kind).name) for kind in (CLASSIC, QUORUM)]
    return None if None in found else sum(cast(int, n) for n in found)


def wake(conn: Any, service: str, kind: str, count: int = 1, channel: Any = None) -> int:
    """Send up to ``count`` attempts at the head of ``service``'s line (of ``kind``) back to their work
    queues. Each is read (``basic.get``), published again to ``rare.return`` with its work queue as the
    key and :data:`rare_celery.headers.WOKEN` (confirmed: a work queue that is gone sends it on to
    ``rare.unrouted``), then acked. Not rejected to be dead-lettered: RabbitMQ 4 would deliver it
    *redelivered*, which a worker must take for a delivery whose worker died. A waker that dies
    before the ack leaves it unacked: back in the line (and, if its copy was confirmed, in its work
    queue too: at least once). Returns how many went; raises what the broker raises. ``channel``:
    one in confirm mode to use and keep open (else one is opened and closed)."""
    woken, kept = 0, channel is not None
    if not kept:
        channel = conn.channel()
        channel.confirm_select()
    try:
        for _ in range(count):
            message = channel.basic_get(line_queue(service, kind).name, no_ack=False)
            if message is None:
                break
            props = {k: v for k, v in message.properties.items() if k not in ("application_headers", "expiration")}
            headers = {k: v for k, v in (message.properties.get("application_headers") or {}).items()
                       if k not in hdr.BROKER_KEYS}
            headers[hdr.WOKEN] = line_queue(service, kind).name
            try:
                channel.basic_publish_confirm(amqp.Message(message.body, application_headers=headers, **props),
                                              exchange=RETURN_EXCHANGE.name,
                                              routing_key=message.delivery_info.get("routing_key") or "",
                                              confirm_timeout=TIMEOUT)
            except MessageNacked:  # its work queue refused it: back in the line, and no more now
                channel.basic_reject(message.delivery_tag, requeue=True)
                break
            channel.basic_ack(message.delivery_tag)
            woken += 1
    except NotFound:  # no line yet: nobody waits (the broker closed the channel)
        kept = False
    finally:
        if not kept:
            with contextlib.suppress(Exception):
                channel.close()
    return woken


UNASKED_PAUSE = (1.0, 2.0)  # seconds an attempt waits when the broker could not be asked (never a hot loop)


def paused_wait(asked: bool = True) -> float:
    """How long an attempt that found its service paused waits before its gates again: 1-1.5 s (by then
    the breaker's board holds it until the pause ends); 1-2 s when the broker could not say."""
    return random.uniform(1.0, 1.5) if asked else random.uniform(*UNASKED_PAUSE)


def rate_pause(rate: tuple[int, float], asked: bool = True) -> float:
    """How long an attempt that holds a slot and found the rate's window full waits before it asks again:
    about the time one place takes to free at that rate (at least 10 ms), spread by up to half of it;
    1-2 s when the broker could not be asked (``asked`` false)."""
    if not asked:
        return random.uniform(*UNASKED_PAUSE)
    count, window = rate
    return max(0.01, window / count) * random.uniform(1.0, 1.5)


def from_line(headers: Any, service: str) -> bool:
    """Whether a message was woken from one of ``service``'s lines (:data:`rare_celery.headers.WOKEN`): it
    asks for a slot before it would join the end of the line again. (Anyone may write the header; it
    changes only where in the line an attempt waits.)"""
    woken = headers.get(hdr.WOKEN) if hasattr(headers, "get") else None
    return isinstance(woken, str) and woken in {line_queue(service, kind).name for kind in (CLASSIC, QUORUM)}


def others_wait(app: Any, service: str, kind: str) -> bool:
    """Whether attempts of ``service`` wait in its line (of ``kind``) now: a new attempt joins the end of
    the line instead of taking a slot before them. False when the broker cannot say."""
    try:
        with _holder.lock:
            return bool(_holder.quiet(app).queue_declare(line_queue(service, kind).name, passive=True).message_count)
    except NotFound:  # no line yet (the broker closed the quiet channel: a new one next time)
        return False
    except Exception as exc:  # noqa: BLE001 - it asks for a slot as if nobody waited
        _holder.drop()
        log.info("rare_celery: service %s: could not look at its line: %s", service, f"{type(exc).__name__}: {exc}")
        return False


def wake_after(app: Any, service: str, kind: str, rate: tuple[int, float] | None, slot: Slot | None) -> None:
    """An attempt of ``service`` has ended: let go of its ``slot`` (with the hint that it is free), then
    wake the next one in the line, which tries the hinted slot first. Without a slot (a rate only),
    only if the rate's window has a free place (else the workers' wakers wake it when one frees).
    Never raises."""
    if slot is not None:
        slot.release()
    try:
        with _holder.lock:
            conn, channel = _holder.connection(app), _holder.quiet(app)
            # the window exists: this attempt took a place in it (a passive declare on the kept channel)
            if slot is not None or rate is None or channel.queue_declare(
                    rate_window_queue(service, *rate).name, passive=True).message_count < rate[0]:
                wake(conn, service, kind, channel=_holder.confirming(app))
    except Exception as exc:  # noqa: BLE001 - the workers' wakers wake it within a second
        _holder.drop()
        log.info("rare_celery: service %s: could not wake the next attempt in its line: %s", service,
                 f"{type(exc).__name__}: {exc}")
