"""How long a worker may hold a delivery of a rare quorum work queue before RabbitMQ takes it back.

A RareTask acks late: its message stays unacked while it waits in the worker's prefetch and while it
runs. RabbitMQ takes back a delivery held longer than the consumer timeout (30 min by default) and
delivers it again: the task runs again while it still runs, and its ack then fails. On RabbitMQ 4.3
only quorum queues enforce the timeout (classic queues do not, and refuse the consumer argument), and
the consumer argument ``x-consumer-timeout`` wins over the queue's argument, a ``consumer-timeout``
policy and the node's ``consumer_timeout``. So the worker consumes each rare quorum work queue with
``x-consumer-timeout`` set to the longest a delivery can be held: ``worker_prefetch_multiplier`` x the
longest hard time limit of the rare tasks routed to it, plus :data:`MARGIN`. Without a hard time limit
there is no such bound: one warning line at start says what to set. A queue whose ``consumer_arguments``
set ``x-consumer-timeout`` already is left as the app declares it.
"""

from __future__ import annotations

import logging
from typing import Any

from .inventory import rare_tasks

log = logging.getLogger(__name__)
CONSUMER_TIMEOUT = "x-consumer-timeout"
MARGIN = 60.0  # seconds on top of the longest hold: the ack's way back, a busy worker


def longest_hold(app: Any, tasks: list[Any]) -> float | None:
    """Seconds a delivery of one of ``tasks`` can stay unacked in a worker of ``app``: it may wait in the
    prefetch behind ``worker_prefetch_multiplier - 1`` rounds of the pool, then run; ``None`` when a task
    has no hard time limit or the prefetch is unlimited."""
    limits = [getattr(t, "time_limit", None) or app.conf.task_time_limit for t in tasks]
    multiplier = app.conf.worker_prefetch_multiplier or 0
    if not limits or not all(limits) or multiplier < 1:
        return None
    return multiplier * max(float(x) for x in limits) + MARGIN


def set_consumer_timeouts(app: Any) -> dict[str, int]:
    """Give each rare quorum work queue this worker consumes (typed by the app, or learned from the broker
    before the worker starts) the consumer argument ``x-consumer-timeout`` (ms): see the module text.
    Returns queue -> milliseconds set."""
    by_queue: dict[str, list[Any]] = {}
    for info in rare_tasks(app):
        by_queue.setdefault(info.queue, []).append(info)
    out = {}
    for name, queue in sorted(app.amqp.queues.consume_from.items()):
        infos = by_queue.get(name)
        if not infos or (queue.queue_arguments or {}).get("x-queue-type") != "quorum":
            continue
        if CONSUMER_TIMEOUT in (queue.consumer_arguments or {}):
            continue
        hold = longest_hold(app, [i.task for i in infos])
        if hold is None:
            free = [i.name for i in infos if not (getattr(i.task, "time_limit", None) or app.conf.task_time_limit)]
            why = f"{', '.join(sorted(free))} {'have' if len(free) > 1 else 'has'} no hard time limit" if free \
                else "the worker's prefetch is unlimited (worker_prefetch_multiplier 0)"
            log.warning(
                "rare_celery: %s is a quorum queue and %s: RabbitMQ delivers a message again when it stays unacked "
                "longer than the consumer timeout (30 min by default; on 4.3 quorum queues only, before 4.3 every "
                "queue) and the task then runs again while it runs; set time_limit (rare_celery then sets "
                "x-consumer-timeout to cover it) or the queue's x-consumer-timeout", name, why)
            continue
        millis = int(hold * 1000)
        queue.consumer_arguments = {**(queue.consumer_arguments or {}), CONSUMER_TIMEOUT: millis}
        out[name] = millis
        log.info("rare_celery: consuming %s with x-consumer-timeout %d s (prefetch multiplier %s x time limit)",
                 name, millis // 1000, app.conf.worker_prefetch_multiplier)
    return out
