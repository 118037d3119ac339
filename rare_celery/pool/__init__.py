"""What runs in a worker's pool process (and in an eager run): one attempt of a RareTask.

* :mod:`~rare_celery.pool.attempt` - admission (nonsense headers, a copy of a success, early, expired,
  an open breaker), the attempt, ``retry()``, and :func:`~rare_celery.pool.attempt.end`: the pool
  process's way out of a delivery, through :mod:`rare_celery.endings`;
* :mod:`~rare_celery.pool.tracer` - Celery's tracer for a RareTask, guarded: a delivery without an
  ending goes back to the main process as ``RoutingFailed``;
* :mod:`~rare_celery.pool.eager` - ``task.apply()`` and ``task_always_eager``: the policy without the waits.
"""
