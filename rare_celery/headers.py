"""The ``x-rare-*`` message headers: what a message carries about its attempts, read and written.

rare_celery never relies on RabbitMQ's ``x-death``; every value here is written by rare_celery,
bounded in size (however many attempts a task makes) and validated when read, never evaluated.

=====================  ==========================================================================
header                 meaning
=====================  ==========================================================================
``x-rare-attempt``     number of the attempt this delivery is (1 = first run)
``x-rare-first-at``    first publish, seconds since the epoch (UTC)
``x-rare-deadline``    end of the shelf life, seconds since the epoch; absent: none
``x-rare-due``         earliest time the message may run (the worker re-delays it if early)
``x-rare-queue``       work queue the message belongs to (where it came from; routing never trusts it)
``x-rare-deliveries``  deliveries of this attempt that ended without a next place (a crash, a lost
                       connection, a copy that could not be published), counted by the worker
``x-rare-returned``    why the last such delivery ended so
``x-rare-copy``        an id of this copy of the message: new for every copy published as new work
                       (the first publish, a retry, a wait, a hop, a bug-queue entry), the same
                       after a put-back; a success is recorded by it, never by the task id
``x-rare-requeued``    ``true``: put back because the task raised ``Reject(requeue=True)``; the next
                       run sees ``delivery_info["redelivered"]`` as with Celery, and no loss is counted
``x-rare-exception``   last error: exception type (``module.Name``)
``x-rare-error``       last error: message, at most 1,000 characters
``x-rare-traceback``   last error: traceback, its last 4,000 characters
``x-rare-reason``      bug queue only: why it is there (exhausted, expired, bug, ...)
``x-rare-attempts``    bug queue only: attempts made
``x-rare-failed-at``   bug queue only: when it was routed there
``x-rare-task``        bug queue only: task name
``x-rare-edits``       the edits an operator made to its arguments before a requeue (who, when,
                       the arguments before), oldest first; it travels with the message like the hops
=====================  ==========================================================================
"""

from __future__ import annotations

import json
import linecache
import math
import time
import traceback as tb
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from .durations import EPOCH_MAX, MAX_DELAY

PREFIX = "x-rare-"
MAX_ERROR = 1000
MAX_TRACEBACK = 4000
TRACEBACK_HEAD = "Traceback (most recent call last):\n"  # as Python writes it: tools (Flower, Sentry) look for it
FRAMES_LEFT_OUT = "  ...\n"
MAX_ATTEMPT = 1_000_000
HEADER_BUDGET = 64 * 1024  # the broker's frame is 128 KB; headers of a republish stay under half
MAX_DEPTH = 32  # lists and tables in headers nest at most this deep (rare_celery's own: 2)
MAX_SKEW = 3600.0  # a first-at this far ahead of the worker's clock is nonsense, not clock skew
# Every x-rare-* key, named once (the table above says what each means).
ATTEMPT, FIRST_AT, DEADLINE, DUE, QUEUE = (PREFIX + k for k in ("attempt", "first-at", "deadline", "due", "queue"))
DELIVERIES, RETURNED, REQUEUED = PREFIX + "deliveries", PREFIX + "returned", PREFIX + "requeued"
COPY = PREFIX + "copy"
HOPS = PREFIX + "hops"  # the hop history, see rare_celery.hops
WOKEN = PREFIX + "woken"  # the service line a message was woken from (rare_celery.limits_io.wake)
# a line copy sent to the head of its line (rare_celery.publish.to_line) has a high priority; this keeps its own
# (0: none), which every copy made of it gets back (rare_celery.message.own_priority)
OWN_PRIORITY = PREFIX + "own-priority"
EDITS = PREFIX + "edits"  # an operator's edits of the arguments, see rare_celery.tools.records.edited
EXCEPTION, ERROR, TRACEBACK = PREFIX + "exception", PREFIX + "error", PREFIX + "traceback"
REASON, ATTEMPTS, FAILED_AT, TASK = (PREFIX + k for k in ("reason", "attempts", "failed-at", "task"))
LAST_ERROR = (EXCEPTION, ERROR, TRACEBACK)
BUG_ONLY = (REASON, ATTEMPTS, FAILED_AT, TASK)  # written when a message goes to a bug queue
PER_DELIVERY = (DELIVERIES, RETURNED, REQUEUED)  # what one delivery's worker wrote: a requeue starts them over
DEATH = ("x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
         "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")
# The broker's bookkeeping, never part of a copy; and kombu's "compression": a copy's body is the
# decompressed one.
BROKER_KEYS = frozenset(("x-delivery-count", "BCC", "compression", *DEATH))


class HeaderError(ValueError):
    """A message carries an ``x-rare-*`` header rare_celery did not write (names it and its value)."""


@dataclass(frozen=True)
class Attempt:
    """What a message says about itself. ``first_at`` is ``now`` for a message without headers."""

    number: int
    first_at: float
    deadline: float | None = None
    due: float | None = None
    queue: str | None = None


