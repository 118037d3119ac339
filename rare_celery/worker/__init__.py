"""What runs in a worker's main process: it holds each message until its delivery has an ending.

* :mod:`~rare_celery.worker.bootsteps` - the consumer bootsteps: declarations at start and after every
  reconnect, the worker's context (:mod:`rare_celery.context`), breaker listening;
* :mod:`~rare_celery.worker.screen` - a look at each message of a rare task before Celery's: a
  redelivery, headers too deep, an early arrival, an open breaker, a bad message;
* :mod:`~rare_celery.worker.lines` - the services' lines: wakes the attempts their limits let start, and
  tells when a service starts and stops limiting;
* :mod:`~rare_celery.worker.request` - :class:`~rare_celery.worker.request.RareRequest`: the endings the
  pool process cannot make (a lost pool process, a hard time limit, a put-back, a requeue).
"""
