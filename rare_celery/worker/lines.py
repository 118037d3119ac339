"""The services' lines, from the worker's main process: wake what may start, and say when a service
starts and stops limiting.

An attempt that ends wakes the next one in its service's line (:func:`rare_celery.limits_io.wake_after`).
That is not enough alone: a process can die before it wakes the next, and an attempt can join the
line just after the last one running ended. So each worker's main process looks at the lines of the
services its tasks call, every second or so (:data:`EVERY`, jittered), and wakes as many as the
service's free slots and window places allow, but for the slots an ending woke an attempt for, whose
hint (:func:`rare_celery.topology.free_slots_queue`) is still there. Two wakes may be for the same free
place (two workers' looks, or a look and an ending): the attempt that finds it taken goes back to the
head of the line.

A service *starts limiting* for a worker when its lines hold attempts, and *stops* once they have been
empty for :data:`STOP_AFTER` seconds: the signals ``limit_started`` / ``limit_stopped`` and the events
``rare-limit-start`` / ``rare-limit-stop`` (sent by each worker that sees it; from a thread of the main
process).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from typing import Any

from celery import bootsteps

from .. import events, limits_io, signals
from ..exceptions import ConfigurationError
from ..inventory import breakers, rare_tasks
from ..topology import delay_kind, free_slots_queue, line_queue

log = logging.getLogger(__name__)
EVERY = 1.0  # seconds between looks at the lines (0.8-1.2: the workers do not all look at once)
STOP_AFTER = 5.0  # seconds a line stays empty before its service counts as no longer limiting


class Line:
    """One limited service as a worker sees it: its limits, the kinds of line its tasks use, and
    whether it is limiting now."""

    def __init__(self, service: str, settings: Any, kinds: set[str]) -> None:
        self.service, self.settings, self.kinds = service, settings, sorted(kinds)
        self.limiting = False
        self.empty_since: float | None = None

    def room(self, conn: Any) -> int:
        """How many more attempts this look may wake: the free slots that no woken attempt is on its way to
        (each ending leaves a hint, which the attempt it woke takes with the slot; a hint left there 2 s
        is gone, and its slot counts as free: the attempt woken for it was lost), and the free places
        in the window."""
        free: list[int] = []
        concurrency, rate = self.settings.concurrency, self.settings.rate
        if concurrency is not None:
            used = limits_io.in_flight(conn, self.service, concurrency)
            hints = limits_io.depth(conn, free_slots_queue(self.service, concurrency).name)
            if used is None or hints is None:
                return 0
            free.append(concurrency - used - hints)
        if rate is not None:
            taken = limits_io.in_window(conn, self.service, rate)
            if taken is None:
                return 0
            free.append(rate[0] - taken)
        return max(0, min(free)) if free else 0

    def look(self, conn: Any, now: float) -> tuple[str, int] | None:
        """Wake what may start; return ``("start", waiting)`` or ``("stop", 0)`` when that changed."""
        depths = {kind: limits_io.depth(conn, line_queue(self.service, kind).name) for kind in self.kinds}
        if None in depths.values():  # the broker could not say: the next look
            return None
        waiting = sum(n or 0 for n in depths.values())
        if waiting:
            room = self.room(conn)
            for kind in self.kinds:
                if room and depths[kind]:
                    room -= limits_io.wake(conn, self.service, kind, min(room, depths[kind] or 0))
            self.empty_since = None
            if not self.limiting:
                self.limiting = True
                return "start", waiting
            return None
        if self.limiting:
            self.empty_since = self.empty_since or now
            if now - self.empty_since >= STOP_AFTER:
                self.limiting, self.empty_since = False, None
                return "stop", 0
        return None


def lines_of(app: Any, queues: set[str] | None = None) -> list[Line]:
    """The limited services of ``app``'s rare tasks (those on ``queues``, if given), each with the kinds of
    line its tasks wait in."""
    kinds: dict[str, set[str]] = {}
    for info in rare_tasks(app):
        if queues is not None and info.queue not in queues:
            continue
        settings = getattr(info.task, "rare_breaker", None)
        if settings is not None and (settings.concurrency is not None or settings.rate is not None):
            kinds.setdefault(info.task.breaker, set()).add(delay_kind(app, info.queue))
    settings_of = breakers(app) if kinds else {}
    return [Line(name, settings_of[name], found) for name, found in sorted(kinds.items())]


class Waker(threading.Thread):
    """The thread that looks at the lines (see the module's docstring), on a connection of its own."""

    def __init__(self, app: Any, hostname: str, lines: list[Line], send_events: bool) -> None:
        super().__init__(name="rare-lines", daemon=True)
        self.app, self.hostname, self.lines, self.send_events = app, hostname, lines, send_events
        self.stopped = threading.Event()
        self.conn: Any = None

    def run(self) -> None:
        failing = False
        while not self.stopped.wait(EVERY * random.uniform(0.8, 1.2)):
            try:
                if self.conn is None:
                    self.conn = self.app.connection_for_write(heartbeat=0)
                    self.conn.ensure_connection(max_retries=1, timeout=5)
                for line in self.lines:
                    change = line.look(self.conn, time.time())
                    if change is not None:
                        self.report(line.service, *change)
                failing = False
            except Exception as exc:  # noqa: BLE001 - the next look tries again on a new connection
                if not failing:
                    log.warning("rare_celery: could not look at the services' lines: %s",
                                f"{type(exc).__name__}: {exc}")
                failing = True
                self.drop()
        self.drop()

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def report(self, service: str, change: str, waiting: int) -> None:
        """Log, signal and send the event of a service that started or stopped limiting."""
        if change == "start":
            log.info("rare_celery: service %s is limiting: %d attempt(s) wait in its line", service, waiting)
            signal, kind, fields = signals.limit_started, events.LIMIT_START, {"service": service, "waiting": waiting}
        else:
            log.info("rare_celery: service %s is no longer limiting", service)
            signal, kind, fields = signals.limit_stopped, events.LIMIT_STOP, {"service": service}
        try:
            signal.send(sender=service, **fields)
        except Exception as exc:  # noqa: BLE001 - a report
            log.warning("rare_celery: could not send %s: %r", signal.name, exc)
        if self.send_events:
            try:
                with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                    dispatcher.send(kind, uuid=None, name=None, **fields)
            except Exception as exc:  # noqa: BLE001 - a report
                log.warning("rare_celery: could not send the %s event: %r", kind, exc)


class LinesStep(bootsteps.StartStopStep):
    """Starts the worker's :class:`Waker` when its tasks call a service with limits."""

    name = "rare_celery.lines"
    requires = ("celery.worker.consumer:Connection", "celery.worker.consumer.tasks:Tasks")

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        try:
            self.lines = lines_of(c.app)
        except ConfigurationError as exc:
            raise SystemExit(f"{exc}") from None
        self.waker: Waker | None = None

    def start(self, c: Any) -> None:
        if not self.lines or (self.waker is not None and self.waker.is_alive()):
            return
        consumed = {q.name for q in c.task_consumer.queues} if c.task_consumer is not None else None
        lines = lines_of(c.app, consumed)  # the services of the tasks this worker runs
        if lines:
            self.waker = Waker(c.app, c.hostname, lines, bool(c.app.conf.worker_send_task_events))
            self.waker.start()

    def stop(self, c: Any) -> None:
        pass  # a reconnect of the consumer: the waker has its own connection and goes on

    def shutdown(self, c: Any) -> None:
        if self.waker is not None:
            self.waker.stopped.set()
            self.waker.join(5)
