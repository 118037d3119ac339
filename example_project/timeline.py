"""One Celery event of the demo's own, from a rare signal: ``rare-attempt`` when an attempt starts.

rare_celery itself sends its decisions as Celery events when the worker sends task events
(``rare-retry``, ``rare-bugs``, ``rare-hop``, ``rare-expired``, ``rare-wait``; see
:mod:`rare_celery.events`), and Celery sends ``task-started``/``-succeeded``/``-failed``/``-retried``:
the demo's timeline reads those. Only the attempt number of a run is not in any of them, so the
demo adds it here, the way an app adds events of its own.
"""

from __future__ import annotations

from rare_celery import signals


@signals.attempt_started.connect
def _attempt(sender, request, attempt, **kw):
    sender.send_event("rare-attempt", attempt=attempt)