def _number(headers: Mapping[str, Any], key: str, lo: float, hi: float, integer: bool = False) -> Any:
    value = headers.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    elif ok:
        ok = isinstance(value, int)
    if not ok or not lo <= value <= hi:
        raise HeaderError(f"header {key} has an invalid value {_clip(repr(value), 80)}")
    return value


def read(headers: Mapping[str, Any] | None, now: float | None = None) -> Attempt:
    """Read the attempt state from a message's headers; raise :class:`HeaderError` on nonsense."""
    headers = headers or {}
    now = time.time() if now is None else now
    queue = headers.get(QUEUE)
    if queue is not None and (not isinstance(queue, str) or not 0 < len(queue) <= 255):
        raise HeaderError(f"header {QUEUE} has an invalid value {_clip(repr(queue), 80)}")
    first_at = _number(headers, FIRST_AT, 0, now + MAX_SKEW)
    deadline = _number(headers, DEADLINE, 0, EPOCH_MAX)
    due = _number(headers, DUE, 0, now + MAX_DELAY + MAX_SKEW)
    if due is not None and deadline is not None and due > deadline:
        raise HeaderError(f"header {DUE} ({due}) is after {DEADLINE} ({deadline}): the message could never run")
    return Attempt(
        number=_number(headers, ATTEMPT, 1, MAX_ATTEMPT, integer=True) or 1,
        first_at=now if first_at is None else float(first_at),
        deadline=deadline,
        due=due,
        queue=queue,
    )


def deliveries(headers: Mapping[str, Any] | None) -> int:
    """``x-rare-deliveries`` of a message (0 when absent or not a small whole number)."""
    value = (headers or {}).get(DELIVERIES) if isinstance(headers, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ATTEMPT else 0


def new_copy() -> dict[str, Any]:
    """The ``x-rare-copy`` header of a copy published as new work (a fresh id)."""
    return {COPY: uuid.uuid4().hex}


def copy_id(headers: Mapping[str, Any] | None) -> str | None:
    """A message's ``x-rare-copy`` (``None`` when it has none, or not one rare_celery wrote)."""
    value = (headers or {}).get(COPY) if isinstance(headers, Mapping) else None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def write(attempt: Attempt) -> dict[str, Any]:
    """Headers that carry ``attempt`` on the next publish."""
    out: dict[str, Any] = {ATTEMPT: attempt.number, FIRST_AT: attempt.first_at}
    for key, value in ((DEADLINE, attempt.deadline), (DUE, attempt.due), (QUEUE, attempt.queue)):
        if value is not None:
            out[key] = value
    return out


def error(exc: BaseException | None) -> dict[str, Any]:
    """The last error as bounded headers: type, message and the tail of the traceback."""
    if exc is None:
        return {}
    kind = type(exc)
    name = _clip(f"{kind.__module__}.{kind.__qualname__}", 200)
    message = _clip(str(exc), MAX_ERROR)
    last = f"{name}: {message}\n"
    frames = _frames(exc.__traceback__)
    room = MAX_TRACEBACK - len(TRACEBACK_HEAD) - min(len(last), MAX_TRACEBACK // 2)
    if len(frames) > room:  # the innermost frames, each whole, after a mark that some are left out
        cut = frames[-(room - len(FRAMES_LEFT_OUT)):]
        start = cut.find('\n  File "') + 1
        frames = FRAMES_LEFT_OUT + cut[start:]
    return {EXCEPTION: name, ERROR: message, TRACEBACK: (TRACEBACK_HEAD + frames + last)[:MAX_TRACEBACK]}


def _frames(trace: TracebackType | None, keep: int = 100) -> str:
    """The innermost ``keep`` frames of ``trace`` as :func:`traceback.format_tb` writes them, without
    its per-frame work that a header does not need (the source file's ``stat`` and, on Python
    3.11+, parsing each line for the ``^^^`` markers): a retry formats one traceback."""
    out = []
    for frame, lineno in deque(tb.walk_tb(trace), maxlen=keep):
        code = frame.f_code
        line = linecache.getline(code.co_filename, lineno, frame.f_globals).strip()
        out.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}\n'
                   + (f"    {line}\n" if line else ""))
    return "".join(out)


def bug(reason: str, attempts: int, task: str, now: float | None = None) -> dict[str, Any]:
    """The headers a message gets when it is routed to the bug queue."""
    return {REASON: reason, ATTEMPTS: attempts, FAILED_AT: time.time() if now is None else now,
            TASK: _clip(task or "", 255)}


def fit(headers: dict[str, Any], budget: int = HEADER_BUDGET) -> dict[str, Any]:
    """``headers`` cut down to about ``budget`` bytes, so a republish never exceeds the broker's
    frame size (128 KB) because of what was added to it: first the last error's traceback and
    message, then the largest values, each replaced by a note saying how big it was."""
    if _fits(headers, budget):
        return headers
    out = {k: (f"<dropped by rare_celery: nested deeper than {MAX_DEPTH}>" if too_deep(v, MAX_DEPTH - 1) else v)
           for k, v in headers.items()}
    out.pop(TRACEBACK, None)
    if ERROR in out:
        out[ERROR] = _clip(str(out[ERROR]), 200)
    for key in sorted(out, key=lambda k: _size(out[k]), reverse=True):
        if _size(out) <= budget:
            break
        out[key] = f"<dropped by rare_celery: {_size(out[key])} bytes>"
    return out


