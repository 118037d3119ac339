"""The app's circuit breakers as ``rare-celery status``, the console and ``/metrics`` show them: each
one's state as the broker keeps it, its settings, and the tasks that use it.

The state is the last state note in ``rare.breaker.<name>`` (:mod:`rare_celery.breaker_io`), read
without declaring anything: a passive declare (no such queue: the breaker never opened), then its
one message with ``basic.get``, put straight back. Everything in a note came from whoever may
publish to ``rare.breakers``: the worker name and the task id are shown as untrusted text (the CLI's
``say``, the console's ``shown`` and Jinja's escaping), and a note that is not a valid one (checked
as the workers check it, :func:`rare_celery.breaker.note_problem`) is shown as the state
``unknown``, with why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, NamedTuple

from amqp.exceptions import ChannelError

from .. import breaker as br
from .. import events, limits_io
from ..breaker_io import announce, last_note
from ..inventory import RareTaskInfo, breakers
from . import durations

log = logging.getLogger(__name__)
UNKNOWN = "unknown"  # the state when the note could not be read, or is not a note
PHASE_VALUES = {br.CLOSED: 0, br.OPEN: 1, br.PROBING: 2}  # rare_breaker_state
HEADER = f"{'BREAKER':<24} {'STATE':<52} {'OPEN PERIODS':>12}  TASKS"
INDENT = " " * 25


class Use(NamedTuple):
    """One breaker of an app: its settings and the rare tasks that name it."""

    settings: br.Settings
    tasks: tuple[str, ...]


Uses = dict[str, Use]


class Reading(NamedTuple):
    """What the broker keeps of one breaker: its state (``None``: it never opened), the worker that
    announced it (the note's ``by``), or why it could not be read (``problem``)."""

    state: br.State | None
    worker: str | None = None
    problem: str | None = None


def uses(app: Any, tasks: list[RareTaskInfo], queues: Iterable[str] = ()) -> Uses:
    """The breakers the rare ``tasks`` of ``app`` name (with ``queues``: those used by a task of one
    of them), by name; ``{}`` when none does. Raises ConfigurationError as
    :func:`rare_celery.inventory.breakers` does."""
    queues = set(queues)
    found: dict[str, list[RareTaskInfo]] = {}
    for t in tasks:
        if getattr(t.task, "rare_breaker", None) is not None:
            found.setdefault(t.task.breaker, []).append(t)
    wanted = {name: users for name, users in found.items() if not queues or any(t.queue in queues for t in users)}
    if not wanted:
        return {}
    settings = breakers(app)
    return {name: Use(settings[name], tuple(sorted(t.name for t in users))) for name, users in sorted(wanted.items())}


def read(conn: Any, name: str) -> Reading:
    """Breaker ``name``'s last state note, read from the broker and put back (see the module's docstring)."""
    try:
        note, problem = last_note(conn, name)
    except ChannelError as exc:  # refused, say: the other breakers and the queues are still shown
        return Reading(None, problem=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200])
    return reading(note, problem)


def reading(note: dict[str, Any] | None, problem: str | None) -> Reading:
    """A state note (checked: :func:`rare_celery.breaker_io.state_note`) as a reading."""
    if note is None:
        return Reading(None, problem=problem)
    return Reading(br.from_note(note), note.get("by") or None)


def report(conn: Any, breaker_uses: Uses) -> list[dict[str, Any]]:
    """One row per breaker, by name: what ``status --json`` and ``/api/overview`` give as ``breakers``."""
    return [{**row(name, use, read(conn, name)), **usage(conn, name, use.settings)}
            for name, use in sorted(breaker_uses.items())]


def usage(conn: Any, name: str, settings: br.Settings) -> dict[str, Any]:
    """How much of a service's limits is in use now: ``in_flight`` (slots held), ``in_window`` (the
    places taken in its rate's window) and ``waiting`` (attempts in its line); ``None`` without that
    limit or when the broker could not say (:mod:`rare_celery.limits_io`)."""
    out: dict[str, Any] = {"in_flight": None, "in_window": None, "waiting": None}
    if settings.concurrency is not None:
        out["in_flight"] = limits_io.in_flight(conn, name, settings.concurrency)
    if settings.rate is not None:
        out["in_window"] = limits_io.in_window(conn, name, settings.rate)
    if settings.concurrency is not None or settings.rate is not None:
        out["waiting"] = limits_io.waiting(conn, name)
    return out


def row(name: str, use: Use, reading: Reading) -> dict[str, Any]:
    """A breaker's row: ``state`` (closed, open, probing, unknown), ``gen`` (its open periods so far),
    ``since`` (when that state began, epoch s), ``until`` (an open one's probe time), ``open_for``,
    ``worker`` (who announced the state: for probing, the worker probing) and ``task`` (the attempt's
    task id), ``problem``, ``settings`` and ``tasks``."""
    state = br.current(reading.state or br.State(name), time.time())
    return {"breaker": name, "state": UNKNOWN if reading.problem else state.phase,
            "gen": None if reading.problem else state.gen,
            "since": state.since, "until": state.until, "open_for": state.open_for, "worker": reading.worker,
            "task": state.task, "why": state.why if state.phase == br.OPEN else None, "problem": reading.problem,
            "settings": {"failures": use.settings.failures, "within": use.settings.within,
                         "open_for": use.settings.open_for, "max_open": use.settings.max_open,
                         "rate": list(use.settings.rate) if use.settings.rate else None,
                         "concurrency": use.settings.concurrency},
            "tasks": list(use.tasks)}


# -- the operator's lever: pause and resume a service, fleet-wide ----------------------------------

