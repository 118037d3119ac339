"""A circuit breaker per downstream service, shared by every worker: pure decisions, no broker.

Tasks that call the same service name one breaker (``breaker = "deepl"``). Its life, the same in
every worker because every worker applies the same *notes* (see :mod:`rare_celery.breaker_io`):

    closed   attempts run. A retryable failure is a ``failure`` note, a success after failures a
             ``success`` note (it clears the count). ``failures`` failures in a row within the last
             ``within`` seconds open it: generation ``gen + 1``.
    open     attempts do not run: their messages wait in a delay queue until the probe time
             (``until``), no attempt counted, the shelf life still running.
    (due)    from ``until`` on, one attempt may become the *probe*: the one whose worker holds the
             breaker's probe lock (an exclusive queue on the broker).
    probing  the probe runs; the others wait for its verdict, until its lease ends (:data:`PROBE_LEASE`
             after it started: one round through a delay queue, not one a second). Its success (or
             any outcome that is not a retryable failure) closes the breaker; a retryable failure
             opens it again for twice as long, at most ``max_open`` seconds (generation + 1).

Notes are ordered by ``(gen, phase)``: within a generation open < probing < closed, and every
generation is later than all of the one before, so workers agree whatever order the notes
arrive in, and an old note never undoes a newer state. Two opens of the same generation (two
workers saw the tripping failure at once) agree on the later probe time: never early.

Held open on purpose. An operator's pause (``rare-celery pause deepl --for 10m``) and a service's
``Retry-After`` (:class:`rare_celery.RetryAfter`) open the breaker for a given time, with ``why``:
a new generation (:func:`paused`), so every worker holds the attempts until then; at its end it
closes by itself (:func:`current`), with no probe: the service, or the operator, said when. An
operator's resume closes it sooner (:func:`resumed`). A held
attempt waits at most :data:`HELD_STEP` at a time, then looks again: a resume reaches the attempts
held before it within a minute (at the cost of one round through a delay queue a minute each).

Clocks. Notes are validated (a bad one is dropped with one log line) and read on the receiver's
clock (:func:`localize`): a note counts from when it is heard, an open period is the duration it
carries. A worker whose clock runs ahead does not stretch anyone else's open period.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, NamedTuple

CLOSED, OPEN, PROBING = "closed", "open", "probing"
_RANK = {OPEN: 0, PROBING: 1, CLOSED: 2}
# note kinds: counted by every worker (failure, success) or a change of state (open, probe, close)
FAILURE, SUCCESS, OPENED, PROBE, CLOSE = "failure", "success", "open", "probe", "close"
COUNTS, CHANGES = (FAILURE, SUCCESS), (OPENED, PROBE, CLOSE)
RUN, WAIT = "run", "wait"  # verdicts, with PROBE: try to become the probe
PROBE_WAIT = 1.0  # seconds between attempts a worker lets try for the probe lock when a probe is due
PROBE_LEASE = 10.0  # a probe silent this long is presumed lost: the lock (not the note) then decides
HELD_STEP = 60.0  # the longest wait of an attempt held by a pause or a Retry-After before it looks again
MAX_NAME = 100
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_FAILURES = 1000
MAX_TEXT = 255  # characters of a note's by, task and why
_MAX_SECONDS = 86_400.0 * 30


class Verdict(NamedTuple):
    """What an attempt of the breaker's task does now: ``run``, ``wait`` until ``until``, or ``probe``."""

    action: str
    until: float | None = None


