"""Rebuilding the message a worker is running, for a republish (retry, bug queue, hop).

Inside the pool process there is no raw message, only Celery's request; this puts the same task
id, arguments, canvas (callbacks, errbacks, chain, chord), root/parent/group ids, reply_to,
correlation_id, priority, stamps and custom headers back into a Celery protocol-2 message.
"""

from __future__ import annotations

import inspect

from . import headers as hdr

_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def retry_call(fn, current_args, current_kwargs, args=None, kwargs=None) -> tuple:
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


def _parameters(fn) -> list | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def rebuild(task, *, name: str | None = None, args=None, kwargs=None, retries: int, extra: dict):
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
    priority = (req.delivery_info or {}).get("priority")
    if priority is not None:
        props["priority"] = priority
    return msg.body, headers, props


def _repr(req, key: str) -> str | None:
    value = getattr(req, key, None)
    return value if isinstance(value, str) else None
