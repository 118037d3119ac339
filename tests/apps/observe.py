"""The app of tests/integration/test_observers.py: what Flower and OpenTelemetry see of rare_celery.

Every worker process (the main one too: it sends delayed starts round) traces with
opentelemetry-instrumentation-celery and appends its finished spans to ``$RARE_TEST_DIR/spans.jsonl``.
"""

from __future__ import annotations

import json
import os

from celery import Celery, signals
from kombu import Queue

from rare_celery import RareTask

DIR = os.environ["RARE_TEST_DIR"]
SPANS = os.path.join(DIR, "spans.jsonl")

app = Celery("observe", broker=os.environ["RARE_TEST_BROKER"])
app.conf.update(
    task_default_queue="observe",
    task_queues=[Queue("observe"), Queue("observe.mail")],
    task_routes={"observe.email": {"queue": "observe.mail"}},
    worker_send_task_events=True,  # task_send_sent_event stays off (Celery's default): see README, "In Flower"
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(base=RareTask, name="observe.ping")
def ping():
    return "pong"


@app.task(base=RareTask, bind=True, name="observe.flaky", backoff=[1], max_attempts=3)
def flaky(self, fails: int = 1):
    if self.attempt <= fails:
        raise ConnectionError(f"gateway down (attempt {self.attempt})")
    return self.attempt


@app.task(base=RareTask, bind=True, name="observe.patient", backoff=[20], max_attempts=2)
def patient(self):
    if self.attempt == 1:
        raise ConnectionError("gateway down: back in 20 s")
    return self.attempt


@app.task(base=RareTask, bind=True, name="observe.sms", max_attempts=1, fallback="observe.email")
def sms(self, to: str):
    raise ConnectionError(f"no signal for {to}")


@app.task(base=RareTask, name="observe.email")
def email(to: str):
    return f"mailed {to}"


_TRACING: list[bool] = []  # set once per process; a forked pool process inherits it, working


def _traced(**_) -> None:
    if _TRACING:
        return
    _TRACING.append(True)
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.trace import set_tracer_provider

    class ToFile(SpanExporter):
        def export(self, spans):
            with open(SPANS, "a") as f:
                f.writelines(json.dumps({
                        "name": s.name, "kind": s.kind.name, "pid": os.getpid(), "start": s.start_time,
                        "trace": f"{s.context.trace_id:032x}", "span": f"{s.context.span_id:016x}",
                        "parent": f"{s.parent.span_id:016x}" if s.parent else None,
                        "attributes": dict(s.attributes or {})}, default=str) + "\n" for s in spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ToFile()))
    set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)


signals.worker_init.connect(_traced, weak=False)  # the main process: waits of delayed starts
signals.worker_process_init.connect(_traced, weak=False)  # each pool process: the runs and their endings
