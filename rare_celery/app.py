"""What rare_celery needs from a Celery app: publisher confirms, JSON, and its worker bootstep."""

from __future__ import annotations

import logging

from .exceptions import ConfigurationError

log = logging.getLogger(__name__)


def setup_app(app) -> None:
    """Called when a RareTask is bound to ``app``: add the worker bootstep, turn on confirms."""
    if getattr(app, "_rare_setup", False):
        return
    app._rare_setup = True
    from .worker import RareConsumerStep

    app.steps["consumer"].add(RareConsumerStep)
    if app.configured:
        enable_confirms(app)
    else:
        app.on_after_configure.connect(lambda sender, **kw: enable_confirms(sender), weak=False)


def enable_confirms(app) -> None:
    """Turn on publisher confirms unless the app turned them off on purpose (then :func:`check` refuses)."""
    options = dict(app.conf.broker_transport_options or {})
    if "confirm_publish" not in options:
        options["confirm_publish"] = True
        app.conf.broker_transport_options = options


def check(app) -> None:
    """Refuse to start a worker that could lose or unpickle messages; the error says what to change."""
    enable_confirms(app)
    if app.conf.broker_transport_options.get("confirm_publish") is not True:
        raise ConfigurationError(
            "rare_celery needs publisher confirms: remove confirm_publish=False from "
            "broker_transport_options (or set it to True)")
    for setting in ("accept_content", "result_accept_content"):
        value = app.conf.get(setting) or ()
        if any("pickle" in str(kind) for kind in value):
            raise ConfigurationError(f"rare_celery accepts JSON only: remove pickle from {setting} ({list(value)})")
    for setting in ("task_serializer", "result_serializer"):
        if app.conf.get(setting) == "pickle":
            raise ConfigurationError(f"rare_celery accepts JSON only: set {setting} = 'json'")
