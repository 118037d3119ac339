"""Exceptions a task raises to steer rare_celery, and the ones rare_celery raises."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Ignore, ImproperlyConfigured, Reject

from . import reasons


class Bug(Exception):
    """Raise from a task: no retries, the message goes straight to the bug queue (reason ``bug``)."""


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


class Ended(Ignore):
    """The message already has its next place (a confirmed copy); whatever failed afterwards in
    Celery's own bookkeeping, the worker acks it."""
