"""Celery events for rare_celery's decisions, so Flower, celery-exporter and the console see them.

Sent from the worker (pool process or main process) after the publish a decision needs is
confirmed, and only when the worker sends task events (``worker_send_task_events`` / ``-E``). Every
event carries ``uuid`` (the task id) and ``name`` (the task that decided), plus:

=================  =========================================================================
type               fields
=================  =========================================================================
``rare-retry``     ``attempt`` (the one that failed), ``delay`` (s), ``exception``, ``queue``
``rare-bugs``      ``reason``, ``attempts``, ``exception``, ``queue`` (the bug queue)
``rare-hop``       ``target`` (task name), ``reason``, ``queue`` (the target's)
``rare-expired``   ``deadline`` (epoch s), ``attempts``
``rare-wait``      ``due`` (epoch s), ``queue``: an early arrival sent round again, not run
=================  =========================================================================
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

RETRY, BUGS, HOP, EXPIRED, WAIT = "rare-retry", "rare-bugs", "rare-hop", "rare-expired", "rare-wait"
TYPES = (RETRY, BUGS, HOP, EXPIRED, WAIT)


def emit(task, kind: str, task_id: str, **fields) -> None:
    """Send event ``kind`` for ``task_id`` if the worker sends task events; never raises."""
    if not getattr(task, "send_events", True) or not task.app.conf.worker_send_task_events:
        return
    try:
        with task.app.events.default_dispatcher(hostname=getattr(task.request, "hostname", None)) as dispatcher:
            dispatcher.send(kind, uuid=task_id, name=task.name, **fields)
    except Exception as exc:  # noqa: BLE001 - an event is a report; the message is safe either way
        log.warning("rare_celery: could not send the %s event for %s: %r", kind, task_id, exc)
