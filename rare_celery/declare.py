"""Declaring broker objects: idempotent, safe to repeat after every reconnect, clear when refused."""

from __future__ import annotations

import re

from amqp.exceptions import PreconditionFailed
from kombu import Queue

from .exceptions import TopologyError
from .topology import DELAY_EXCHANGE, RETURN_EXCHANGE, UNROUTED_QUEUE, bug_queue

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<what>queue|exchange) '(?P<name>[^']+)' "
    r"in vhost '(?P<vhost>[^']*)': received (?P<wanted>.+?) but current is (?P<current>.+)$"
)


def explain(exc: Exception) -> str:
    """RabbitMQ's PRECONDITION_FAILED text as one line that names the fix."""
    text = str(exc)
    m = _INEQUIVALENT.search(text)
    if not m:
        return f"rare_celery: the broker refused a declaration: {text}"
    what, name, vhost = m["what"], m["name"], m["vhost"]
    return (
        f"rare_celery: {what} {name!r} in vhost {vhost!r} exists with {m['arg']}={m['current']}, "
        f"but this app declares it with {m['arg']}={m['wanted']}. Make every declaration of it use "
        f"the same arguments (for a work queue: its queue_arguments in task_queues), or drain and "
        f"delete it (rabbitmqctl delete_{what} {name} -p {vhost}) and start again."
    )


def declare_queue(channel, queue: Queue) -> None:
    """Declare ``queue`` (and bind it to its exchange); a mismatch becomes a :class:`TopologyError`."""
    try:
        queue.bind(channel).declare()
    except PreconditionFailed as exc:
        raise TopologyError(explain(exc)) from None


def bind_return(channel, work_queue: str) -> None:
    """Bind ``work_queue`` to ``rare.return`` by its name: due messages come back to it."""
    channel.queue_bind(queue=work_queue, exchange=RETURN_EXCHANGE.name, routing_key=work_queue)


def declare_worker_topology(channel, work_queues: list[str], bug_queues: list[str]) -> None:
    """What a worker needs before it consumes: the delay exchange, the way back (``rare.return``,
    with ``rare.unrouted`` behind it) with its work queues bound to it, and their bug queues.

    Delay queues are declared by whoever first publishes to one (see :mod:`rare_celery.publish`).
    """
    DELAY_EXCHANGE.declare(channel=channel)
    declare_queue(channel, UNROUTED_QUEUE)
    RETURN_EXCHANGE.declare(channel=channel)
    for name in work_queues:
        bind_return(channel, name)
    for name in bug_queues:
        declare_queue(channel, bug_queue(name))
