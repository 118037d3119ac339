"""Circuit breakers on the broker: notes, the last state, the probe lock, and the worker's board.

* **Notes** (:func:`announce`) are JSON messages on the topic exchange ``rare.breakers``: an
  attempt's outcome (``<name>.count``) or a change of state (``<name>.state``). Every worker's main
  process hears them all (:class:`Watch`) and applies them (:func:`rare_celery.breaker.apply`).
* **The last state**: ``rare.breaker.<name>`` keeps the newest state note (``x-max-length: 1``). A
  worker that starts, a probe that just took the lock and the operator tools read it
  (:func:`read_state`: ``basic.get``, then put back).
* **The probe lock** (:func:`try_probe`): the exclusive queue ``rare.breaker.<name>.probe``. The
  broker lets one connection declare it; any other gets ``RESOURCE_LOCKED``. It is held by a
  connection of the process running the probe and goes with it: when the probe ends, and when that
  process dies. No lock server: the broker already is one.
* **The board**: a worker's main process writes the states it knows to a file that its pool
  processes read before each attempt of a breaker's task (one ``stat`` when nothing changed). The
  file is in a private directory made for the worker (``mkdtemp``), not at a path anyone can guess.
* **Clocks**: every note is validated and read on the receiving worker's clock
  (:func:`rare_celery.breaker.localize`): open periods are durations, not the sender's times.

Notes are reports, never the message's safety: publishing one that fails is logged, and the
attempt's message ends as it would without a breaker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from typing import Any

from amqp.exceptions import NotFound, ResourceLocked

from . import breaker as br
from . import context, declare
from .publish import producer_for
from .topology import (
    BREAKER_EXCHANGE,
    COUNT_KEY,
    STATE_KEY,
    breaker_key,
    breaker_state_queue,
    own_kind,
    probe_lock_name,
)

log = logging.getLogger(__name__)
NOTE_TIMEOUT = 5.0  # seconds a note's publish may take
CONTENT = {"content_type": "application/json", "content_encoding": "utf-8"}


def announce(app: Any, note: dict[str, Any]) -> bool:
    """Publish ``note`` (confirmed; a change of state declares the state queue first). Never raises."""
    change = note["kind"] in br.CHANGES
    key = breaker_key(note["breaker"], STATE_KEY if change else COUNT_KEY)
    try:
        with producer_for(app, NOTE_TIMEOUT) as producer:
            declare.once(producer.channel, BREAKER_EXCHANGE)
            if change:
                declare.once(producer.channel, breaker_state_queue(note["breaker"], own_kind(app)))
            producer.publish(json.dumps(note), exchange=BREAKER_EXCHANGE.name, routing_key=key,
                             delivery_mode=2 if change else 1, retry=False, timeout=NOTE_TIMEOUT, **CONTENT)
        return True
    except Exception as exc:  # noqa: BLE001 - a note is a report: the message's ending does not depend on it
        log.warning("rare_celery: could not announce breaker %s %s: %s", note["breaker"], note["kind"],
                    f"{type(exc).__name__}: {exc}")
        return False


def last_note(connection: Any, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """The last state note of breaker ``name`` as the broker keeps it, read with ``basic.get`` and put
    back at once: ``(note, None)``; ``(None, None)`` when the breaker never changed (its queue does
    not exist: nothing is created); ``(None, why)`` when the message there is not a state note, or
    another reader held it each time it was looked for (three times, 20 ms apart)."""
    channel = connection.channel()
    try:
        queue = breaker_state_queue(name).name
        try:
            ready = channel.queue_declare(queue=queue, passive=True).message_count
        except NotFound:
            return None, None
        for tries in range(3):
            message = channel.basic_get(queue=queue, no_ack=False)
            if message is not None:
                channel.basic_reject(message.delivery_tag, requeue=True)
                return state_note(message.body)
            if tries < 2:
                time.sleep(0.02)
        return None, ("another client held the state note" if ready else None)
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def state_note(body: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A state queue's message body as ``(note, None)``, or ``(None, why)`` when it is not a state note."""
    try:
        note = json.loads(body)
    except (TypeError, ValueError, UnicodeDecodeError):
        note = None
    problem = br.note_problem(note)
    if problem is None and note["kind"] not in br.CHANGES:
        problem = f"a {note['kind']} note"
    return (None, f"the state note is not one: {problem}") if problem else (note, None)


def read_state(connection: Any, name: str) -> br.State | None:
    """Breaker ``name``'s last state (:func:`last_note`); ``None`` when there is none to read (why is logged)."""
    note, problem = last_note(connection, name)
    if problem:
        log.warning("rare_celery: breaker %s: %s", name, problem)
    return br.from_note(br.localize(note, time.time())) if note is not None else None


