"""One delivery of a rare task's message, read-only (:class:`Delivery`), and the copies made of it.

Every ending (:mod:`rare_celery.endings`) is built from a :class:`Delivery`: the message's headers
and their ``x-rare-*`` state, the queue it came from, its task, and how a copy of it is made:

* in the pool process there is no raw message, only Celery's request: :func:`rebuild` puts the same
  task id, arguments, canvas (callbacks, errbacks, chain, chord), root/parent/group ids, reply_to,
  correlation_id, priority, stamps and custom headers back into a Celery protocol-2 message
  (:meth:`Delivery.running`);
* in the worker's main process the copy is the message's own bytes and properties, its headers
  changed (:meth:`Delivery.received`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from celery.utils.objects import Bunch

from . import headers as hdr
from .inventory import work_queue_of
from .topology import bug_queue_name

KEPT = ("correlation_id", "reply_to", "priority", "message_id", "timestamp", "type", "app_id", "user_id")
QUEUE_KEY = "rare_queue"  # in delivery_info: the queue a delivery came from, as the worker's consumer knows it


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message, read-only.

    ``app`` is the Celery app, ``task`` the RareTask (``None``: the message names no task this worker knows); ``queue`` the
    queue it came from as the worker's consumer knows it (``x-rare-queue`` is never trusted for
    routing); ``headers`` its headers without the broker's bookkeeping; ``request`` what reports
    give as the request (Celery's in the pool process, a stand-in in the main process); ``body``
    the raw body (main process), or ``None`` where copies are rebuilt from the request.
    """

    app: Any
    task: Any
    task_id: str | None
    task_name: str
    queue: str | None
    headers: Mapping[str, Any]
    request: Any
    body: bytes | str | None = None
    properties: Mapping[str, Any] | None = None
    retries: int = 0

    @classmethod
    def running(cls, task: Any) -> Delivery:
        """The delivery ``task`` runs now, in the pool process (or an eager run)."""
        req = task.request
        info = req.delivery_info if isinstance(req.delivery_info, dict) else {}
        queue = info.get(QUEUE_KEY) or work_queue_of(task, info)
        return cls(task.app, task, req.id, task.name, queue, hdr.received(req.headers), req, retries=req.retries or 0)

    @classmethod
    def received(cls, app: Any, task: Any, message: Any, queue: str | None, request: Any = None) -> Delivery:
        """A message the worker's main process holds (``task``: its RareTask, or ``None``)."""
        headers = hdr.received(message.headers)
        task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
        name = cast(str, getattr(task, "name", None)
                    or (headers.get("task") if isinstance(headers.get("task"), str) else ""))
        retries = headers.get("retries")
        retries = retries if isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0 else 0
        if request is None:
            request = stand_in(message, headers)
        return cls(app, task, task_id, name, queue, headers, request, message.body, properties_of(message), retries)

    def state(self, now: float | None = None) -> hdr.Attempt:
        """Its ``x-rare-*`` state; :class:`~rare_celery.headers.HeaderError` on nonsense."""
        return hdr.read(self.headers, now)

    @property
    def bug_queue(self) -> str:
        own = getattr(self.task, "bug_queue", None)
        return own or bug_queue_name(self.queue or "")

    def copy(self, extra: dict[str, Any], *, name: str | None = None, args: Any = None, kwargs: Any = None,
             retries: int | None = None, keep: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """``(body, headers, properties)`` of a copy for the next place: the headers that travel
        (:func:`rare_celery.headers.carried`), the ``keep`` ones of this delivery, ``extra`` and a new
        ``x-rare-copy``; as task ``name`` with ``args``/``kwargs`` if given (the pool process only)."""
        retries = self.retries if retries is None else retries
        extra = {**hdr.kept(self.headers, keep), **extra, **hdr.new_copy()}
        if self.body is None:
            return rebuild(self.task, name=name, args=args, kwargs=kwargs, retries=retries, extra=extra)
        if args is not None or kwargs is not None:
            raise ValueError("new arguments need the running task's request (the pool process)")
        headers = {**hdr.carried(self.headers), **extra, "retries": retries}
        if name is not None:
            headers["task"] = name
        return self.body, hdr.fit(headers), dict(self.properties or {})

    def same(self, extra: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """``(body, headers, properties)`` of this very message with ``extra`` headers (a put-back:
        its ``x-rare-copy`` stays)."""
        if self.body is None:
            raise ValueError("the message itself is held by the worker's main process")
        return self.body, hdr.fit({**self.headers, **extra}), dict(self.properties or {})


def own_priority(priority: Any, headers: Mapping[str, Any] | None) -> Any:
    """The priority a copy of a message gets: its own, not the one its line copy had at the head of its
    line (:data:`rare_celery.headers.OWN_PRIORITY`); ``None``: none."""
    own = (headers or {}).get(hdr.OWN_PRIORITY)
    if isinstance(own, int) and not isinstance(own, bool) and 0 <= own <= 255:
        return own or None
    return priority


def properties_of(message: Any) -> dict[str, Any]:
    """The properties of a received message that a copy of it keeps (not ``expiration``)."""
    props = {k: v for k, v in (message.properties or {}).items() if k in KEPT and v is not None}
    props["priority"] = own_priority(props.get("priority"), message.headers)
    if props["priority"] is None:
        del props["priority"]
    props["content_type"] = message.content_type or "application/octet-stream"
    props["content_encoding"] = message.content_encoding or "binary"
    return props


def stand_in(message: Any, headers: Mapping[str, Any]) -> Bunch:
    """What a result backend and a signal receiver need of a request, for a message the main process holds."""
    props = message.properties or {}
    return Bunch(id=headers.get("id"), name=headers.get("task"), chord=None, root_id=headers.get("root_id"),
                 errbacks=None, correlation_id=props.get("correlation_id"), reply_to=props.get("reply_to"),
                 group=headers.get("group"), ignore_result=False, delivery_info=message.delivery_info,
                 args=None, kwargs=None)

_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def retry_call(fn: Callable[..., Any], current_args: Any, current_kwargs: Any, args: Any = None,
               kwargs: Any = None) -> tuple[Any, Any]:
    """The ``(args, kwargs)`` a ``retry(args=..., kwargs=...)`` runs with, as Celery 5.7 makes them
    (its change for issue 6494): given only ``args``, the current keywords stay except those the new
    positions now fill; given only ``kwargs``, the current positions stay except those a new keyword
    names. ``None`` keeps the current value; both given replace both."""
    if (args is None) == (kwargs is None):
        return (current_args, current_kwargs) if args is None else (args, kwargs)
    if kwargs is None:
        kwargs = dict(current_kwargs or {})
        params = _parameters(fn)
        if params is not None:
            for p in [p for p in params if p.kind in _POSITIONAL][: len(args)]:
                if p.kind in _BY_NAME:
                    kwargs.pop(p.name, None)
        return args, kwargs
    args = list(current_args or ())
    params = _parameters(fn)
    if params is None or not args:
        return args, kwargs
    try:
        bound = inspect.Signature(params).bind_partial(*args)
    except TypeError:
        return args, kwargs
    rest = dict(kwargs)
    by_name = {p.name for p in params if p.kind in _BY_NAME}
    for name in [n for n in rest if n in bound.arguments and n in by_name]:
        bound.arguments[name] = rest.pop(name)
    return list(bound.args), {**bound.kwargs, **rest}


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def rebuild(task: Any, *, name: str | None = None, args: Any = None, kwargs: Any = None, retries: int,
            extra: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(body, headers, properties) of ``task``'s current message, as task ``name`` with ``extra`` headers."""
    req = task.request
    opts = req.as_execution_options()
    stamped = opts.get("stamped_headers") or None
    stamps = {k: opts[k] for k in stamped or () if k in opts}
    msg = task.app.amqp.as_task_v2(
        req.id, name or task.name, req.args if args is None else args, req.kwargs if kwargs is None else kwargs,
        group_id=req.group, group_index=req.group_index, retries=retries, chord=req.chord,
        callbacks=req.callbacks, errbacks=req.errbacks, reply_to=req.reply_to,
        time_limit=opts["time_limit"], soft_time_limit=opts["soft_time_limit"],
        root_id=req.root_id, parent_id=req.parent_id, shadow=req.shadow, chain=req.chain,
        origin=req.origin, ignore_result=bool(req.ignore_result), stamped_headers=stamped,
        replaced_task_nesting=req.replaced_task_nesting or 0, **stamps,
        # the same arguments keep the same repr (formatted once; one a caller chose to hide stays hidden)
        argsrepr=_repr(req, "argsrepr") if args is None else None,
        kwargsrepr=_repr(req, "kwargsrepr") if kwargs is None else None,
    )
    headers = hdr.fit({**hdr.carried(req.headers), **msg.headers, **extra})
    props = dict(msg.properties)
    priority = own_priority((req.delivery_info or {}).get("priority"), req.headers)
    if priority is not None:
        props["priority"] = priority
    return msg.body, headers, props


def _repr(req: Any, key: str) -> str | None:
    value = getattr(req, key, None)
    return value if isinstance(value, str) else None
