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

Neither is the message's safety: an attempt whose limit could not be asked (the broker refused
something else, the connection failed) waits and asks again, it does not run unlimited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from typing import Any

from amqp.exceptions import MessageNacked, ResourceLocked

from . import declare
from .publish import producer_for
from .topology import rate_window_queue, slot_lock_name

log = logging.getLogger(__name__)
TIMEOUT = 5.0  # seconds a window publish or a slot declare may take


def take_rate(app: Any, service: str, rate: tuple[int, float]) -> bool:
    """One attempt's place in ``service``'s rate window: True when the broker confirmed it (the attempt
    may start now), False when the window is full or the broker could not be asked."""
    queue = rate_window_queue(service, *rate)
    try:
        with producer_for(app, TIMEOUT) as producer:
            declare.once(producer.channel, queue)
            producer.publish(b"", exchange="", routing_key=queue.name, delivery_mode=2, retry=False,
                             mandatory=True, timeout=TIMEOUT)
        return True
    except MessageNacked:
        return False
    except Exception as exc:  # noqa: BLE001 - unknown: the attempt waits rather than run unlimited
        log.warning("rare_celery: service %s: could not ask for a place in its rate window: %s", service,
                    f"{type(exc).__name__}: {exc}")
        return False


class Slot:
    """One of a service's slots for attempts in flight, held until :meth:`release` (or until the
    process holding it dies: its connection closes, and the broker deletes the queue)."""

    def __init__(self, name: str) -> None:
        self.name: str | None = name

    def release(self) -> None:
        name, self.name = self.name, None
        if name is None:
            return
        try:
            with _holder.lock:
                channel = _holder.connection().channel()
                try:
                    channel.queue_delete(name)
                finally:
                    channel.close()
        except Exception as exc:  # noqa: BLE001 - not let go: the connection is dropped, which lets go of all
            log.warning("rare_celery: could not let go of slot %s (%s); dropping its connection", name,
                        f"{type(exc).__name__}: {exc}")
            _holder.drop()


class _Holder:
    """This process's connection that holds its slots (one per process: a forked pool process makes
    its own), made when first needed and made again after a failure; used by one thread at a time
    (``lock``: a threads or gevent pool runs several attempts in one process)."""

    def __init__(self) -> None:
        self.app: Any = None
        self.conn: Any = None
        self.pid = 0
        self.lock = threading.RLock()

    def connection(self, app: Any = None) -> Any:
        if self.conn is not None and self.pid != os.getpid():  # inherited through a fork: never used here
            self.conn = None
        if self.conn is None:
            self.app = app or self.app
            # no heartbeats: nothing services them while an attempt runs, and the broker would close the
            # connection (freeing the slot) under a long one; a process that dies closes its socket at once
            conn = self.app.connection_for_write(heartbeat=0)
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT)
            self.conn, self.pid = conn, os.getpid()
        return self.conn

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and self.pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.release()


_holder = _Holder()


def take_slot(app: Any, service: str, slots: int) -> Slot | None:
    """A free slot of ``service``'s ``slots``, on this process's holding connection; ``None`` when all
    are held (or the broker could not be asked)."""
    for tries in (1, 2):  # a kept connection the broker closed meanwhile: once more on a new one
        try:
            with _holder.lock:
                return _take(_holder.connection(app), service, slots)
        except Exception as exc:  # noqa: BLE001 - unknown: the attempt waits rather than run unlimited
            _holder.drop()
            if tries == 2:
                log.warning("rare_celery: service %s: could not ask for a slot: %s", service,
                            f"{type(exc).__name__}: {exc}")
    return None


def _take(connection: Any, service: str, slots: int) -> Slot | None:
    """A free slot, tried in a random order on ``connection``; ``None`` when all are held."""
    for slot in random.sample(range(slots), slots):
        name = slot_lock_name(service, slot)
        channel = connection.channel()
        try:
            channel.queue_declare(queue=name, durable=False, exclusive=True, auto_delete=False,
                                  arguments={"x-queue-type": "classic"})
        except ResourceLocked:  # held by another attempt: the broker closed this channel
            continue
        with contextlib.suppress(Exception):
            channel.close()
        return Slot(name)
    return None


def wait_for_rate(rate: tuple[int, float], now: float) -> float:
    """When an attempt refused by a full window asks again: within one window's share of an
    attempt (``window / count``) and a spread of up to one window, so that the waiting ones do not
    all come back at once."""
    count, window = rate
    return now + max(0.05, window / count) + random.uniform(0, window)


def wait_for_slot(now: float) -> float:
    """When an attempt that found every slot held asks again: 0.5-1.5 s later."""
    return now + random.uniform(0.5, 1.5)
