"""The Celery app of the fuzz test (tests/integration/test_fuzz.py): one RareTask on the rare work queue
``fuzz``, which records each run (its ``x-fuzz`` header: the generated case's number) in
``$RARE_TEST_DIR/fuzz-runs-<pid>.jsonl``."""

from __future__ import annotations

import json
import os

from celery import Celery
from kombu import Queue

from rare_celery import RareTask

DIR = os.environ["RARE_TEST_DIR"]
os.makedirs(os.path.join(DIR, "results"), exist_ok=True)

app = Celery("fuzz", broker=os.environ["RARE_TEST_BROKER"], backend=f"tests.support:AtomicFS+file://{DIR}/results")
app.conf.update(task_default_queue="fuzz", task_queues=[Queue("fuzz")], worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)


@app.task(base=RareTask, name="fuzz.work", bind=True, max_attempts=1, backoff=[1])
def work(self, *args, **kwargs):
    marker = (self.request.headers or {}).get("x-fuzz")
    with open(os.path.join(DIR, f"fuzz-runs-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps({"n": marker, "id": str(self.request.id)}) + "\n")
    return marker
