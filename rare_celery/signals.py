"""rare_celery's own signals (Celery ``Signal`` objects; Celery's own signals keep firing too).

Each is sent from the worker's pool process after the broker confirmed the publish it reports, so a
receiver cannot lose the message; a receiver that raises is logged and ignored. ``sender`` is the
task, ``request`` its Celery request (``request.id`` is the task id).

* ``attempt_started(sender, request, attempt)`` - attempt ``attempt`` is about to run (not sent for
  a message that arrived early and was sent round again, nor for one routed away unrun).
* ``retry_scheduled(sender, request, attempt, delay, exception)`` - attempt ``attempt`` failed with
  ``exception`` (``None`` for a bare ``self.retry()``); the next runs in ``delay`` seconds.
* ``routed_to_bugs(sender, request, reason, attempts, exception, queue)`` - the message is in the bug
  queue ``queue`` for ``reason`` after ``attempts`` attempts.
* ``expired(sender, request, deadline, attempts)`` - its shelf life ended (sent before
  ``routed_to_bugs`` or ``hopped``).
* ``hopped(sender, request, source, target, reason, queue)`` - the work moved from task ``source`` to
  task ``target`` on ``queue`` (a fallback, or an explicit ``Hop``).

>>> from rare_celery import signals
>>> @signals.routed_to_bugs.connect
... def page_someone(sender, request, reason, attempts, exception, queue, **kw):
...     print(f"{sender.name}[{request.id}] -> {queue}: {reason}")
"""

from celery.utils.dispatch import Signal

attempt_started = Signal(name="rare_attempt_started")
retry_scheduled = Signal(name="rare_retry_scheduled")
routed_to_bugs = Signal(name="rare_routed_to_bugs")
expired = Signal(name="rare_expired")
hopped = Signal(name="rare_hopped")

__all__ = ["attempt_started", "expired", "hopped", "retry_scheduled", "routed_to_bugs"]

# Circuit breakers (``breaker = "deepl"``): sent once per change, by the worker whose attempt made
# it (its main process); ``sender`` is the breaker's name, ``task_id`` the attempt's task.
#
# * ``breaker_opened(sender, breaker, gen, until, open_for, reopened, task_id)`` - attempts wait
#   until ``until`` (epoch s); ``reopened``: a probe failed (else: failures in a row tripped it);
#   with ``why`` when an attempt's RetryAfter held it open (an operator's pause sends only the event).
# * ``breaker_probe(sender, breaker, gen, task_id, worker)`` - one attempt probes the service.
# * ``breaker_closed(sender, breaker, gen, task_id)`` - the probe did not fail: attempts run again.
breaker_opened = Signal(name="rare_breaker_opened")
breaker_probe = Signal(name="rare_breaker_probe")
breaker_closed = Signal(name="rare_breaker_closed")
__all__ += ["breaker_closed", "breaker_opened", "breaker_probe"]

# Service limits (``service_rate``, ``service_concurrency``): sent by each worker that sees the change,
# from a thread of its main process; ``sender`` is the service's name.
#
# * ``limit_started(sender, service, waiting)`` - attempts of the service wait in its line (``waiting``).
# * ``limit_stopped(sender, service)`` - its line has been empty for a few seconds.
limit_started = Signal(name="rare_limit_started")
limit_stopped = Signal(name="rare_limit_stopped")
__all__ += ["limit_started", "limit_stopped"]
