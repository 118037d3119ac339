"""The Celery app of the limits measurement (``bench/limits.py``), configured by environment variables.

``LIMITS_BROKER``   broker URL (the run's own vhost)
``LIMITS_DIR``      where every process appends its records (``rec-<pid>.txt``)
``LIMITS_RATE``     the service's rate, attempts a second (default 50)
``LIMITS_IN_FLIGHT`` the service's attempts in flight at most (default 3)
``LIMITS_WORKERS``  how many workers share the plain variant's per-worker ``rate_limit`` (default 2)

The fake service is the task's body: a request takes ``SERVICE_TIME`` (0.05 s); each one appends
``req <task id> <began> <ended> <pid> <status>`` to its process's record file. While the file
``busy`` exists in ``LIMITS_DIR``, the first request that finds it takes it away and is answered
429 with ``Retry-After: 10`` (``status`` 429).

* ``limits.rare`` on ``limits.rare``: a RareTask of the service ``svc`` with ``service_rate`` and
  ``service_concurrency``; a 429 raises ``RetryAfter.of(...)``;
* ``limits.plain`` on ``limits.plain``: a plain Celery task with ``rate_limit`` = the rate divided
  by the workers (Celery's rate limit is per worker); nothing limits the attempts in flight.
"""

from __future__ import annotations

import os
import time

from celery import Celery, Task
from kombu import Queue

from rare_celery import RareTask, RetryAfter

DIR = os.environ.get("LIMITS_DIR", "/tmp")
RATE = int(os.environ.get("LIMITS_RATE", "50"))
IN_FLIGHT = int(os.environ.get("LIMITS_IN_FLIGHT", "3"))
WORKERS = int(os.environ.get("LIMITS_WORKERS", "2"))
SERVICE_TIME = 0.05
RETRY_AFTER = 10

app = Celery("limits", broker=os.environ.get("LIMITS_BROKER", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(task_queues=[Queue("limits.rare"), Queue("limits.plain")], worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)


def serve(task_id: str) -> int:
    """One request to the fake service: 200, or 429 for the one that finds the ``busy`` file."""
    began = time.time()
    try:
        os.remove(os.path.join(DIR, "busy"))
        status = 429
    except FileNotFoundError:
        status = 200
        time.sleep(SERVICE_TIME)
    with open(os.path.join(DIR, f"rec-{os.getpid()}.txt"), "a") as f:
        f.write(f"req {task_id} {began:.6f} {time.time():.6f} {os.getpid()} {status}\n")
    return status


@app.task(base=RareTask, bind=True, name="limits.rare", queue="limits.rare", breaker="svc",
          service_rate=f"{RATE}/s", service_concurrency=IN_FLIGHT, max_attempts=5, backoff=1, expires_in=3600)
def rare(self, i: int) -> int:
    if serve(self.request.id) == 429:
        raise RetryAfter.of({"Retry-After": str(RETRY_AFTER)})
    return i


@app.task(base=Task, bind=True, name="limits.plain", queue="limits.plain", rate_limit=f"{RATE / WORKERS:g}/s",
          acks_late=True)
def plain(self, i: int) -> int:
    serve(self.request.id)
    return i
