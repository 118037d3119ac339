"""Declaring broker objects: idempotent, safe to repeat after every reconnect, clear when refused."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, cast

from amqp.exceptions import NotFound, PreconditionFailed
from kombu import Queue

from .exceptions import TopologyError
from .topology import (
    CLASSIC,
    DELAY_EXCHANGE,
    QUORUM,
    RETURN_EXCHANGE,
    bug_queue,
    for_broker,
    other_mode,
    unrouted_queue,
)

log = logging.getLogger(__name__)

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


def declare_queue(channel: Any, queue: Queue) -> None:
    """Declare ``queue`` (and bind it to its exchange); a mismatch becomes a :class:`TopologyError`."""
    try:
        _declare(channel, queue)
    except PreconditionFailed as exc:
        raise TopologyError(explain(exc)) from None


def _declare(channel: Any, queue: Queue) -> None:
    """Declare ``queue`` as this broker needs it (:func:`~rare_celery.topology.for_broker`). A classic delay
    queue is tried first on a channel of its own (a refusal closes the channel it is made on): one that
    exists with the other queue mode (made lazy before 3.12, or by an older rare_celery without the
    mode) is taken as it is, never refused."""
    version = str((channel.connection.server_properties or {}).get("version", ""))
    wanted = for_broker(queue, version)
    args = wanted.queue_arguments or {}
    if not getattr(wanted, "rare_delay", False) or args.get("x-queue-type") != CLASSIC:
        wanted.bind(channel).declare()
        return
    probe = channel.connection.channel()
    try:
        wanted.bind(probe).declare()
        return
    except PreconditionFailed as exc:
        m = _INEQUIVALENT.search(str(exc))
        if not m or m["arg"] != "x-queue-mode":
            raise
    finally:
        try:
            probe.close()
        except Exception:  # noqa: BLE001, S110 - the broker closed it already (the refusal above)
            pass
    other_mode(wanted).bind(channel).declare()


def broker_type(connection: Any, queue: Queue) -> str | None:
    """The type the broker gave ``queue`` (which exists), when its declaration does not say: a vhost's
    or node's default queue type makes an untyped declaration quorum. Found by declaring it again as
    ``classic`` on a channel of its own: the broker accepts that for a classic queue and names the
    current type of any other. ``None`` when it cannot tell (another argument differs)."""
    args = dict(queue.queue_arguments or {})
    if args.get("x-queue-type"):
        return cast(str, args["x-queue-type"])
    channel = connection.channel()
    try:
        channel.queue_declare(queue=queue.name, durable=queue.durable, exclusive=queue.exclusive,
                              auto_delete=queue.auto_delete, arguments={**args, "x-queue-type": "classic"})
        return "classic"
    except PreconditionFailed as exc:
        m = _INEQUIVALENT.search(str(exc))
        if m and m["arg"] == "x-queue-type":
            found = re.search(r"'(\w+)'", m["current"])
            return found[1] if found else None
        return None
    finally:
        try:
            channel.close()
        except Exception:  # noqa: BLE001, S110 - the broker closed it already (the refusal above)
            pass


def learn_types(connection: Any, queues: list[Queue]) -> list[str]:
    """Write the type the broker reports, when not classic, into each untyped work queue's declaration
    (an untyped classic queue stays as the app declares it; Celery then
    consumes a quorum queue without global QoS, and rare_celery picks quorum delay queues for it).
    Returns the names of the quorum queues among ``queues``."""
    quorum = []
    for queue in queues:
        kind = broker_type(connection, queue)
        if kind and kind != "classic" and not (queue.queue_arguments or {}).get("x-queue-type"):
            queue.queue_arguments = {**(queue.queue_arguments or {}), "x-queue-type": kind}
        if kind == QUORUM:
            quorum.append(queue.name)
    return quorum


def once(channel: Any, entity: Any) -> None:
    """Declare ``entity`` (an exchange, or a queue as this broker's version needs it) unless this
    connection did already: kombu's per-connection cache, emptied when the connection is renewed."""
    done, key = channel.connection.client.declared_entities, hash(entity)
    if key in done:
        return
    if isinstance(entity, Queue):
        _declare(channel, entity)
    else:
        entity.bind(channel).declare()
    done.add(key)


def forget(channel: Any) -> None:
    """Declare everything again on this connection (someone deleted what it declared)."""
    channel.connection.client.declared_entities.clear()


def bind_return_once(channel: Any, work_queue: str) -> None:
    """:func:`bind_return`, once per connection."""
    done = channel.connection.client.declared_entities
    if (RETURN_EXCHANGE.name, work_queue) not in done:
        bind_return(channel, work_queue)
        done.add((RETURN_EXCHANGE.name, work_queue))


def bind_return(channel: Any, work_queue: str) -> None:
    """Bind ``work_queue`` to ``rare.return`` by its name: due messages come back to it."""
    channel.queue_bind(queue=work_queue, exchange=RETURN_EXCHANGE.name, routing_key=work_queue)


def declare_worker_topology(connection: Any, work_queues: list[str], bug_queues: list[str],
                            kind: str = CLASSIC) -> None:
    """What a worker needs before it consumes: the delay exchange, the way back (``rare.return``,
    with ``rare.unrouted`` behind it) with its work queues bound to it, and their bug queues
    (``kind``: see :func:`rare_celery.topology.own_kind`).

    On channels of its own: a queue the broker cannot reach now (a classic queue whose cluster node
    is down: NOT_FOUND) is logged and skipped, never the end of the worker's consumer; what is
    published to it meanwhile stays unacked until it is back. Delay queues are declared by whoever
    first publishes to one (see :mod:`rare_celery.publish`).
    """
    channel = connection.channel()
    steps: list[Callable[..., None]] = [lambda ch: DELAY_EXCHANGE.declare(channel=ch),
                                        lambda ch: declare_queue(ch, unrouted_queue(kind)),
                                        lambda ch: RETURN_EXCHANGE.declare(channel=ch)]
    steps += [lambda ch, name=name: bind_return(ch, name) for name in work_queues]
    steps += [lambda ch, name=name: declare_queue(ch, bug_queue(name, kind)) for name in bug_queues]
    try:
        for step in steps:
            try:
                step(channel)
            except NotFound as exc:
                log.error("rare_celery: %s; routing to it waits until the broker has it again", " ".join(str(exc).split()))
                channel = connection.channel()
    finally:
        try:
            channel.close()
        except Exception:  # noqa: BLE001, S110 - closing is best effort
            pass
