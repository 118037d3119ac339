"""The worker's context: what its bootsteps set up once, handed to the code that needs it.

A worker's main process makes one :class:`WorkerContext` per app when its consumer bootstep starts
(:func:`start`); everything else asks for it (:func:`of`) instead of modules setting each other's
globals. Pool processes forked from the main process inherit it: they read the breakers' board
from it, and know from :meth:`WorkerContext.in_main` that the main process's own publishing
connection is not theirs. Outside a worker (a publisher, the operator tools) there is none.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

MAX_REFUSALS = 10_000  # put-backs the broker refused, remembered per worker (oldest forgotten first)


class WorkerContext:
    """One worker's shared state, made by its bootsteps.

    * ``timer``: the consumer's timer (pauses without blocking the event loop), once the consumer runs;
    * ``board``: the breakers' board the main process writes and pool processes read, or ``None``;
    * ``producer``, ``lock``: the main process's own producer (made on first use) and its lock;
    * ``pipeline``: the main process's publisher of the endings pool processes hand it
      (:class:`rare_celery.pipeline.Pipeline`), when the worker runs an event loop;
    * ``refusals``: per (queue, task id, attempt), the put-backs the broker refused in this process;
    * ``waiting``: the requests of the main process handed to the pool and not started yet.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pid = os.getpid()
        self.timer: Any = None
        self.board: Any = None
        self.producer: Any = None
        self.pipeline: Any = None
        self.lock = threading.Lock()
        self.refusals: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self.waiting: dict[int, Any] = {}

    def in_main(self) -> bool:
        """Whether this is the worker's main process (not a pool process forked from it)."""
        return os.getpid() == self.pid

    def refused(self, key: tuple[Any, ...]) -> int:
        return self.refusals.get(key, 0)

    def note_refusal(self, key: tuple[Any, ...], count: int) -> None:
        self.refusals[key] = count
        self.refusals.move_to_end(key)
        while len(self.refusals) > MAX_REFUSALS:
            self.refusals.popitem(last=False)

    def forget_refusal(self, key: tuple[Any, ...]) -> None:
        self.refusals.pop(key, None)


_WORKERS: dict[int, WorkerContext] = {}  # id(app) -> its worker's context


def start(app: Any) -> WorkerContext:
    """This process is ``app``'s worker's main process: its context, made once."""
    ctx = _WORKERS.get(id(app))
    if ctx is None or ctx.app is not app or not ctx.in_main():
        ctx = _WORKERS[id(app)] = WorkerContext(app)
    return ctx


def of(app: Any) -> WorkerContext | None:
    """``app``'s worker context in this process (inherited by pool processes), or ``None`` outside a worker."""
    ctx = _WORKERS.get(id(app))
    return ctx if ctx is not None and ctx.app is app else None


def stop(app: Any) -> None:
    """Forget ``app``'s worker context (tests that play a worker's main process)."""
    _WORKERS.pop(id(app), None)
