"""Celery events for rare_celery's decisions, so Flower, celery-exporter and the console see them.

Sent from the worker (pool process or main process) after the publish a decision needs is
confirmed, and only when the worker sends task events (``worker_send_task_events`` / ``-E``). Every
event carries ``uuid`` (the task id) and ``name`` (the task that decided), plus (``exception`` is
the type, ``module.Name``; ``error`` its message, at most 200 characters):

=================  =========================================================================
type               fields
=================  =========================================================================
``rare-retry``     ``attempt`` (the one that failed), ``delay`` (s), ``exception``, ``error``, ``queue``
``rare-bugs``      ``reason``, ``attempts``, ``exception``, ``error``, ``queue`` (the bug queue)
``rare-hop``       ``target`` (task name), ``reason``, ``queue`` (the target's)
``rare-expired``   ``deadline`` (epoch s), ``attempts``
``rare-wait``      ``due`` (epoch s), ``queue``: an early arrival sent round again, not run;
                   ``breaker`` (its name) when it waits for an open circuit breaker; or, with no
                   ``due``, ``line`` and ``limit`` (``concurrency``, ``rate``) when it waits in its
                   service's line until woken
``rare-put-back``  ``queue``, ``deliveries`` (this one's number), ``why``: a delivery that could not
                   reach its next place, back in its queue
``rare-lost``      ``queue``, ``reason`` (``worker_lost``, ``time_limit``), ``attempt``: an attempt whose
                   pool process or whole worker died, or that a hard time limit ended (its retry,
                   hop or bug-queue event follows)
=================  =========================================================================

Circuit breakers (sent once per change, by the worker whose attempt made it; ``uuid`` is that
attempt's task id, ``name`` its task, ``breaker`` the breaker's name, ``gen`` its open periods):

=======================  ===================================================================
``rare-limit-start``     ``service``, ``waiting`` (attempts in its line): a worker saw attempts of a
                         service wait for its limits (sent by each worker, from its main process)
``rare-limit-stop``      ``service``: its line is empty again
``rare-breaker-open``    ``until`` (epoch s: the probe time), ``open_for`` (s), ``reopened``
``rare-breaker-probe``   ``worker``: the one attempt that probes the service now
``rare-breaker-close``   attempts run again
=======================  ===================================================================

``rare-hop`` also carries ``source`` (the same as ``name``). These types (routing keys ``rare.*``)
are what ``rare-celery web`` / ``metrics`` count; an event consumer that keeps task state (Flower,
``celery.events.state.State``) files them under no task.

**Task events, for consumers that keep task state** (Flower, ``celery.events.state.State``). A hop
and a wait end the run with Celery's ``Ignore``, for which Celery sends no event, and a wait from the
worker's main process (a delayed start, a breaker's hold) has no run at all. So with ``rare-hop``
the same dispatcher sends ``task-hopped``, and with ``rare-wait`` ``task-waiting``: task events with
the same fields that ``State`` turns into the custom states ``HOPPED`` (the result backend's state
too) and ``WAITING``. ``task-hopped`` carries the target's ``name`` and its queue as
``routing_key`` (the row says where the work went); ``task-waiting`` and ``task-retried`` carry
``eta``, the time the message comes back (ISO 8601, UTC, as Celery's own ``eta``): the row shows
when a delayed start, a held attempt or the next attempt is due. ``task-hopped`` sets ``exception``
and ``traceback`` to ``None``: the error that made the source give up is not the target's (it stays
in the bug-queue headers and the ``rare-*`` events).

Custom states rank with the ready states in ``State``'s precedence: a late ``task-started`` of the
same run cannot put the row back to ``STARTED``, and a row stays ``WAITING`` (its ``eta`` passed)
while the attempt that was due runs; its ``task-succeeded``, ``-failed``, ``-retried`` or another
ending moves it on.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

RETRY, BUGS, HOP, EXPIRED, WAIT = "rare-retry", "rare-bugs", "rare-hop", "rare-expired", "rare-wait"
PUT_BACK, LOST = "rare-put-back", "rare-lost"
BREAKER_OPEN, BREAKER_PROBE, BREAKER_CLOSE = "rare-breaker-open", "rare-breaker-probe", "rare-breaker-close"
LIMIT_START, LIMIT_STOP = "rare-limit-start", "rare-limit-stop"
BREAKER = {"open": BREAKER_OPEN, "probe": BREAKER_PROBE, "close": BREAKER_CLOSE}  # by change kind
TYPES = (RETRY, BUGS, HOP, EXPIRED, WAIT, PUT_BACK, LOST, BREAKER_OPEN, BREAKER_PROBE, BREAKER_CLOSE, LIMIT_START,
         LIMIT_STOP)
HOPPED_EVENT, WAITING_EVENT = "task-hopped", "task-waiting"
ERROR_CHARS = 200  # characters of the exception's message an event carries


def failure(exc: BaseException | None) -> dict[str, Any]:
    """The ``exception`` and ``error`` fields of an event about ``exc`` (see above)."""
    if exc is None:
        return {"exception": None, "error": None}
    return {"exception": f"{type(exc).__module__}.{type(exc).__qualname__}", "error": str(exc)[:ERROR_CHARS]}


def eta(at: float) -> str:
    """Epoch seconds as an event's ``eta``: ISO 8601 in UTC, as Celery writes a message's ``eta``."""
    return datetime.fromtimestamp(at, timezone.utc).isoformat()


def send(sender: Any, kind: str, task_id: str | None, name: str | None, **fields: Any) -> None:
    """Send event ``kind`` for ``task_id`` through ``sender(type, **fields)``, and the task event
    that goes with it (``task-hopped``, ``task-waiting``; see above)."""
    if kind == HOP:
        fields.setdefault("source", name)
    sender(kind, uuid=task_id, name=name, **fields)
    if kind == HOP:
        sender(HOPPED_EVENT, uuid=task_id, name=fields["target"], routing_key=fields["queue"], exception=None,
               traceback=None, **fields)
    elif kind == WAIT:
        due = {"eta": eta(fields["due"])} if fields.get("due") is not None else {}
        sender(WAITING_EVENT, uuid=task_id, name=name, **due, **fields)


def emit(task: Any, kind: str, task_id: str | None, **fields: Any) -> None:
    """From the pool process: send event ``kind`` for ``task_id`` if the worker sends task events;
    never raises."""
    if not getattr(task, "send_events", True) or not task.app.conf.worker_send_task_events:
        return
    try:
        with task.app.events.default_dispatcher(hostname=getattr(task.request, "hostname", None)) as dispatcher:
            send(dispatcher.send, kind, task_id, task.name, **fields)
    except Exception as exc:  # noqa: BLE001 - an event is a report; the message is safe either way
        log.warning("rare_celery: could not send the %s event for %s: %r", kind, task_id, exc)
