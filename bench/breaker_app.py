"""The Celery app of the outage measurement (``bench/breaker.py``), configured by environment variables.

``BREAKER_BROKER``  broker URL (the run's own vhost)
``BREAKER_URL``     the fake translation service's ``POST`` URL (the runner serves it)
``BREAKER_DIR``     where every process appends its records (``rec-<pid>.txt``)

Two RareTasks, identical but for the circuit breaker, each on its own queue, both with the production
translate policy of ``example_project/settings.py`` (copied here, so the example's edits do not move it):

* ``bench.translate_breaker`` on ``translate.breaker``: ``breaker="deepl"``, the breaker's defaults
  (5 failures in a row within 60 s open it, 30 s open, doubled after each failed probe up to 300 s);
* ``bench.translate_plain`` on ``translate.plain``: no breaker.

Each attempt is one HTTP ``POST`` (urllib, timeout 5 s); 5xx, 429, refused or timed out raise the
retryable ``Unavailable``. Records, one line each, written by the process itself:

* ``ok <task id> <time> <pid>`` - an attempt succeeded (nothing is written for a failed attempt:
  the service counts requests);
* ``ready <worker name> <pid> <time>`` - the worker's main process can take tasks;
* ``breaker <open|probe|close> <gen> <time> <until|-> <task id|->`` - a breaker change, from the
  main process of the worker whose attempt made it (``rare_celery.signals``).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from datetime import timedelta

from celery import Celery
from celery import signals as celery_signals
from kombu import Queue

from bench.apps import Recorder
from rare_celery import Bug, RareTask, backoff, signals

QUEUES = {"breaker": "translate.breaker", "plain": "translate.plain"}
TASKS = {"breaker": "bench.translate_breaker", "plain": "bench.translate_plain"}
BREAKER = "deepl"
# example_project/settings.py PRODUCTION["translate"], without the breaker options (the defaults are the same)
POLICY = {"max_attempts": None, "expires_in": timedelta(hours=2),
          "backoff": backoff.jitter(backoff.manual([5, 10, 20, 30, 60, 120, 300, 600]), 0.2)}
TIMEOUT = 5.0


class Unavailable(Exception):
    """The translation service is down (HTTP 5xx or 429, refused or timed out): retry later."""


def post(url: str, text: str, target_lang: str) -> str:
    """One request to the translation service: its translation, or ``Unavailable`` / ``Bug``."""
    request = urllib.request.Request(
        url, data=json.dumps({"text": [text], "target_lang": target_lang}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.load(response)["translations"][0]["text"]
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise Unavailable(f"translation service answered {exc.code}") from None
        raise Bug(f"translation service refused the request: {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise Unavailable(f"translation service unreachable: {exc}") from None


def make_app(broker: str, url: str, directory: str) -> Celery:
    app = Celery("bench-breaker", broker=broker, set_as_current=False)
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES.values()],
        task_default_queue=QUEUES["plain"],
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
    )
    recorder = Recorder(directory)

    def translate(self, text: str, target_lang: str) -> str:
        out = post(url, text, target_lang)
        recorder.write(f"ok {self.request.id} {time.time():.6f} {os.getpid()}")
        return out

    options = {"base": RareTask, "bind": True, "shared": False, "retry_on": (Unavailable,), **POLICY}
    app.task(name=TASKS["breaker"], queue=QUEUES["breaker"], breaker=BREAKER, **options)(translate)
    app.task(name=TASKS["plain"], queue=QUEUES["plain"], **options)(translate)
    app.bench_recorder = recorder
    return app


def _from_env() -> Celery | None:
    if "BREAKER_BROKER" not in os.environ:
        return None
    bench = make_app(os.environ["BREAKER_BROKER"], os.environ["BREAKER_URL"], os.environ["BREAKER_DIR"])
    recorder = bench.bench_recorder

    @celery_signals.worker_ready.connect(weak=False)
    def ready(sender=None, **kwargs):
        recorder.write(f"ready {getattr(sender, 'hostname', '?')} {os.getpid()} {time.time():.6f}")

    def change(kind):
        def receiver(sender=None, gen=None, until=None, task_id=None, **kwargs):
            until_text = f"{until:.6f}" if isinstance(until, (int, float)) else "-"
            recorder.write(f"breaker {kind} {gen} {time.time():.6f} {until_text} {task_id or '-'}")
        return receiver

    signals.breaker_opened.connect(change("open"), weak=False)
    signals.breaker_probe.connect(change("probe"), weak=False)
    signals.breaker_closed.connect(change("close"), weak=False)
    return bench


app = _from_env()
