"""What rare_celery needs from a Celery app: publisher confirms, JSON, its worker bootstep, and
Celery's ``expires`` folded into the deadline of every rare task message the app publishes; and what
it does not: Celery's native delayed delivery (5.5+), whose queues it keeps out of the app's vhost."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Any

from celery import signals

from . import headers as hdr
from .exceptions import ConfigurationError

log = logging.getLogger(__name__)


def setup_app(app: Any, *steps: Any) -> None:
    """Called when a RareTask is bound to ``app``: add the worker bootsteps ``steps``
    (:class:`rare_celery.worker.RareConsumerStep`, :class:`~rare_celery.worker.BreakerStep`,
    :class:`~rare_celery.worker.lines.LinesStep`), turn
    on confirms, fold ``expires`` into the deadline on publish, leave out Celery's native delayed
    delivery, and consume rare quorum work queues with an ``x-consumer-timeout`` that covers the
    longest hold (:mod:`rare_celery.locks`)."""
    if getattr(app, "_rare_setup", False):
        return
    app._rare_setup = True
    for step in steps:
        app.steps["consumer"].add(step)
    skip_native_delayed_delivery()
    if app.configured:
        enable_confirms(app)
    else:
        app.on_after_configure.connect(lambda sender, **kw: enable_confirms(sender), weak=False)

    def fold(sender: Any = None, headers: Any = None, properties: Any = None, **kw: Any) -> None:
        task = app.tasks.get(sender) if isinstance(sender, str) else None
        if task is not None and getattr(task, "rare_policy", None) is not None and isinstance(headers, dict):
            fold_expires(headers, properties)

    signals.before_task_publish.connect(fold, weak=False)

    def hold_limits(sender: Any = None, instance: Any = None, **kw: Any) -> None:  # after the consumer steps' __init__, before they start
        if getattr(instance, "app", None) is app:
            from .locks import set_consumer_timeouts

            set_consumer_timeouts(app)

    signals.celeryd_after_setup.connect(hold_limits, weak=False)


def skip_native_delayed_delivery() -> None:
    """Celery 5.5+ starts its ``DelayedDelivery`` consumer step in every worker with a quorum queue: it
    declares 28 ``celery_delayed_*`` quorum queues and exchanges in the vhost, and logs a warning for each
    direct exchange, whose queues it cannot serve. rare_celery never asks the broker to hold a message
    until a countdown or ETA (its retries wait in its own delay queues), and Celery publishes through that
    mechanism only to topic and fanout exchanges: the step is left out of a rare app's worker whose
    queues all have direct exchanges (Celery's default). Celery has no setting for this; the step's
    ``include_if`` is wrapped once, and answers as before for every other app."""
    try:
        from celery.worker.consumer.delayed_delivery import DelayedDelivery
    except ImportError:  # Celery < 5.5
        return
    if getattr(DelayedDelivery, "_rare_wrapped", False):
        return
    original = DelayedDelivery.include_if

    def include_if(self: Any, c: Any) -> bool:
        if getattr(c.app, "_rare_setup", False) and all(
                q.exchange is None or q.exchange.type == "direct" for q in c.app.amqp.queues.values()):
            return False
        return bool(original(self, c))

    DelayedDelivery.include_if = include_if
    DelayedDelivery._rare_wrapped = True


def fold_expires(headers: dict[str, Any], properties: dict[str, Any] | None = None) -> None:
    """A rare task message's Celery ``expires`` (header) becomes its ``x-rare-deadline`` (the earlier
    of the two), and the AMQP ``expiration`` goes: the broker never drops it, Celery never revokes
    it; past the deadline it is routed as ``expired`` (fallback or bug queue) like any shelf life."""
    if properties is not None:
        properties.pop("expiration", None)
    expires = headers.get("expires")
    if expires is None:
        return
    headers["expires"] = None
    try:
        when = datetime.fromisoformat(expires) if isinstance(expires, str) else expires
        if isinstance(when, datetime):
            when = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
        deadline = float(when)
        if not math.isfinite(deadline):
            raise ValueError(deadline)
    except (TypeError, ValueError):
        log.warning("rare_celery: ignored an expires that is not a time: %r", expires)
        return
    current = headers.get(hdr.DEADLINE)
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        deadline = min(deadline, current)
    headers[hdr.DEADLINE] = deadline


def enable_confirms(app: Any) -> None:
    """Turn on publisher confirms unless the app turned them off on purpose (then :func:`check` refuses)."""
    options = dict(app.conf.broker_transport_options or {})
    if "confirm_publish" not in options:
        options["confirm_publish"] = True
        app.conf.broker_transport_options = options


def pickles(kinds: Any) -> list[str]:
    """The entries of an accept list or serializer setting that mean pickle, by any of its names
    (``pickle``, ``application/x-python-serialize``, ...) as kombu normalises them."""
    from kombu.serialization import registry

    pickle_type = registry.name_to_type.get("pickle", "application/x-python-serialize")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or ())
    out = []
    for kind in kinds:
        text = str(kind)
        normal = registry.name_to_type.get(text, text)
        if normal == pickle_type or "pickle" in text.lower() or "python-serialize" in text.lower():
            out.append(text)
    return out


def check(app: Any) -> None:
    """Refuse to start a worker that could lose or unpickle messages; the error says what to change."""
    enable_confirms(app)
    if app.conf.broker_transport_options.get("confirm_publish") is not True:
        raise ConfigurationError(
            "rare_celery needs publisher confirms: remove confirm_publish=False from "
            "broker_transport_options (or set it to True)")
    from .topology import QUEUE_TYPE_SETTING, QUORUM

    if app.conf.get(QUEUE_TYPE_SETTING) not in (None, QUORUM):
        raise ConfigurationError(f"rare_celery: {QUEUE_TYPE_SETTING} is {app.conf.get(QUEUE_TYPE_SETTING)!r}; "
                                 f"set it to 'quorum' (every queue rare_celery owns is quorum: the choice for "
                                 f"clusters) or leave it unset")
    for setting in ("accept_content", "result_accept_content", "task_serializer", "result_serializer",
                    "event_serializer"):
        found = pickles(app.conf.get(setting))
        if found:
            raise ConfigurationError(f"rare_celery accepts JSON only: {setting} names pickle ({', '.join(found)}); "
                                     f"use 'json'")
