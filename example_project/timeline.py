"""Turns rare_celery's signals into Celery events, so the demo (or Flower) can show the timeline.

Celery already sends task-started/-succeeded/-failed/-retried; these add each attempt's number,
the delay of each retry, the hops and the bug-queue routing, as events ``rare-attempt``,
``rare-retry``, ``rare-hopped``, ``rare-bugs``."""

from __future__ import annotations

from rare_celery import signals


@signals.attempt_started.connect
def _attempt(sender, request, attempt, **kw):
    sender.send_event("rare-attempt", attempt=attempt)


@signals.retry_scheduled.connect
def _retry(sender, request, attempt, delay, exception, **kw):
    sender.send_event("rare-retry", attempt=attempt, delay=round(delay, 3), exception=repr(exception)[:200])


@signals.hopped.connect
def _hopped(sender, request, source, target, reason, queue, **kw):
    sender.send_event("rare-hopped", source=source, target=target, reason=reason, queue=queue)


@signals.routed_to_bugs.connect
def _bugs(sender, request, reason, attempts, exception, queue, **kw):
    sender.send_event("rare-bugs", reason=reason, attempts=attempts, queue=queue,
                      exception=repr(exception)[:200])
