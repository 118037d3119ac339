"""Bug-queue messages as records an operator reads, filters and requeues: pure, no broker.

A message in a bug queue may be anything: a Celery protocol-2 task with the ``x-rare-*`` headers
(:mod:`rare_celery.headers`), bad JSON, pickle bytes, a foreign message without headers. Reading one
never fails and never evaluates it (no unpickling).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from .. import headers as hdr

RESET = (hdr.DEADLINE, hdr.DUE)
UNSTABLE = ("x-delivery-count",)  # quorum queues count redeliveries: not part of a message's identity
PREVIEW = 300
MAX_BODY_DEPTH = 100  # args and kwargs nested deeper are not decoded (shown as text)
DEEP = f"<unreadable: nested deeper than {hdr.MAX_DEPTH} levels>"
GROUP_WIDTH = 120  # the one-line error a failure group is made from (what the console keeps of each message)
MASKS = (  # what varies between failures of one kind: masked before they are grouped
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE), "<id>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{12,}\b", re.IGNORECASE), "<id>"),
    (re.compile(r"\+?\d+(?:[.,:/_-]\d+)*"), "<n>"),
)


@dataclass(frozen=True)
class Record:
    """What an operator needs to know about one bug-queue message."""

    bug_queue: str
    position: int  # 0 = head of the queue when it was read
    id: str | None
    task: str | None
    queue: str | None  # origin work queue
    reason: str | None
    attempts: int | None
    exception: str | None
    error: str | None
    traceback: str | None
    first_attempt_at: float | None  # the work's first attempt: before its first hop, if it made any
    failed_at: float | None
    args: object = None
    kwargs: object = None
    hops: list[Any] = field(default_factory=list)
    body_error: str | None = None  # why args/kwargs could not be read
    body_preview: str | None = None  # the start of an unreadable body, as text

    def as_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("id", "task", "queue", "bug_queue", "position", "reason", "attempts",
                                             "exception", "error", "traceback")}
        out["first_attempt_at"], out["failed_at"] = iso(self.first_attempt_at), iso(self.failed_at)
        out.update(args=self.args, kwargs=self.kwargs, hops=self.hops)
        if self.body_error:
            out.update(body_error=self.body_error, body_preview=self.body_preview)
        return out

    @property
    def group(self) -> str:
        """Its failure group (:func:`group_of`)."""
        return group_of(self.task, self.one_line_error(GROUP_WIDTH))

    def one_line_error(self, width: int = 80) -> str:
        kind = (self.exception or "").rsplit(".", 1)[-1]
        text = ": ".join(x for x in (kind, self.error) if x) or self.body_error or ""
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"


def allow_deep_headers() -> None:
    """Let py-amqp read (and write back) any header table a broker frame can carry. It decodes them
    recursively: a header nested ~1,500 deep passes Python's default recursion limit, and the read dies
    with it (nothing behind that message could be read, moved or purged). A 128 KB frame nests at most
    ~26,000 deep; from Python 3.11 on, Python calls do not use the C stack, so a higher limit is safe
    (the worker does the same, :class:`rare_celery.worker.RareConsumerStep`)."""
    if sys.version_info >= (3, 11):
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 30_000))


def shown_headers(headers: object) -> dict[str, Any]:
    """``headers`` with every value nested deeper than :data:`rare_celery.headers.MAX_DEPTH` replaced by a
    note (:data:`DEEP`): what is read, shown, or encoded as JSON never recurses that deep."""
    if not isinstance(headers, Mapping):
        return {}
    return {k: (DEEP if hdr.too_deep(v, hdr.MAX_DEPTH - 1) else v) for k, v in headers.items()}


def read(bug_queue: str, position: int, body: bytes, properties: Mapping[str, Any],
         headers: Mapping[str, Any] | None) -> Record:
    """A :class:`Record` for one message; every field is ``None`` where the message says nothing sensible."""
    h = shown_headers(headers)
    args, kwargs, problem = decode_body(body, properties, h)
    hops = h.get(hdr.HOPS)
    return Record(
        bug_queue=bug_queue, position=position,
        id=_text(h.get("id")) or _text(properties.get("correlation_id")) or _text(properties.get("message_id")),
        task=_text(h.get(hdr.TASK)) or _text(h.get("task")),
        queue=_text(h.get(hdr.QUEUE)),
        reason=_text(h.get(hdr.REASON)),
        attempts=_int(h.get(hdr.ATTEMPTS)),
        exception=_text(h.get(hdr.EXCEPTION)),
        error=_text(h.get(hdr.ERROR)),
        traceback=_text(h.get(hdr.TRACEBACK)),
        first_attempt_at=_first_attempt(_epoch(h.get(hdr.FIRST_AT)), hops),
        failed_at=_epoch(h.get(hdr.FAILED_AT)),
        args=args, kwargs=kwargs,
        hops=list(hops) if isinstance(hops, (list, tuple)) else [],
        body_error=problem,
        body_preview=_preview(body) if problem else None,
    )


def _first_attempt(first_at: float | None, hops: object) -> float | None:
    """When the work was first tried: ``x-rare-first-at`` starts again at each hop (the next task's shelf life
    counts from there), the hop history keeps when each task before started."""
    starts = [_epoch(e.get("started")) for e in hops if isinstance(e, Mapping)] if isinstance(hops, (list, tuple)) else []
    known = [t for t in (first_at, *starts) if t is not None]
    return min(known) if known else None


def decode_body(body: bytes, properties: Mapping[str, Any],
                headers: Mapping[str, Any]) -> tuple[object, object, str | None]:
    """``(args, kwargs, None)`` for a JSON Celery task body, else ``(None, None, why not)``."""
    content_type = properties.get("content_type") or ""
    if headers.get("compression"):
        try:
            from kombu.compression import decompress

            body = decompress(body, headers["compression"])
        except Exception as exc:  # noqa: BLE001 - shown, not raised
            return None, None, f"compressed body ({headers['compression']}) could not be read: {exc}"
    if "json" not in content_type:
        return None, None, f"body is {content_type or 'without a content type'}, not JSON: not decoded"
    try:
        data = json.loads(body)
    except (ValueError, TypeError, RecursionError) as exc:
        return None, None, f"body is not valid JSON: {exc}"
    if hdr.too_deep(data, MAX_BODY_DEPTH):
        return None, None, f"body nests deeper than {MAX_BODY_DEPTH} levels: not decoded"
    if isinstance(data, list) and len(data) == 3 and isinstance(data[0], list) and isinstance(data[1], dict):
        return data[0], data[1], None
    if isinstance(data, dict) and "args" in data:  # Celery protocol 1
        return data.get("args"), data.get("kwargs"), None
    return None, None, "body is JSON but not a Celery task ([args, kwargs, embed])"


MAX_EDITS = 5  # edits a message keeps in x-rare-edits (the oldest go first)
MAX_EDIT_TEXT = 4_000  # characters of each of args and kwargs before an edit kept in its entry: the headers
# stay far under the frame size however often a message is edited


def edited(body: bytes, properties: Mapping[str, Any], headers: Mapping[str, Any], args: list[Any] | None,
           kwargs: dict[str, Any] | None, by: str, now: float) -> tuple[bytes, dict[str, Any]]:
    """The body and the headers of a bug message whose ``args`` / ``kwargs`` (``None``: unchanged) an
    operator changed: a JSON Celery body with the new arguments, Celery's ``argsrepr`` / ``kwargsrepr``
    to match, and an ``x-rare-edits`` entry (who, when, the arguments before). Raises :class:`ValueError`
    for a message whose arguments cannot be read (then it cannot be edited)."""
    if headers.get("compression"):
        raise ValueError(f"its body is compressed ({headers['compression']}): it cannot be edited here")
    old_args, old_kwargs, problem = decode_body(body, properties, headers)
    if problem is not None:
        raise ValueError(f"its arguments cannot be read ({problem}): it cannot be edited")
    data = json.loads(body)
    protocol_1 = isinstance(data, dict)  # decode_body read it: a protocol-2 list, or a protocol-1 dict
    if protocol_1:
        raise ValueError("it is a Celery protocol 1 message: it cannot be edited")
    new_args = old_args if args is None else args
    new_kwargs = old_kwargs if kwargs is None else kwargs
    new_body = json.dumps([new_args, new_kwargs, data[2]], ensure_ascii=False).encode("utf-8")
    entry = {"by": by[:200], "at": now, "args": _clipped_json(old_args), "kwargs": _clipped_json(old_kwargs)}
    history = [e for e in headers.get(hdr.EDITS) or () if isinstance(e, Mapping)] if isinstance(
        headers.get(hdr.EDITS), (list, tuple)) else []
    out = {**headers, hdr.EDITS: [*history, entry][-MAX_EDITS:],
           "argsrepr": repr(new_args)[:1024], "kwargsrepr": repr(new_kwargs)[:1024]}
    return new_body, out


def _clipped_json(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_EDIT_TEXT else text[:MAX_EDIT_TEXT] + "…"


def masked(text: str) -> str:
    """``text`` with ids and numbers masked: ``card 4242 declined for 9f2c...`` -> ``card <n> declined for <id>``."""
    for pattern, mask in MASKS:
        text = pattern.sub(mask, text)
    return text


@functools.lru_cache(maxsize=4096)  # errors repeat: a queue of 100,000 bugs has a few hundred kinds
def group_of(task: str | None, error: str) -> str:
    """A failure group's id: the task, the exception type and the message with ids and numbers masked
    (``error`` as :meth:`Record.one_line_error` writes it, ``GROUP_WIDTH`` wide)."""
    key = f"{task or ''}\0{masked(error)}"
    return hashlib.sha1(key.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()[:10]


@dataclass
class Group:
    """Bug messages that failed the same way: same task, same exception type, same message but for ids
    and numbers."""

    id: str
    task: str | None
    error: str  # masked
    count: int = 0
    first_failed: float | None = None
    last_failed: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"group": self.id, "count": self.count, "task": self.task, "error": self.error,
                "first_failed_at": iso(self.first_failed), "last_failed_at": iso(self.last_failed)}


def groups(found: Iterable[tuple[str, str | None, str, float | None]]) -> list[Group]:
    """``(group, task, one-line error, failed_at)`` of each message -> its groups, the largest first."""
    out: dict[str, Group] = {}
    for gid, task, error, failed in found:
        g = out.get(gid)
        if g is None:
            g = out[gid] = Group(gid, task, masked(error))
        g.count += 1
        if failed is not None:
            g.first_failed = failed if g.first_failed is None else min(g.first_failed, failed)
            g.last_failed = failed if g.last_failed is None else max(g.last_failed, failed)
    return sorted(out.values(), key=lambda g: (-g.count, g.task or "", g.error))


class Matched(Protocol):
    """What :meth:`Selector.matches` reads: a :class:`Record`, or a snapshot entry of the web console."""

    @property
    def id(self) -> str | None: ...
    @property
    def task(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def failed_at(self) -> float | None: ...
    @property
    def group(self) -> str: ...


@dataclass(frozen=True)
class Selector:
    """Which messages a command acts on; an empty selector matches every message."""

    ids: frozenset[str] = frozenset()
    tasks: tuple[str, ...] = ()  # names or shell patterns (``billing.*``)
    reasons: frozenset[str] = frozenset()
    failed_after: float | None = None  # --since
    failed_before: float | None = None  # --older-than
    groups: frozenset[str] = frozenset()  # failure groups (--group)

    def __bool__(self) -> bool:
        return (bool(self.ids or self.tasks or self.reasons or self.groups)
                or (self.failed_after, self.failed_before) != (None, None))

    def matches(self, r: Matched) -> bool:
        if self.ids and r.id not in self.ids:
            return False
        if self.groups and r.group not in self.groups:
            return False
        if self.tasks and not any(fnmatch.fnmatchcase(r.task or "", pattern) for pattern in self.tasks):
            return False
        if self.reasons and r.reason not in self.reasons:
            return False
        if self.failed_after is not None and (r.failed_at is None or r.failed_at < self.failed_after):
            return False
        return self.failed_before is None or (r.failed_at is not None and r.failed_at <= self.failed_before)


def requeue_headers(headers: Mapping[str, Any] | None, *, reset: bool, now: float,
                    queue: str | None = None) -> dict[str, Any]:
    """The headers of a message sent back from a bug queue to a work queue.

    The bug-queue headers, the delivery count (``x-rare-deliveries``: a requeue starts it over) and
    RabbitMQ's dead-letter bookkeeping go; it is a new copy (``x-rare-copy``). With ``reset`` it starts over:
    attempt 1, first-at ``now``, no deadline or due time (the worker applies the task's shelf life
    from the new first-at); without, it keeps its attempt count, first-at and deadline. ``queue``
    becomes its ``x-rare-queue`` (a message moved elsewhere with ``--to`` retries there).
    """
    out = {k: v for k, v in (headers or {}).items()
           if k not in hdr.BUG_ONLY and k not in hdr.BROKER_KEYS and k not in hdr.PER_DELIVERY}
    out.update(hdr.new_copy())
    if reset:
        for key in RESET:
            out.pop(key, None)
        out[hdr.ATTEMPT] = 1
        out[hdr.FIRST_AT] = now
        if "retries" in out:
            out["retries"] = 0
    if queue is not None:
        out[hdr.QUEUE] = queue
    return out


def fingerprint(body: bytes, properties: Mapping[str, Any], headers: Mapping[str, Any] | None) -> str:
    """The identity of a message's content, the same each time it is read (quorum's delivery count aside)."""
    h = ({k: (_digest(v) if hdr.too_deep(v, hdr.MAX_DEPTH - 1) else v) for k, v in headers.items() if k not in UNSTABLE}
         if isinstance(headers, Mapping) else headers)
    props = {k: v for k, v in properties.items() if k != "application_headers"}
    text = json.dumps([h, props], sort_keys=True, default=repr)
    return hashlib.sha256(bytes(body) + b"\0" + text.encode()).hexdigest()


def _digest(value: object) -> str:
    """A deeply nested value's identity, computed without recursion."""
    digest = hashlib.sha256()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            digest.update(b"{%d" % len(item))
            for k in sorted(item, key=str):
                digest.update(repr(k).encode())
                stack.append(item[k])
        elif isinstance(item, (list, tuple)):
            digest.update(b"[%d" % len(item))
            stack.extend(reversed(item))
        else:
            digest.update(repr(item).encode("utf-8", "backslashreplace") + b"\0")
    return "<nested: " + digest.hexdigest() + ">"


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _epoch(value: Any) -> float | None:  # a header's value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok and 0 <= value < 32_503_680_000 else None


def _preview(body: bytes | str) -> str:
    text = body if isinstance(body, str) else bytes(body).decode("utf-8", "backslashreplace")
    return text if len(text) <= PREVIEW else text[:PREVIEW] + "…"