@dataclass(frozen=True)
class Settings:
    """A breaker's policy: trip after ``failures`` retryable failures in a row within ``within`` s,
    stay open ``open_for`` s, then twice as long after each failed probe, at most ``max_open`` s."""

    failures: int = 5
    within: float = 60.0
    open_for: float = 30.0
    max_open: float = 300.0
    rate: tuple[int, float] | None = None  # (attempts, window s): at most that many in any window (service_rate)
    concurrency: int | None = None  # attempts in flight at most, fleet-wide (service_concurrency)

    @classmethod
    def build(cls, owner: str, name: object, *, failures: object, within: object, open_for: object,
              max_open: object, rate: object = None, concurrency: object = None) -> Settings | None:
        """``None`` without a breaker name; else validated settings (``ValueError`` names the task
        and the option)."""
        if name is None:
            if rate is not None or concurrency is not None:
                raise ValueError(f"{owner}: service_rate and service_concurrency limit a named service: "
                                 f"name it with breaker = 'deepl' (the tasks that call it share the limits)")
            return None
        try:
            if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_NAME:
                raise ValueError(f"breaker must be a name of 1 to {MAX_NAME} letters, digits, '_' or '-' "
                                 f"(the downstream service, say 'deepl'), got {name!r:.80}")
            if not isinstance(failures, int) or isinstance(failures, bool) or not 1 <= failures <= MAX_FAILURES:
                raise ValueError(f"breaker_failures must be a whole number from 1 to {MAX_FAILURES}, "
                                 f"got {failures!r:.80}")
            if concurrency is not None and (not isinstance(concurrency, int) or isinstance(concurrency, bool)
                                            or not 1 <= concurrency <= MAX_CONCURRENCY):
                raise ValueError(f"service_concurrency must be a whole number from 1 to {MAX_CONCURRENCY} (attempts "
                                 f"in flight across all workers), got {concurrency!r:.80}")
            out = cls(failures, _seconds("breaker_within", within), _seconds("breaker_open", open_for),
                      _seconds("breaker_max_open", max_open), parse_rate(rate), concurrency)
            if out.max_open < out.open_for:
                raise ValueError(f"breaker_max_open ({out.max_open:g}) is shorter than breaker_open ({out.open_for:g})")
            return out
        except ValueError as exc:
            raise ValueError(f"{owner}: {exc}") from None

    def reopen_for(self, open_for: float | None) -> float:
        """How long the breaker stays open after a failed probe of a period that lasted ``open_for``."""
        return min(self.max_open, 2 * (open_for or self.open_for))


DEFAULTS = Settings()  # what a RareTask with a breaker gets unless it says otherwise
MAX_CONCURRENCY = 100
MAX_RATE = 100_000  # attempts in one window
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|m|h|d)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_rate(value: object) -> tuple[int, float] | None:
    """``"30/s"``, ``"1000/h"``, ``"5/10s"`` -> ``(attempts, window s)``; ``None`` stays ``None``."""
    if value is None:
        return None
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"service_rate must look like '30/s', '1000/h' or '5/10s', got {value!r:.80}")
    count, size, unit = int(match.group(1)), int(match.group(2) or 1), match.group(3)
    window = size * _RATE_UNITS[unit]
    if not 1 <= count <= MAX_RATE or not 0 < window <= 86_400:
        raise ValueError(f"service_rate: from 1 to {MAX_RATE:,} attempts in a window of at most a day, "
                         f"got {value!r:.80}")
    return count, window


def _seconds(option: str, value: object) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not 0 < value <= _MAX_SECONDS:
        raise ValueError(f"{option} must be a number of seconds (or a timedelta) above 0 and at most 30 days, "
                         f"got {value!r:.80}")
    return float(value)