def _fits(headers: dict[str, Any], budget: int) -> bool:
    """Whether ``headers`` certainly fit in ``budget`` bytes and nest no deeper than allowed: an
    upper bound of the size, without encoding the strings (a retry's headers are far below it)."""
    total = 0
    for key, value in headers.items():
        kind = type(value)
        if kind is str:
            total += 4 * len(value)  # UTF-8: at most 4 bytes a character
        elif kind in _SCALARS:
            total += 24
        elif (kind is list or kind is tuple) and all(type(v) in _SCALARS for v in value):
            total += 24 * len(value) + 8  # Celery's timelimit, for one
        elif isinstance(value, str):
            total += 4 * len(value)
        elif isinstance(value, (dict, list, tuple)) and too_deep(value, MAX_DEPTH - 1):
            return False
        else:
            total += _size(value)
        total += 4 * len(key if type(key) is str else str(key)) + 8
        if total > budget:
            return _size(headers) <= budget and not too_deep(headers)
    return True


_SCALARS = frozenset((bool, int, float, type(None)))  # 24 bytes at most each in a header table
_TEXT, _COUNT = "text", "count"
# Celery's protocol 2 headers whose type Celery's worker relies on (a wrong one makes its consumer raise
# outside any handler: the worker stops): key -> what it must be when present and not null
PROTOCOL = {"id": _TEXT, "task": _TEXT, "root_id": _TEXT, "parent_id": _TEXT, "group": _TEXT, "shadow": _TEXT,
            "argsrepr": _TEXT, "kwargsrepr": _TEXT, "origin": _TEXT, "lang": _TEXT, "retries": _COUNT,
            "group_index": _COUNT, "replaced_task_nesting": _COUNT, "ignore_result": bool,
            "timelimit": "limits", "stamped_headers": "names", "stamps": "stamps"}


def protocol_problem(headers: Mapping[str, Any]) -> str | None:
    """Why a task message's Celery headers (protocol 2) cannot be run as Celery reads them, or ``None``:
    a task id that is not a non-empty string, a count that is not a whole number, a time limit that is not
    two numbers, stamps that are not names and scalar values. (Protocol 1, without a ``task`` header: not
    looked at.)"""
    if "task" not in headers:
        return None
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "header id (the task id) is not a non-empty string"
    for key, kind in PROTOCOL.items():  # read for every delivery by the worker's main process: the usual cases first
        value = headers.get(key)
        if value is None or (kind is _TEXT and type(value) is str) or (
                kind is _COUNT and type(value) is int and 0 <= value <= MAX_ATTEMPT) or _protocol_ok(value, kind):
            continue
        return f"header {key} is not what Celery's protocol says ({_clip(repr(value), 60)})"
    return None


def _protocol_ok(value: object, kind: object) -> bool:
    number = (int, float)
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _COUNT:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ATTEMPT
    if kind == "limits":
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(
            v is None or (isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v) and v >= 0) for v in value)
    if kind == "names":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if kind == "stamps":  # (a string: Celery's request takes it; a copy of the message cannot be built: put back)
        scalar = (str, int, float, bool)
        return isinstance(value, str) or isinstance(value, dict) and all(
            isinstance(k, str) and (isinstance(v, scalar) or v is None or isinstance(v, (list, tuple)) and all(
                isinstance(x, scalar) or x is None for x in v)) for k, v in value.items())
    return isinstance(value, cast(type, kind))


def too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests lists or tables more than ``limit`` levels (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, (list, tuple)):
            continue
        if depth >= limit:
            return True
        stack += [(x, depth + 1) for x in item if isinstance(x, _NESTS)]  # a scalar nests nothing
    return False


_NESTS = (dict, list, tuple)


def _size(value: object) -> int:
    """About how many bytes ``value`` takes in an AMQP header table (nested past reason: too many)."""
    try:
        return len(json.dumps(value, default=str).encode())
    except (RecursionError, ValueError):
        return 1 << 30


def received(headers: object) -> dict[str, Any]:
    """A received message's headers, the broker's bookkeeping left out (``{}`` when it has none)."""
    return {k: v for k, v in headers.items() if k not in BROKER_KEYS} if isinstance(headers, Mapping) else {}


def carried(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A message's headers that travel unchanged to its next place: its own, the hop history
    (``x-rare-hops``) and the edits (``x-rare-edits``), without rare_celery's per-attempt headers and the
    broker's bookkeeping."""
    return {k: v for k, v in received(headers).items() if k in (HOPS, EDITS) or not k.startswith(PREFIX)}


def kept(headers: Mapping[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    """The ``keys`` of ``headers`` that it has (a wait keeps the last error)."""
    return {k: v for k, v in received(headers).items() if k in keys}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
