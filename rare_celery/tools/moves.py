"""Requeue and purge as two reads: a *plan* (which messages, where to), then a *take* of exactly those.

Shared by ``rare-celery requeue-bugs`` / ``purge-bugs`` and the web console. The first read counts
the matching messages by content (:func:`rare_celery.tools.records.fingerprint`); what is shown to the
person who confirms is that count. The second read (:func:`rare_celery.tools.bugs.take`) removes only
messages whose content was counted, at most as many of each as were counted: bugs that workers add
in between are behind the ones read and are not touched, even if they match. Each moved message is
republished with publisher confirms before it is acked.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast

from ..inventory import rare_tasks
from ..topology import delay_kind
from . import bugs, records


@dataclass
class Plan:
    """What a first read found: the chosen messages by content, and where each goes."""

    chosen: Counter[Any]
    targets: Counter[Any]
    without_target: int = 0

    @property
    def count(self) -> int:
        return sum(self.chosen.values())

    def take(self, held: bugs.Held) -> bool:
        if self.chosen[held.fingerprint] <= 0:
            return False
        self.chosen[held.fingerprint] -= 1
        return True


def plan(conn: Any, queue: str, wanted: Callable[[bugs.Held], bool], to: str | None = None, moving: bool = True,
         on_row: Callable[[records.Record], None] | None = None,
         browse: Callable[[Any, str], AbstractContextManager[Iterator[bugs.Held]]] = bugs.browse) -> Plan:
    """First read of ``queue``: which messages are ``wanted``, and (``moving``) where each would go.

    ``browse(conn, queue)`` reads it (:func:`rare_celery.tools.bugs.browse`, or another reader with the same
    guarantees: nothing acked, every message put back in place when the read ends)."""
    found = Plan(Counter(), Counter())
    with browse(conn, queue) as messages:
        for held in messages:
            if not wanted(held):
                continue
            target = (to or held.record.queue) if moving else queue
            if target is None:
                found.without_target += 1
                continue
            found.chosen[held.fingerprint] += 1
            found.targets[target] += 1
            if on_row is not None:
                on_row(held.record)
    return found


@dataclass(frozen=True)
class Edit:
    """New arguments for the message a requeue moves (``None``: unchanged), and who made them."""

    args: list[Any] | None
    kwargs: dict[str, Any] | None
    by: str


def lines_of(app: Any) -> dict[str, tuple[str, Callable[[str], str]]]:
    """Task name -> (its service, the kind of line for a work queue), for the rare tasks of ``app`` whose
    service has limits (``service_rate``, ``service_concurrency``): a requeue of theirs goes to the
    service's line, and out of it at the service's pace, not at once."""
    if app is None:
        return {}
    out = {}
    for info in rare_tasks(app):
        settings = getattr(info.task, "rare_breaker", None)
        if settings is not None and (settings.rate is not None or settings.concurrency is not None):
            out[info.name] = (info.task.breaker, lambda queue: delay_kind(app, queue))
    return out


def requeue_sender(to: str | None, reset: bool, now: float, edit: Edit | None = None,
                   lines: dict[str, tuple[str, Callable[[str], str]]] | None = None,
                   ) -> Callable[[bugs.Held, bugs.Publisher], None]:
    """The ``send`` of :func:`rare_celery.tools.bugs.take` for a requeue: back to the origin queue (or ``to``),
    with the headers :func:`rare_celery.tools.records.requeue_headers` gives; with ``edit``, with the new
    arguments (:func:`rare_celery.tools.records.edited`). A task of a service with limits (``lines``,
    :func:`lines_of`) goes through the service's line."""

    def send(held: bugs.Held, publisher: bugs.Publisher) -> None:
        target = to or held.record.queue
        service = (lines or {}).get(held.record.task or "")
        line = (service[0], service[1](cast(str, target))) if service is not None else None
        headers = records.requeue_headers(bugs.headers_of(held), reset=reset, now=now, queue=target if to else None)
        body = None
        if edit is not None:
            try:
                body, headers = records.edited(bytes(held.message.body), held.message.properties, headers, edit.args,
                                               edit.kwargs, edit.by, now)
            except ValueError as exc:
                raise bugs.MoveFailed(f"{held.record.id}: {exc}") from None
        publisher.send(held.message, cast(str, target), headers, body, line)  # plan() chose only those with a target

    return send


def missing_targets(conn: Any, found: Plan) -> list[str]:
    """The queues ``found`` would send messages to that do not exist."""
    return [target for target in found.targets if bugs.depth(conn, target) is None]


RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def rate_text(per_second: float) -> str:
    """``50/s``, ``100/m``, ``1000/h``: a rate as :meth:`Pace.parse` reads it."""
    for unit in ("s", "m", "h"):  # the first unit that gives a whole number
        n = per_second * RATE_UNITS[unit]
        if n >= 1 and abs(n - round(n)) < 1e-6:
            return f"{round(n)}/{unit}"
    unit = "s" if per_second >= 1 else "m" if per_second * 60 >= 1 else "h"
    return f"{per_second * RATE_UNITS[unit]:.6g}/{unit}"


class Pace:
    """At most ``per_second`` moves a second, evened out (``--rate``; a task whose service has limits goes
    through the service's line anyway, see :func:`lines_of`). Call it after each move: it waits until the next
    one is due, and keeps the connection alive meanwhile (``conn.heartbeat_check``)."""

    PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*")
    TICK = 5.0  # seconds slept at most between heartbeat checks

    def __init__(self, per_second: float, conn: Any = None) -> None:
        self.gap, self.conn = 1.0 / per_second, conn
        self.next = time.monotonic()

    @classmethod
    def parse(cls, text: str) -> float:
        """``"50/s"``, ``"100/m"``, ``"1000/h"`` -> moves a second; :class:`ValueError` says what is wrong."""
        match = cls.PATTERN.fullmatch(text or "")
        if not match or float(match.group(1)) <= 0:
            raise ValueError(f"a rate is a number of messages per s, m or h, like 50/s or 1000/h (not {text!r})")
        per_second = float(match.group(1)) / RATE_UNITS[match.group(2)]
        if per_second < 1 / 3600:
            raise ValueError(f"{text!r} is slower than 1 message an hour")
        return per_second

    def __call__(self, *_: Any) -> None:
        self.next += self.gap
        while (left := self.next - time.monotonic()) > 0:
            time.sleep(min(left, self.TICK))
            if self.conn is not None and left > self.TICK:
                self.conn.heartbeat_check()
        self.next = max(self.next, time.monotonic())  # a slow move does not earn a burst after it