@dataclass(frozen=True)
class State:
    """One breaker as a worker knows it. ``gen`` counts open periods (each trip, each failed probe);
    ``until`` is the probe time of an open breaker, ``open_for`` how long that period is; ``probe``
    names the worker probing and ``task`` the probe's task id; ``since`` is when the phase began;
    ``failures`` the times of the failures in a row of a closed one."""

    name: str
    phase: str = CLOSED
    gen: int = 0
    until: float | None = None
    open_for: float | None = None
    probe: str | None = None
    task: str | None = None
    since: float | None = None
    failures: tuple[float, ...] = ()
    why: str | None = None  # an open period nobody's failures made: an operator's pause, a Retry-After

    def order(self) -> tuple[int, int]:
        return self.gen, _RANK[self.phase]

    def as_note(self, by: str, task: str | None = None) -> dict[str, Any]:
        """This state as the note that announces it (and that the state queue keeps)."""
        kind = {OPEN: OPENED, PROBING: PROBE, CLOSED: CLOSE}[self.phase]
        note = {"breaker": self.name, "kind": kind, "gen": self.gen, "at": self.since, "until": self.until,
                "open_for": self.open_for, "by": by, "task": task or self.task}
        return {**note, "why": self.why} if self.why else note


class Change(NamedTuple):
    """A state that changed by applying a note: its kind (``open``, ``probe``, ``close``), the new
    state, the note that changed it (who, which task)."""

    kind: str
    state: State
    note: dict[str, Any]


def apply(state: State, note: dict[str, Any], settings: Settings) -> tuple[State, Change | None]:
    """The state after ``note`` (a valid note of this breaker, see :func:`note_problem`), and the
    change it made, if it made one."""
    kind, gen, at = note["kind"], note["gen"], note["at"]
    state = current(state, at)
    if kind in COUNTS:
        if gen < state.gen or state.phase != CLOSED and gen == state.gen:
            return state, None  # an attempt that started before the breaker last changed
        if gen > state.gen:  # this worker missed a close (or started late): the sender knows better
            state = State(state.name, CLOSED, gen, since=at)
        if kind == SUCCESS:
            return (replace(state, failures=()) if state.failures else state), None
        failures = tuple(t for t in (*state.failures, at) if t >= at - settings.within)[-settings.failures:]
        if len(failures) < settings.failures:
            return replace(state, failures=failures), None
        opened = State(state.name, OPEN, gen + 1, until=at + settings.open_for, open_for=settings.open_for, since=at,
                       task=note.get("task"))
        return opened, Change(OPENED, opened, note)
    phase = {OPENED: OPEN, PROBE: PROBING, CLOSE: CLOSED}[kind]
    new = State(state.name, phase, gen, until=note.get("until") if phase == OPEN else None,
                open_for=note.get("open_for") if phase != CLOSED else None,
                probe=note.get("by") if phase == PROBING else None, task=note.get("task"), since=at,
                why=note.get("why") if phase == OPEN else None)
    if new.order() < state.order():
        return state, None
    if new.order() == state.order():
        if phase == OPEN and (new.until or 0) > (state.until or 0):
            return replace(state, until=new.until, why=new.why), None  # the same period twice: the later end
        return state, None
    return new, Change(kind, new, note)


def current(state: State, now: float) -> State:
    """``state`` as it stands at ``now``: a period held open on purpose (``why``: a pause, a
    Retry-After) ends by itself at its ``until``, closed in the same generation, with no probe (the
    service, or the operator, said when)."""
    if state.phase == OPEN and state.why and now >= (state.until or 0):
        return State(state.name, CLOSED, state.gen, since=state.until)
    return state


def verdict(state: State | None, now: float) -> Verdict:
    """What an attempt does now under ``state`` (``None``: a breaker nobody has seen open)."""
    state = None if state is None else current(state, now)
    if state is None or state.phase == CLOSED:
        return Verdict(RUN)
    if state.phase == OPEN:
        if now >= (state.until or 0):
            return Verdict(PROBE)
        if state.why:  # held on purpose: an attempt looks again within HELD_STEP, so a resume is heard
            return Verdict(WAIT, min(state.until or 0, now + HELD_STEP))
        return Verdict(WAIT, state.until)
    if now - (state.since or 0) < PROBE_LEASE:  # a probe runs: wait for its verdict, at most its lease
        return Verdict(WAIT, (state.since or 0) + PROBE_LEASE)
    return Verdict(PROBE)


