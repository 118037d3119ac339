"""``rare-celery web`` and ``rare-celery metrics``: the console served by waitress until Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

import click

DEFAULT_PORT, METRICS_PORT = 5580, 5581
THREADS = 8
if TYPE_CHECKING:
    from collections.abc import Callable

    from flask import Flask

    from .console import Console
    from .metrics import EventCounter

NEEDS = 'the web console needs its extra: pip install "rare-celery[web]"'


def build(e: Any, auth: tuple[str, str] | None, loopback: bool, pages: bool = True, events: bool = True
          ) -> tuple[Flask, Console, EventCounter | None]:
    """The WSGI app for the CLI's :class:`~rare_celery.tools.cli.Env` ``e``, and what to stop at the end."""
    from ...topology import delay_kind
    from .. import bugs
    from .app import create_app
    from .console import Console
    from .metrics import Counters, EventCounter, registry
    from .security import Guard

    where = e._connection().as_uri()  # password masked
    console = Console(e._connection, e.app, where)
    counters = Counters((lambda queue: (delay_kind(e.app, queue),)) if e.app is not None else None)
    console.seen_delays = counters.delays
    receiver = None
    if events:
        app = e.app if e.app is not None else _plain_app(e.broker)
        connect = lambda: app.connection_for_read(e.broker, heartbeat=bugs.HEARTBEAT)
        receiver = EventCounter(app, counters, connect).start()
    guard = Guard(auth, loopback, pages)
    wsgi = create_app(console, guard, registry(console, counters), pages=pages)
    return wsgi, console, receiver


def _plain_app(broker: str | None) -> Any:
    from celery import Celery

    return Celery("rare-celery-web", broker=broker, set_as_current=False)


def serve(e: Any, bind: str, port: int, auth_text: str | None, pages: bool, fail: Callable[[str], Exception]) -> None:
    try:
        import flask  # noqa: F401
        import prometheus_client  # noqa: F401
        import waitress  # noqa: F401
    except ImportError as exc:
        raise fail(f"{NEEDS} ({exc.name} is missing)") from None
    from waitress.server import create_server

    from .security import BadSetting, check_bind, is_loopback, parse_auth

    try:
        auth = parse_auth(auth_text)
        check_bind(bind, auth)
    except BadSetting as exc:
        raise fail(str(exc)) from None
    e.breakers()  # tasks that share a breaker set up differently: one line, as from status
    with e.connection():  # the broker answers (or one line saying why not)
        pass
    wsgi, console, receiver = build(e, auth, is_loopback(bind), pages=pages)
    try:
        server = create_server(wsgi, host=bind, port=port, threads=THREADS, ident="rare-celery",
                               clear_untrusted_proxy_headers=True)
    except OSError as exc:
        raise fail(f"cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
    host = f"[{bind}]" if ":" in bind else bind
    what = "web console" if pages else "metrics"
    token = wsgi.extensions["rare_celery_guard"].token
    path = ("/" + (f"?token={token}" if token else "")) if pages else "/metrics"
    app_name = f", app {e.app.main}" if e.app is not None else ""
    click.echo(f"rare-celery {what}: http://{host}:{server.effective_port}{path} (broker {console.where}{app_name}"
               f"{', basic auth' if auth else ''}); Ctrl-C stops it", err=False)
    if pages and e.app is None:
        click.echo(f"rare-celery {what}: without -A it can read, requeue from and purge any queue of {console.where}, "
                   f"live work queues included (-A APP limits it to the app's bug queues)", err=True)
    sys.stdout.flush()

    stopping = threading.Event()

    def stop(signum: int | None = None, frame: Any = None) -> None:
        if not stopping.is_set():
            stopping.set()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            server.close()
        if receiver is not None:
            receiver.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        click.echo(f"rare-celery {what}: stopped", err=True)
