"""The worker's main process publishes the endings its pool processes hand it, confirms pipelined.

A pool process that has decided a retry does not wait for the broker: it hands the ending's copy to
the worker's main process (:func:`rare_celery.pool.attempt.end`) and takes its next message, as a
success does. The main process publishes each copy on a connection of its own, in confirm mode,
without waiting (:class:`Pipeline`): the broker's confirms are read by the worker's event loop as they
come, and only the confirm of a copy acks its original (:mod:`rare_celery.worker.request`). Many copies
are on their way at once; none of them holds a pool process.

What each answer means, and what follows:

* **ack**: the copy is in its queue: the original is acked (``done``).
* **a return, then its ack** (no queue took it: someone deleted it): everything is declared again
  and the copy published once more; returned twice, it fails.
* **nack**, or no connection to publish on (the broker down, refusing, a queue missing): the broker
  did not take the copy. It is published again after 1, 2, 4 ... 30 s (:data:`~rare_celery.publish.PATIENCE`
  at most), the original unacked meanwhile, as a pool process would (:func:`rare_celery.publish.send_patiently`);
  then, or for a refusal that does not pass (a declaration refused with other arguments), it fails
  (``failed(why)``): its original is put back (:func:`rare_celery.worker.request.put_back`), not acked.
  After a nack the connection is renewed (once the copies already written on it are settled; what comes
  meanwhile waits, unwritten): a channel a full quorum queue told to stop publishing stays refused by
  the broker itself until that queue says go, and RabbitMQ 3.10 never says it once the limit's policy
  is removed (it says it when the queue falls below the limit). A new channel asks the queue afresh.
* a write that failed, the connection or its channel lost, or no confirm within
  :data:`CONFIRM_DEADLINE`: the fate of every copy waiting on that connection is unknown; none is
  published again to find out (that could make two copies): each fails at once. At least once: such an
  attempt may run again.

Nothing here blocks the event loop but the declarations of a new target (once per connection).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amqp.exceptions import ChannelError

from . import headers as hdr
from .declare import forget
from .publish import FIRST_PAUSE, LONGEST_PAUSE, NOT_FOUND, PATIENCE, Copy, log_refused, prepare, write
from .publish import why as _why
from .topology import name_problem

log = logging.getLogger(__name__)
CONFIRM_DEADLINE = 55.0  # seconds a copy may wait for its confirm (the main process's publishes: 5 + 25 s, and more)
TICK = 1.0  # seconds between the pipeline's checks: heartbeats, confirms past their deadline
FLUSH = 10.0  # seconds the worker waits, when it stops, for the confirms still to come


@dataclass
class _Sent:
    copy: Copy
    done: Callable[[], None]
    failed: Callable[[str], None]
    who: str
    held: Callable[[], bool]  # whether the original is still this worker's (its channel open)
    at: float = field(default_factory=time.monotonic)  # when this try was written
    first: float = field(default_factory=time.monotonic)  # when the first was
    pause: float = FIRST_PAUSE  # before the next try of a copy the broker did not take
    returned: bool = False
    tries: int = 1


class Pipeline:
    """One worker main process's publisher of handed endings (see the module documentation).

    Used from the event loop's thread only (:meth:`here`): another thread (a thread pool's) publishes
    its endings itself, waiting for each confirm."""

    def __init__(self, app: Any, hub: Any) -> None:
        self.app, self.hub = app, hub
        self.thread = threading.get_ident()
        self._conn: Any = None
        self._channel: Any = None
        self._seq = 0
        self._pending: OrderedDict[int, _Sent] = OrderedDict()
        self._copies: dict[str, int] = {}  # x-rare-copy -> its publish's sequence number (for a return)
        self._timer: Any = None
        self._fd: int | None = None
        self._renew = False  # a nack came: the next copy goes out on a new connection
        self._held: list[_Sent] = []  # copies waiting, unwritten, for the connection to be renewed

    # -- what the worker calls ----------------------------------------------------------------

    def here(self) -> bool:
        """Whether this thread may publish through the pipeline (the event loop's)."""
        return threading.get_ident() == self.thread

    def attach(self, hub: Any) -> None:
        """The consumer (re)started: read the confirms and tick in ``hub`` (a reset hub forgot both)."""
        self.hub, self.thread = hub, threading.get_ident()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = hub.call_repeatedly(TICK, self._tick)
        if self._conn is not None:
            self._watch()

    def send(self, copy: Copy, done: Callable[[], None], failed: Callable[[str], None], who: str = "",
             held: Callable[[], bool] = lambda: True) -> None:
        """Publish ``copy``; ``done()`` once the broker confirms it, else ``failed(why)`` (at most one of
        them, once; perhaps before this returns). ``who``: the task, for the log. ``held()``: whether the
        original is still this worker's; a copy to be published again after a pause whose original is not
        (its channel closed: the broker gives it back, and its next delivery ends it) is dropped, and
        neither is called. Never raises."""
        problem = name_problem(copy.routing_key if copy.target is None else copy.target.name)
        if problem:
            _call(failed, f"cannot publish to {copy.where}: {problem}")
            return
        self._publish(_Sent(copy, done, failed, who, held))

    @property
    def waiting(self) -> int:
        """Copies published whose confirm has not come, and copies waiting to be written."""
        return len(self._pending) + len(self._held)

    def flush(self, timeout: float = FLUSH) -> None:
        """Wait (blocking) up to ``timeout`` s for the confirms still to come (the worker stops); what
        has none then fails."""
        deadline = time.monotonic() + timeout
        self._release()
        while self._pending and self._conn is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._lost(f"no confirm within {timeout:g} s while the worker stopped")
                break
            try:
                self._conn.connection.drain_events(timeout=min(left, 1.0))
            except socket.timeout:
                continue
            except Exception as exc:  # noqa: BLE001 - the connection is gone: the rest fails
                self._lost(_why(exc))
            self._release()

    def close(self) -> None:
        """Flush, then close the connection (the worker stops)."""
        self.flush()
        held, self._held = self._held, []
        for sent in held:  # not written: the original is put back
            _call(sent.failed, "the worker stopped before its copy was published")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop()

    # -- publishing ----------------------------------------------------------------------------

    def _publish(self, sent: _Sent) -> None:
        if self._renew:  # after a nack: on a new connection, once those written on this one are settled
            if self._pending:
                self._held.append(sent)
                return
            self._renew = False
            self._drop()
        # What the broker sent first: a connection it closed meanwhile (a restart, an operator, missed
        # heartbeats; the event loop's reader may not have been called yet, or was forgotten by a reset hub)
        # is found here, before anything is written into it, and the copy goes out on a new one.
        self._readable()
        try:
            channel = self._ready()
            prepare(channel, sent.copy)  # declarations: the only waits (once per target and connection)
        except Exception as exc:  # noqa: BLE001 - nothing of this copy was written
            why = f"the publish to {sent.copy.where} failed: {_why(exc)}"
            self._lost(why)  # a refused declaration closed the channel: what waits on it is unknown
            code = getattr(exc, "reply_code", None)
            self._later(sent, why, transient=not isinstance(exc, ChannelError) or code == NOT_FOUND)
            return
        seq = self._seq = self._seq + 1
        self._pending[seq] = sent
        copy_id = hdr.copy_id(sent.copy.headers)
        if copy_id is not None:
            self._copies[copy_id] = seq
        sent.at = time.monotonic()
        wire = channel.connection  # py-amqp counts the bytes it wrote (after each write)
        before = getattr(wire, "bytes_sent", None)
        try:
            write(channel, sent.copy)
        except Exception as exc:  # noqa: BLE001 - if written, it and every copy before it are unknown
            why = f"the publish to {sent.copy.where} failed: {_why(exc)}"
            if before is not None and getattr(wire, "bytes_sent", before) == before:  # nothing of it written
                self._pending.pop(seq, None)
                self._lost(why)
                self._later(sent, why)
                return
            self._lost(why)

    def _later(self, sent: _Sent, why: str, transient: bool = True) -> None:
        """The broker did not take ``sent``: published again after a pause while the patience lasts, the
        original unacked meanwhile; else it fails."""
        again = transient and time.monotonic() - sent.first + sent.pause <= PATIENCE and self.hub is not None
        log_refused(sent.who or "a task", why, sent.pause if again else None)
        if not again:
            _call(sent.failed, why)
            return
        pause, sent.pause = sent.pause, min(sent.pause * 2, LONGEST_PAUSE)
        self.hub.call_later(pause, self._publish_again, sent)

    def _publish_again(self, sent: _Sent) -> None:
        """A copy the broker did not take, after its pause: published again, unless its original has gone
        back to the broker meanwhile (a lost consumer connection): then its next delivery ends it, and a
        copy published here too would make the next attempt run twice."""
        try:
            held = sent.held()
        except Exception:  # noqa: BLE001 - unknown: published, as before this check
            held = True
        if not held:
            log.warning("rare_celery: %s: its original went back to its queue (the connection it came on was lost) "
                        "while the broker refused its copy for %s; that copy is not published", sent.who or "a task",
                        sent.copy.where)
            return
        self._publish(sent)

    def _ready(self) -> Any:
        """The channel, in confirm mode, on a connection of the pipeline's own (made on first use)."""
        if self._channel is not None:
            return self._channel
        conf = self.app.conf
        options = {**(conf.broker_transport_options or {}), "confirm_publish": False}  # confirms read here, not waited for
        conn = self.app.connection_for_write(transport_options=options, heartbeat=conf.broker_heartbeat or 0)
        try:
            conn.ensure_connection(max_retries=1, timeout=5)
            channel = conn.default_channel
            channel.confirm_select()
            channel.events["basic_ack"].add(self._acked)
            channel.events["basic_nack"].add(self._nacked)
            channel.events["basic_return"].add(self._returned)
        except Exception:
            conn.collect()
            raise
        self._conn, self._channel, self._seq = conn, channel, 0
        self._watch()
        return channel

    def _watch(self) -> None:
        if self.hub is None:
            return
        transport = self._conn.connection.transport
        transport.raise_on_initial_eintr = True  # nothing to read: socket.timeout, not a spin
        self._fd = self._conn.connection.sock.fileno()
        self.hub.add_reader(self._fd, self._readable)

    # -- the broker's answers --------------------------------------------------------------------

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while self._conn is conn:
                conn.connection.drain_events(timeout=0)
        except socket.timeout:
            return
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return
            self._lost(_why(exc))
        except ChannelError as exc:
            self._closed(exc)
        except Exception as exc:  # noqa: BLE001 - never into the event loop: the consumer would restart
            self._lost(_why(exc))

    def _closed(self, exc: ChannelError) -> None:
        """The broker closed the channel: a publish it refused (an exchange deleted under the worker:
        NOT_FOUND). Declarations are made at once, so the refused one is a copy still waiting; if it is the
        only one, it was not routed, and goes again on a new connection (which declares everything)."""
        why = _why(exc)
        if getattr(exc, "reply_code", None) != NOT_FOUND or len(self._pending) != 1:
            self._lost(why)
            return
        sent = self._pending.popitem()[1]
        self._copies.clear()
        self._drop()
        if sent.tries > 1:
            self._later(sent, f"the broker did not take the message for {sent.copy.where}: {why}")
            self._settled()
            return
        log.warning("rare_celery: %s was missing (%s); declaring it again", sent.copy.where, why)
        sent.tries += 1
        self._publish(sent)
        self._settled()

    def _taken(self, tag: int, multiple: bool) -> list[_Sent]:
        seqs = [s for s in self._pending if s <= tag] if multiple else ([tag] if tag in self._pending else [])
        out = []
        for seq in seqs:
            sent = self._pending.pop(seq)
            copy_id = hdr.copy_id(sent.copy.headers)
            if copy_id is not None and self._copies.get(copy_id) == seq:
                del self._copies[copy_id]
            out.append(sent)
        return out

    def _acked(self, delivery_tag: int, multiple: bool = False) -> None:
        for sent in self._taken(delivery_tag, multiple):
            if not sent.returned:
                _call(sent.done)
            elif sent.tries > 1:
                _call(sent.failed, f"no queue took the copy for {sent.copy.where} (returned twice)")
            else:  # someone deleted what it needs: declared again, published once more (from the loop, not here)
                log.warning("rare_celery: %s was missing; declaring it again", sent.copy.where)
                sent.tries, sent.returned, sent.at = sent.tries + 1, False, time.monotonic()
                self._again(sent)
        self._settled()

    def _again(self, sent: _Sent) -> None:
        def resend() -> None:
            if self._channel is not None:
                forget(self._channel)
            self._publish_again(sent)
        if self.hub is not None:
            self.hub.call_soon(resend)
        else:
            resend()

    def _nacked(self, delivery_tag: int, multiple: bool = False) -> None:
        self._renew = True  # see the module documentation: a channel a quorum queue blocked stays blocked
        for sent in self._taken(delivery_tag, multiple):  # not taken: it can be published again
            self._later(sent, f"the broker refused (nacked) the message for {sent.copy.where}")
        self._settled()

    def _settled(self) -> None:
        """After confirms: the copies held for a renewed connection go out once nothing else waits."""
        if self._held and not self._pending and self.hub is not None:
            self.hub.call_soon(self._release)  # from the loop, not inside the connection's reading

    def _release(self) -> None:
        """Publish the copies held for a renewed connection (held again while the old one has copies
        waiting; once renewed, all of them, whatever was published on the new one meanwhile), but those
        whose original went back to its queue meanwhile (see :meth:`_publish_again`)."""
        held, self._held = self._held, []
        for sent in held:
            self._publish_again(sent)

    def _returned(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        seq = self._copies.get(hdr.copy_id(getattr(message, "headers", None) or {}) or "")
        if seq is not None and seq in self._pending:
            self._pending[seq].returned = True  # its ack follows
        else:  # its ack would be taken for a copy that is somewhere
            self._lost(f"a returned message that is not one of the copies waiting ({routing_key!r})")

    # -- time and loss ------------------------------------------------------------------------------

    def _tick(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.heartbeat_check(rate=2)
        except Exception as exc:  # noqa: BLE001 - missed heartbeats: the connection is gone
            self._lost(_why(exc))
            return
        if self._pending:
            oldest = next(iter(self._pending.values()))
            if time.monotonic() - oldest.at > CONFIRM_DEADLINE:
                self._lost(f"no confirm in {CONFIRM_DEADLINE:g} s")

    def _lost(self, why: str) -> None:
        """The connection's answers cannot be trusted any more: drop it; every copy waiting on it fails."""
        pending = list(self._pending.values())
        self._pending.clear()
        self._copies.clear()
        self._drop()
        self._renew = False  # the next copy goes out on a new connection anyway
        self._settled()
        if pending:
            log.error("rare_celery: %d ending(s) not confirmed (%s): their messages are put back, not acked",
                      len(pending), why)
        for sent in pending:
            _call(sent.failed, f"{why} (the copy may be there or not: the message is kept, it may run twice)")

    def _drop(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is None:
            return
        fd, self._fd = self._fd, None
        if self.hub is not None and fd is not None:
            try:
                self.hub.remove_reader(fd)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        try:
            conn.collect()
        except Exception:  # noqa: BLE001, S110 - closing what is broken
            pass


def _call(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # one ending's trouble is not the others'
        log.exception("rare_celery: settling a handed ending failed")

