"""OpenTelemetry spans of the copies rare_celery publishes (rare_celery.spans), read with the SDK's
in-memory exporter: each copy that is new work carries its own producer span's context, a child of
the attempt's span (tests/integration/test_observers.py: the same through real workers)."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rare_celery import endings, spans
from rare_celery import headers as hdr
from rare_celery.exceptions import PublishRefused
from tests.unit.test_endings import held


@pytest.fixture
def exported(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(spans.trace, "get_tracer", lambda name, *a, **k: provider.get_tracer(name))
    monkeypatch.setattr(spans.trace, "get_tracer_provider", lambda: provider)  # spans are recorded (an SDK is set up)
    yield exporter, provider.get_tracer("test")
    provider.shutdown()


def parent_in(headers: dict) -> trace.SpanContext:
    return trace.get_current_span(propagate.extract(headers)).get_span_context()


def test_a_retry_published_inside_an_attempt_is_its_child_and_the_next_attempts_parent(exported):
    exporter, tracer = exported
    d = held({hdr.ATTEMPT: 1})
    ending = endings.retry(d, hdr.read(d.headers), 7.0, ConnectionError("down"))
    with tracer.start_as_current_span("run/endings-unit.t") as run, spans.publishing(ending):
        pass
    [publish] = [s for s in exporter.get_finished_spans() if s.name.startswith("rare.")]
    assert publish.name == "rare.retry/endings-unit.t" and publish.kind == trace.SpanKind.PRODUCER
    assert publish.parent.span_id == run.get_span_context().span_id
    assert publish.context.trace_id == run.get_span_context().trace_id
    assert dict(publish.attributes).items() >= {"rare.ending": "retry", "rare.attempt": 1, "rare.delay": 7.0,
                                                "rare.reason": "ConnectionError", "messaging.message.id": "id-1"}.items()
    assert parent_in(ending.copy.headers).span_id == publish.context.span_id  # attempt 2 hangs off it


def test_from_the_main_process_the_span_continues_the_messages_own_trace(exported):
    exporter, tracer = exported
    with tracer.start_as_current_span("apply_async/endings-unit.t") as sent:
        carried: dict = {}
        propagate.inject(carried)
    d = held({hdr.ATTEMPT: 1, **carried})
    ending = endings.wait(d, hdr.read(d.headers), due=d.headers.get(hdr.FIRST_AT, 0) + 10**10)
    with spans.publishing(ending):  # no span is current: a delayed start screened by the main process
        pass
    [publish] = [s for s in exporter.get_finished_spans() if s.name.startswith("rare.")]
    assert publish.name == "rare.wait/endings-unit.t" and publish.parent.span_id == sent.get_span_context().span_id
    assert publish.attributes["rare.reason"] == "not due" and publish.attributes["rare.delay"] > 0
    assert parent_in(ending.copy.headers).span_id == publish.context.span_id


def test_a_publish_that_fails_ends_its_span_with_the_error(exported):
    exporter, _ = exported
    d = held({hdr.ATTEMPT: 3})
    ending = endings.bugs(d, hdr.read(d.headers), "exhausted", ConnectionError("down"))
    with pytest.raises(PublishRefused), spans.publishing(ending):
        raise PublishRefused("nack")
    [publish] = exporter.get_finished_spans()
    assert publish.status.status_code == trace.StatusCode.ERROR and "nack" in publish.status.description
    assert publish.attributes["rare.reason"] == "exhausted" and publish.attributes["rare.attempt"] == 3


def test_a_put_back_is_the_same_message_and_keeps_its_context(exported):
    exporter, _ = exported
    ending = endings.put_back(held({"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}), "lost", count=1)
    with spans.publishing(ending):
        pass
    assert exporter.get_finished_spans() == ()
    assert ending.copy.headers["traceparent"].startswith("00-" + "a" * 32 + "-" + "b" * 16)


def test_without_a_tracer_provider_no_span_is_made_and_the_copy_keeps_its_trace_context(monkeypatch):
    """No OpenTelemetry SDK set up (the API's stand-in provider): nothing is done for a span, and the copy
    carries the trace context its original had (a retry costs its pool process nothing for spans)."""
    started = []
    monkeypatch.setattr(spans.trace, "get_tracer", lambda *a, **k: started.append(a))
    monkeypatch.setattr(spans.trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    d = held({hdr.ATTEMPT: 1, "traceparent": traceparent})
    ending = endings.retry(d, hdr.read(d.headers), 7.0, ConnectionError("down"))
    with spans.publishing(ending):
        pass
    assert started == [] and ending.copy.headers["traceparent"] == traceparent
