"""OpenTelemetry spans for the copies rare_celery publishes, so a trace reads as a causal chain.

Optional: without ``opentelemetry-api`` installed, nothing here does anything.

opentelemetry-instrumentation-celery makes a ``run/<task>`` span of every run, a child of the trace
context the message carries (``traceparent`` in its headers, put there by ``apply_async/<task>``).
A copy keeps its original's headers, so without more every attempt, wait and hop would hang off the
first publish as siblings. So each copy that is new work (:data:`rare_celery.endings.NEW_WORK`: a
retry, a wait, a hop, a bug-queue copy) is published inside a producer span, and carries that
span's context:

    apply_async/sms.send -> run/sms.send (attempt 1) -> rare.retry/sms.send -> run/sms.send (attempt 2)
                         -> rare.hop/sms.send -> run/email.send

The span is a child of the span current where the ending is made (the attempt's ``run/<task>`` in
the pool process), else of the context in the message's headers (the worker's main process: an
early arrival, a breaker's hold, a lost attempt). It ends when the broker has confirmed the copy
(or the publish failed: status ERROR). Attributes: ``rare.ending``, ``rare.attempt``,
``rare.delay`` (s, retries and waits), ``rare.reason``, ``rare.queue`` (where the copy goes),
``celery.task_name``, ``messaging.message.id`` (the task id). Every attempt's own run span gets
``rare.attempt`` (:func:`mark_attempt`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from .endings import HOP, NEW_WORK, RETRY, WAIT, Ending

try:
    import opentelemetry.propagate as propagate  # noqa: PLR0402 - mypy resolves the namespace package this way only
    import opentelemetry.trace as trace  # noqa: PLR0402
except ImportError:  # pragma: no cover - opentelemetry is optional
    propagate = trace = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def mark_attempt(number: int) -> None:
    """Put the attempt's number on the current span (the attempt's ``run/<task>``). Never raises."""
    if not _recording():
        return
    try:
        trace.get_current_span().set_attribute("rare.attempt", number)
    except Exception as exc:  # noqa: BLE001 - a span is a report
        log.debug("rare_celery: could not mark the attempt on its span: %r", exc)


@contextlib.contextmanager
def publishing(ending: Ending) -> Iterator[None]:
    """Publish ``ending``'s copy inside its producer span (see above): the copy's headers carry the
    span's context once this is entered. Exceptions pass through, recorded on the span."""
    span = _start(ending) if ending.copy is not None and ending.kind in NEW_WORK and _recording() else None
    if span is None:
        yield
        return
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        with contextlib.suppress(Exception):
            span.end()


def _recording() -> bool:
    """Whether spans are recorded here: an OpenTelemetry SDK (or another tracer provider) is set up. Without
    one every span is a stand-in and the copy keeps the trace context it carries already: nothing to do."""
    return trace is not None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _start(ending: Ending) -> Any:
    """The producer span of ``ending``'s copy, started, its context written into the copy's headers;
    ``None`` if that failed (logged: the copy keeps the context it had)."""
    assert trace is not None and propagate is not None and ending.copy is not None
    d, copy = ending.delivery, ending.copy
    try:
        current = trace.get_current_span()
        parent = None if current.get_span_context().is_valid else propagate.extract(dict(d.headers or {}))
        attributes = {"rare.ending": ending.kind, "rare.queue": copy.target.name if copy.target else copy.routing_key,
                      "celery.task_name": d.task_name or "", "messaging.message.id": d.task_id or ""}
        attributes.update(_details(ending))
        span = trace.get_tracer(__name__).start_span(f"rare.{ending.kind}/{d.task_name}", context=parent,
                                                     kind=trace.SpanKind.PRODUCER, attributes=attributes)
        propagate.inject(copy.headers, context=trace.set_span_in_context(span))
        return span
    except Exception as exc:  # noqa: BLE001 - a span is a report; the copy is what counts
        log.warning("rare_celery: could not start the span of %s's %s: %r", d.task_id, ending.kind, exc)
        return None


def _details(ending: Ending) -> dict[str, Any]:
    """``rare.attempt``, ``rare.delay`` and ``rare.reason`` of an ending, where it has them."""
    f, exc = ending.fields, ending.exc
    if ending.kind == RETRY:
        return {"rare.attempt": f["attempt"], "rare.delay": float(f["delay"]),
                "rare.reason": type(exc).__name__ if exc is not None else "retry"}
    if ending.kind == WAIT and "line" in f:
        return {"rare.reason": f"{f['line']} {f['limit']} limit"}
    if ending.kind == WAIT:
        return {"rare.delay": max(0.0, float(f["due"]) - time.time()),
                "rare.reason": f"breaker {f['breaker']}" if "breaker" in f else "not due"}
    if ending.kind == HOP:
        return {"rare.reason": str(f["reason"]), "rare.hop_target": str(f["target"])}
    return {"rare.reason": str(f["reason"]), "rare.attempt": int(f["attempts"])}
