"""Publishing to delay, work and bug queues: confirmed, mandatory, never silently dropped.

Every publish here waits for the broker's confirm (the app runs with ``confirm_publish``) and is
``mandatory``: a message no queue takes comes back, the target is declared again and the publish
tried once more. Anything else the broker refuses raises :class:`PublishRefused`, so the caller
keeps (does not ack) the original message.
"""

from __future__ import annotations

import logging

from amqp import spec
from amqp.exceptions import ChannelError, MessageNacked
from kombu import Queue
from kombu.exceptions import OperationalError

from .exceptions import PublishRefused
from .topology import CLASSIC, DELAY_EXCHANGE, MAX_DELAY_MS, bug_queue, delay_queue, grid_floor

log = logging.getLogger(__name__)
NO_ROUTE = 312


def send(producer, body, *, exchange: str, routing_key: str, target: Queue | None,
         headers: dict, retry_policy: dict | None = None, **properties) -> None:
    """Publish one message with confirms; ``target`` is (re)declared as needed. Raises PublishRefused."""
    declare = [target] if target is not None else []
    for last_try in (False, True):
        try:
            producer.publish(
                body, exchange=exchange, routing_key=routing_key, headers=headers,
                declare=declare, mandatory=True, delivery_mode=2, retry=True,
                retry_policy=retry_policy or {"max_retries": 3}, **properties)
            return
        except ChannelError as exc:
            if getattr(exc, "reply_code", None) != NO_ROUTE:
                raise PublishRefused(f"the publish to {_where(exchange, routing_key, target)} failed: {exc}") from None
            producer.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=10)  # the returned message's confirm
            if last_try or target is None:
                raise PublishRefused(f"no queue took the message for {_where(exchange, routing_key, target)}") from None
            log.warning("rare_celery: %s was missing; declaring it again", target.name)
            producer.channel.connection.client.declared_entities.discard(hash(target))
        except Exception as exc:  # noqa: BLE001 - whatever it is, the caller must keep the original
            # kombu retries a nack (py-amqp files MessageNacked under connection errors) and then
            # re-raises it as OperationalError: look for the nack behind it.
            cause = exc if isinstance(exc, MessageNacked) else (exc.__cause__ or exc.__context__)
            if isinstance(cause, MessageNacked):
                raise PublishRefused(f"the broker refused (nacked) the publish to "
                                     f"{_where(exchange, routing_key, target)}", transient=True) from None
            transient = isinstance(exc, (OperationalError, *producer.connection.connection_errors))
            raise PublishRefused(f"the publish to {_where(exchange, routing_key, target)} failed: {exc!r}",
                                 transient=transient) from None


def _where(exchange: str, routing_key: str, target: Queue | None) -> str:
    return f"queue {target.name!r}" if target is not None else f"exchange {exchange!r} key {routing_key!r}"


def send_delayed(producer, body, *, work_queue: str, delay: float, kind: str = CLASSIC,
                 headers: dict, **properties) -> float:
    """Publish ``body`` to come back to ``work_queue`` after ``delay`` seconds.

    The message waits in the delay queue of the largest grid value not above ``delay`` and is
    dead-lettered straight to ``work_queue``. Returns the seconds it will wait there (<= delay);
    the rest is sent round again by the worker when it arrives early (see ``x-rare-due``).
    """
    ms = min(int(delay * 1000), MAX_DELAY_MS)
    if ms < 1:
        send(producer, body, exchange="", routing_key=work_queue, target=None,
             headers=headers, **properties)
        return 0.0
    queue = delay_queue(grid_floor(ms), kind)
    send(producer, body, exchange=DELAY_EXCHANGE.name, routing_key=work_queue, target=queue,
         headers={**headers, "BCC": [queue.name]}, **properties)
    return queue.queue_arguments["x-message-ttl"] / 1000


def send_to_bugs(producer, body, *, queue: str, headers: dict, **properties) -> None:
    """Publish ``body`` to the bug queue ``queue`` (declared if it is missing)."""
    send(producer, body, exchange="", routing_key=queue, target=bug_queue(queue),
         headers=headers, **properties)
