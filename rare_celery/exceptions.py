"""Exceptions a task raises to steer rare_celery, and the ones rare_celery raises."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any

from celery.exceptions import Ignore, ImproperlyConfigured, Reject, Retry

from . import reasons


class Bug(Exception):
    """Raise from a task: no retries, the message goes straight to the bug queue (reason ``bug``)."""


class RetryAfter(Exception):
    """Raise from a task when the service asks for a pause (an HTTP 429 or 503 with ``Retry-After``).

    The attempt counts as failed, whatever ``retry_on`` says, and the next one waits ``seconds``
    instead of the backoff's delay (attempt limit and shelf life as for any retry). With a
    ``breaker``, the service pauses for every worker: its breaker is held open ``seconds``, so no
    attempt of any task that names it runs until then, and one probe goes first after it.
    ``RetryAfter.of(response)`` reads the header from a requests or httpx response (or a mapping of
    headers): ``raise RetryAfter.of(resp)`` after ``resp.status_code in (429, 503)``.
    """

    def __init__(self, seconds: float, message: str = "") -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_PAUSE:
            raise ValueError(f"RetryAfter: seconds must be a number from 0 to {MAX_PAUSE:g} (30 days), "
                             f"got {seconds!r:.80}")
        self.seconds = float(seconds)
        super().__init__(message or f"the service asked for a pause of {self.seconds:g} s")

    @classmethod
    def of(cls, response: Any, default: float = 60.0) -> RetryAfter:
        """The pause a response asks for: its ``Retry-After`` (seconds, or an HTTP date), else
        ``default`` seconds; the message names the status and the header as they came."""
        headers = getattr(response, "headers", response)
        value = None
        if headers is not None:
            value = headers.get("Retry-After")
            if value is None and isinstance(headers, dict):
                value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
        seconds = retry_after_seconds(value)
        status = getattr(response, "status_code", None)
        said = f"Retry-After: {str(value)[:40]}" if value is not None else "no Retry-After"
        return cls(default if seconds is None else seconds,
                   f"{f'HTTP {status}: ' if status is not None else ''}{said} (a pause of "
                   f"{default if seconds is None else seconds:g} s)")


MAX_PAUSE = 30 * 86_400.0  # the longest pause RetryAfter asks for


def retry_after_seconds(value: object, now: float | None = None) -> float | None:
    """An HTTP ``Retry-After`` value in seconds from ``now``: a number of seconds, or an HTTP date
    (at least 0); at most :data:`MAX_PAUSE`. ``None`` when it is neither."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    if text.isdigit():
        return min(float(text), MAX_PAUSE)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    at = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - at), MAX_PAUSE)


class Expired(Exception):
    """The task's shelf life ended before it could succeed (reason ``expired``)."""


class WorkerLost(Exception):
    """The message came back unacked (its worker died or lost its connection): a failed attempt."""


class Exhausted(Exception):
    """``retry()`` was called without an exception and the task has no attempts left."""


class PublishRefused(Exception):
    """The broker did not confirm a delay, bug-queue or hop publish; the original message is kept.

    ``transient``: a nack or a lost connection, worth trying again; otherwise the message itself
    could not be published (the worker requeues it instead). ``task_ids``: from
    :func:`rare_celery.bulk`, the tasks the broker did not confirm."""

    def __init__(self, message: str, transient: bool = False, task_ids: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.transient = transient
        self.task_ids = list(task_ids)


class ConfirmMissing(PublishRefused):
    """The broker took a publish and did not confirm it in time, or the connection failed before it
    did: the copy may be in its queue or not. It is never published again to find out (that could
    make two copies); the original message is kept, and may run twice (at least once)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} (the message is kept: it may run twice)")


class TopologyError(ImproperlyConfigured):
    """A broker object exists with other arguments than rare_celery needs (the text says how to fix it)."""


class ConfigurationError(ImproperlyConfigured):
    """The app is configured in a way rare_celery cannot work with (the text says what to change)."""


class Hop(Exception):
    """Raise from a task to move the work to another task now: ``raise Hop("billing.notify", sub_id,
    reason="card expired")``. Without arguments the current ones go along. The target runs on its own
    queue with its own policy and a fresh attempt count; the task id stays the same."""

    def __init__(self, target: object, *args: Any, reason: str = "", **kwargs: Any) -> None:
        super().__init__(target, reason)
        self.target, self.args, self.kwargs, self.reason = target, args, kwargs, reason


class NoHandler(Bug):
    """A payload with no handler for its kind (reason ``no_handler``)."""

    rare_reason = reasons.NO_HANDLER


class HopLimit(Bug):
    """A hop that would loop (a -> b -> a) or pass ``max_hops`` (reason ``hop_limit``)."""

    rare_reason = reasons.HOP_LIMIT


class RoutingFailed(Reject):
    """Raised in the pool process when the copy a decision needs could not be made or published.

    The original message is not acked: the worker's main process puts it back in its queue with
    one more ``x-rare-deliveries`` (or, past the limit, copies it to the bug queue as ``unroutable``).
    A ``Reject(requeue=True)``, so even a plain Celery request class would keep the message."""

    def __init__(self, why: str) -> None:
        super().__init__(why, requeue=True)
        self.why = why

    def __reduce__(self) -> tuple[type[RoutingFailed], tuple[str]]:  # crosses from the pool process to the main process
        return type(self), (self.why,)


class Handed(Retry):
    """A pool process's retry whose copy is not published yet: it goes with this outcome to the worker's
    main process, which publishes it (confirms pipelined, :mod:`rare_celery.pipeline`) and acks the
    original only once the broker confirmed the copy (:class:`rare_celery.worker.request.RareRequest`).
    ``copy``: the :class:`~rare_celery.publish.Copy`; ``kind`` and ``fields``: what its report says. Made
    from the pool process's ``Retry`` by :meth:`of`."""

    copy: Any
    kind: str
    fields: dict[str, Any]

    def __reduce__(self) -> tuple[Any, ...]:  # crosses from the pool process to the main process
        return _handed_again, (type(self), {k: v for k, v in vars(self).items() if k != "args"})

    @classmethod
    def of(cls, retry: Retry, copy: Any, kind: str, fields: dict[str, Any]) -> Handed:
        """``retry``, carrying its copy, its attributes as they are (``Retry.__init__`` would test once
        more that the exception pickles, by pickling it)."""
        return _handed_again(cls, {**vars(retry), "copy": copy, "kind": kind, "fields": fields})


def _handed_again(cls: type[Handed], attributes: dict[str, Any]) -> Handed:
    """A :class:`Handed` with these attributes, made without ``Retry.__init__`` (in the worker's main
    process too, where it would pickle the exception once more)."""
    handed = cls.__new__(cls)
    handed.__dict__.update(attributes)
    handed.args = (handed, handed.exc, handed.when)  # as Retry.__init__ makes them
    return handed


class Ended(Ignore):
    """The message already has its next place (a confirmed copy); whatever failed afterwards in
    Celery's own bookkeeping, the worker acks it."""