def probing(state: State, by: str, task: str, now: float) -> State:
    """The state a probe announces when it starts."""
    return State(state.name, PROBING, state.gen, open_for=state.open_for, probe=by, task=task, since=now)


def after_probe(state: State, settings: Settings, *, failed: bool, now: float) -> State:
    """The state a probe's outcome announces: closed, or open again for longer (a new generation)."""
    if not failed:
        return State(state.name, CLOSED, state.gen, since=now)
    open_for = settings.reopen_for(state.open_for)
    return State(state.name, OPEN, state.gen + 1, until=now + open_for, open_for=open_for, since=now)


def paused(state: State, seconds: float, why: str, now: float) -> State:
    """The breaker held open for ``seconds`` from ``now`` whatever its state (``why``: an operator's
    pause, a service's Retry-After): a new open period (generation + 1), whose end a probe ends as
    any other's. Two of the same generation agree on the later end, as two trips do."""
    return State(state.name, OPEN, state.gen + 1, until=now + seconds, open_for=seconds, since=now, why=why)


def resumed(state: State, now: float) -> State:
    """The breaker closed now, whatever held it (an operator's resume): its generation's close."""
    return State(state.name, CLOSED, state.gen, since=now)


def count_note(name: str, kind: str, gen: int, at: float, by: str, task: str | None) -> dict[str, Any]:
    """A ``failure`` or ``success`` note: an attempt's outcome, counted by every worker."""
    return {"breaker": name, "kind": kind, "gen": gen, "at": at, "by": by, "task": task}


def note_problem(note: object) -> str | None:
    """Why ``note`` (decoded JSON from the breakers' exchange) is not a note, or ``None``."""
    if not isinstance(note, dict):
        return "not a JSON object"
    name, kind, gen, at = (note.get(k) for k in ("breaker", "kind", "gen", "at"))
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_NAME:
        return "no valid breaker name"
    if kind not in COUNTS + CHANGES:
        return f"unknown kind {kind!r:.40}"
    if not isinstance(gen, int) or isinstance(gen, bool) or not 0 <= gen <= 10**9:
        return "no valid gen"
    if not _time(at):
        return "no valid time"
    if kind == OPENED and not (_time(note.get("until")) and _time(note.get("open_for"), _MAX_SECONDS)):
        return "an open note without until and open_for"
    if kind in CHANGES:  # a probe note carries the period it ends: a failed probe doubles it
        if note.get("until") is not None and not _time(note["until"]):
            return "no valid until"
        if note.get("open_for") is not None and not (_time(note["open_for"], _MAX_SECONDS) and note["open_for"] > 0):
            return "no valid open_for"
    for key in ("by", "task", "why"):
        if note.get(key) is not None and (not isinstance(note[key], str) or len(note[key]) > MAX_TEXT):
            return f"no valid {key}"
    return None


def localize(note: dict[str, Any], now: float) -> dict[str, Any]:
    """A valid ``note`` with its times on the receiving worker's clock, ``now`` being when it was heard:
    ``at`` becomes ``now``, and an open note's probe time ``now`` plus what was left of its period when
    it was sent (``until - at``: both read on the sender's clock, so a sender whose clock is off does not
    change it; at most ``open_for``). Workers' clocks need not agree: every period is a duration, and
    each worker counts it on its own clock. (A note read later from the state queue has aged unseen:
    its period counts from when it is read, never shorter.)"""
    out = {**note, "at": now}
    if note.get("until") is not None:
        left = note["until"] - note["at"]
        if note.get("open_for") is not None:
            left = min(left, note["open_for"])
        out["until"] = now + max(0.0, left)
    return out


def _time(value: object, limit: float = 32_503_680_000.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0 <= value <= limit


def from_note(note: dict[str, Any]) -> State:
    """The state a change note (or the state queue's message) describes."""
    state, _ = apply(State(note["breaker"], OPEN, -1), note, Settings())
    return state