def pause(app: Any, conn: Any, name: str, seconds: float, why: str, by: str) -> br.State:
    """Hold every attempt of service ``name`` for ``seconds``, on every worker: its breaker held open
    (:func:`rare_celery.breaker.paused`), with ``why`` and ``by`` recorded in its state note, and a
    ``rare-breaker-open`` event. Raises RuntimeError when the state cannot be read or the note was
    not confirmed."""
    held = br.paused(_known(conn, name), seconds, f"paused: {why}" if why else "paused", time.time())
    _announce(app, held, by)
    return held


def resume(app: Any, conn: Any, name: str, by: str) -> br.State | None:
    """Let service ``name``'s attempts run again now: its breaker closed, whatever held it open (a
    pause, a Retry-After, failures). ``None``: it was closed already."""
    known = _known(conn, name)
    if known.phase == br.CLOSED:
        return None
    closed = br.resumed(known, time.time())
    _announce(app, closed, by)
    return closed


def _known(conn: Any, name: str) -> br.State:
    note, problem = last_note(conn, name)
    if problem:
        raise RuntimeError(f"breaker {name}: {problem}; nothing was changed")
    return br.from_note(note) if note is not None else br.State(name)


def _announce(app: Any, state: br.State, by: str) -> None:
    note = state.as_note(by)
    if not announce(app, note):
        raise RuntimeError(f"breaker {state.name}: the broker did not confirm the {note['kind']} note; "
                           f"nothing was changed")
    fields = {"breaker": state.name, "gen": state.gen, "by": by}
    if state.phase == br.OPEN:
        fields.update(until=state.until, open_for=state.open_for, reopened=False, why=state.why)
    try:  # the workers report the changes they make; an operator's change is reported here, once
        with app.events.default_dispatcher() as dispatcher:
            dispatcher.send(events.BREAKER[note["kind"]], uuid=None, name=None, **fields)
    except Exception as exc:  # noqa: BLE001 - the change is made; its event is a report
        log.warning("rare_celery: could not send the event of breaker %s %s: %r", state.name, note["kind"], exc)


# -- as text: pure, for the CLI (which escapes each line) and the console's templates -------------

def settings_text(settings: dict[str, Any]) -> str:
    """``trips after 5 failures in 1m, open 30s, at most 5m``."""
    n = settings["failures"]
    text = (f"trips after {n} failure{'' if n == 1 else 's'} in {durations.short(settings['within'])}, "
            f"open {durations.short(settings['open_for'])}, at most {durations.short(settings['max_open'])}")
    if settings.get("rate"):
        count, window = settings["rate"]
        text += f"; at most {count} attempts a {durations.short(window) if window != 1 else 'second'}"
    if settings.get("concurrency"):
        text += f"; at most {settings['concurrency']} at once"
    return text


def utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def relative(epoch: float, now: float) -> str:
    """``in 25s``, ``3m ago``, ``now``."""
    delta = round(epoch - now)
    if not delta:
        return "now"
    return f"in {durations.short(delta)}" if delta > 0 else f"{durations.short(-delta)} ago"


def when(epoch: float, now: float) -> str:
    return f"{utc(epoch)} ({relative(epoch, now)})"


def state_text(r: dict[str, Any], now: float) -> str:
    """A row's state in words: ``open until 2024-05-01 12:00:30 UTC (in 25s)``, ``probing since ...``,
    ``closed since ...``, ``closed (never opened)``, ``unknown (why)``."""
    state, since, until = r["state"], r["since"], r["until"]
    if state == UNKNOWN:
        return f"unknown ({r['problem']})"
    if state == br.OPEN:
        if until is None:
            return "open"
        held = f" ({r['why']})" if r.get("why") else ""
        return f"open until {when(until, now)}{held}" + (": the next attempt probes" if until <= now else "")
    if state == br.PROBING:
        return f"probing since {when(since, now)}" if since is not None else "probing"
    if not r["gen"]:
        return "closed (never opened)"
    return f"closed since {when(since, now)}" if since is not None else "closed"


def usage_text(r: dict[str, Any]) -> str:
    """``now: 2 of 3 in flight, 17 of 20 in the last 1s``, or ``""`` for a service without limits."""
    parts, settings = [], r["settings"]
    if settings.get("concurrency"):
        held = "?" if r.get("in_flight") is None else r["in_flight"]
        parts.append(f"{held} of {settings['concurrency']} in flight")
    if settings.get("rate"):
        count, window = settings["rate"]
        used = "?" if r.get("in_window") is None else r["in_window"]
        parts.append(f"{used} of {count} in the last {durations.short(window)}")
    if parts:
        parts.append(f"{'?' if r.get('waiting') is None else r['waiting']} waiting")
    return "now: " + ", ".join(parts) if parts else ""


def change_text(r: dict[str, Any]) -> str:
    """Who made the last change, from the note (untrusted: escape it where it is shown), or ``""``."""
    worker, task = r["worker"], r["task"]
    if not worker and not task:
        return ""
    verb = {br.OPEN: "opened", br.PROBING: "probe", br.CLOSED: "closed"}.get(r["state"], "last change")
    if not worker:
        return f"{verb}: task {task}"
    return f"{verb} by {worker}" + (f", task {task}" if task else "")


def lines(rows: list[dict[str, Any]], now: float) -> list[str]:
    """The breakers section of ``rare-celery status``: a row per breaker, then its settings and who
    made its last change."""
    out = [HEADER]
    for r in rows:
        gen = "-" if r["gen"] is None else str(r["gen"])
        out.append(f"{r['breaker']:<24} {state_text(r, now):<52} {gen:>12}  {', '.join(r['tasks']) or '-'}")
        detail = change_text(r)
        out.append(INDENT + settings_text(r["settings"]) + (f"; {detail}" if detail else ""))
        now_text = usage_text(r)
        if now_text:
            out.append(INDENT + now_text)
    return out