class ProbeLock:
    """The probe lock of one breaker, held until :meth:`release` (or until its process dies)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def release(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()


def try_probe(app: Any, name: str) -> tuple[ProbeLock | None, br.State | None]:
    """Take breaker ``name``'s probe lock on a connection of its own: ``(lock, last state)`` when this
    process is the probe now, ``(None, None)`` when another holds it (or the broker cannot be
    asked: then no probe runs from here)."""
    connection = app.connection_for_write()
    try:
        connection.ensure_connection(max_retries=1, timeout=NOTE_TIMEOUT)
        channel = connection.channel()
        channel.queue_declare(queue=probe_lock_name(name), durable=False, exclusive=True, auto_delete=True,
                              arguments={"x-queue-type": "classic"})
        state = read_state(connection, name)
    except ResourceLocked:
        with contextlib.suppress(Exception):
            connection.release()
        return None, None
    except Exception as exc:  # noqa: BLE001 - no probe from here; the attempt waits and looks again
        log.warning("rare_celery: could not take the probe lock of breaker %s: %s", name, exc)
        with contextlib.suppress(Exception):
            connection.release()
        return None, None
    return ProbeLock(connection), state


# -- the board: the main process's view, for its pool processes -------------------------------------

class Board:
    """The breaker states a worker's main process knows, in a file its pool processes read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[Any, ...] | None = None
        self._states: dict[str, br.State] = {}

    @classmethod
    def for_this_worker(cls) -> Board:
        """A board in a directory of its own, made for this worker (``tempfile.mkdtemp``: a name nobody
        can guess or take first, mode 0700): only this worker's processes know it (the pool processes
        inherit the path), whoever else shares ``/tmp`` or the pid."""
        return cls(os.path.join(tempfile.mkdtemp(prefix="rare-celery-breakers-"), "board.json"))

    def write(self, states: dict[str, br.State]) -> None:
        data = json.dumps({name: {**asdict(s), "failures": list(s.failures)} for name, s in states.items()})
        part = f"{self.path}.{os.getpid()}.part"
        with open(part, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(part, self.path)

    def read(self) -> dict[str, br.State]:
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                with open(self.path, encoding="utf-8") as f:
                    raw = json.load(f)
                self._states = {name: br.State(**{**s, "failures": tuple(s["failures"])}) for name, s in raw.items()}
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("rare_celery: could not read the breakers' board %s: %s", self.path, exc)
                return self._states
            self._seen = seen
        return self._states

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.path))  # its own directory; left alone if anything else is in it


def board_state(app: Any, name: str) -> br.State | None:
    """Breaker ``name`` as this worker knows it (``None``: unknown, or no worker board here); the
    board is the worker context's (:mod:`rare_celery.context`), inherited by its pool processes."""
    ctx = context.of(app)
    board = ctx.board if ctx is not None else None
    return board.read().get(name) if board is not None else None


def lost_attempt(task: Any, task_id: str, by: str, *, timed_out: bool) -> None:
    """From the worker's main process: an attempt of ``task`` (a breaker's) ended with its pool process
    (killed, out of memory) or by a hard time limit. The probe's own loss opens the breaker again
    (for longer); a hard time limit of another attempt counts as a failure (a service that hangs)."""
    name, now = task.breaker, time.time()
    state = board_state(task.app, name) or br.State(name)
    if state.phase == br.PROBING and state.task == task_id:
        announce(task.app, br.after_probe(state, task.rare_breaker, failed=True, now=now).as_note(by, task_id))
    elif timed_out and state.phase == br.CLOSED:
        announce(task.app, br.count_note(name, br.FAILURE, state.gen, now, by, task_id))


# -- the main process: hearing notes ---------------------------------------------------------------

class Watch:
    """The breakers a worker's main process keeps: every note heard is applied, the board rewritten
    when a state changed. ``candidates``: when this worker last let an attempt go to its pool to try
    for the probe lock (one at a time, see :meth:`rare_celery.worker.RareConsumerStep`)."""

    def __init__(self, settings: dict[str, br.Settings], board: Board) -> None:
        self.settings, self.board = settings, board
        self.states = {name: br.State(name) for name in settings}
        self.candidates: dict[str, float] = {}
        board.write(self.states)

    def load(self, connection: Any) -> None:
        """Learn the last state of each breaker from the broker (a worker that starts late, or reconnects)."""
        for name in sorted(self.settings):
            try:
                state = read_state(connection, name)
            except Exception as exc:  # noqa: BLE001 - the notes that follow tell it soon enough
                log.warning("rare_celery: could not read the last state of breaker %s: %s", name, exc)
                continue
            if state is not None:
                self.hear(state.as_note(state.probe or "", state.task))

    def hear(self, note: Any) -> br.Change | None:  # a decoded message body, checked by note_problem
        problem = br.note_problem(note)
        if problem:
            log.warning("rare_celery: ignored a breaker note that is not one (%s)", problem)
            return None
        settings = self.settings.get(note["breaker"])
        if settings is None:
            return None
        note = br.localize(note, time.time())  # on this worker's clock (see rare_celery.breaker)
        old = self.states[note["breaker"]]
        new, change = br.apply(old, note, settings)
        if new != old:
            self.states[note["breaker"]] = new
            if change is not None:
                self.candidates.pop(note["breaker"], None)
            try:
                self.board.write(self.states)
            except OSError as exc:
                log.error("rare_celery: could not write the breakers' board %s: %s", self.board.path, exc)
        return change
