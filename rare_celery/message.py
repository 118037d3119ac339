"""Rebuilding the message a worker is running, for a republish (retry, bug queue, hop).

Inside the pool process there is no raw message, only Celery's request; this puts the same task
id, arguments, canvas (callbacks, errbacks, chain, chord), root/parent/group ids, reply_to,
correlation_id, priority, stamps and custom headers back into a Celery protocol-2 message.
"""

from __future__ import annotations

from . import headers as hdr


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
    )
    headers = hdr.fit({**hdr.carried(req.headers), **msg.headers, **extra})
    props = dict(msg.properties)
    priority = (req.delivery_info or {}).get("priority")
    if priority is not None:
        props["priority"] = priority
    return msg.body, headers, props
