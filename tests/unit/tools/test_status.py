"""The breakers section of ``rare-celery status`` and the console (rare_celery.tools.breakers): which
breakers an app has, a state note as a row, and the row in words. No broker."""

from __future__ import annotations

import json

import pytest
from celery import Celery

from rare_celery import RareTask
from rare_celery import breaker as br
from rare_celery.breaker_io import state_note
from rare_celery.exceptions import ConfigurationError
from rare_celery.inventory import rare_tasks
from rare_celery.tools import breakers
from rare_celery.tools.display import terminal

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
HOSTILE = "<script>\x1b]0;owned\x07\u202e"


def app_with_breakers():
    app = Celery("unit-breakers", broker="memory://", set_as_current=False)

    @app.task(base=RareTask, shared=False, name="u.translate", queue="texts", breaker="deepl")
    def translate():
        pass

    @app.task(base=RareTask, shared=False, name="u.summarize", queue="summaries", breaker="deepl")
    def summarize():
        pass

    @app.task(base=RareTask, shared=False, name="u.charge", queue="billing", breaker="stripe", breaker_failures=1,
              breaker_within=90, breaker_open=10, breaker_max_open=3600)
    def charge():
        pass

    @app.task(base=RareTask, shared=False, name="u.plain", queue="texts")
    def plain():
        pass

    app.finalize()
    return app


def test_an_apps_breakers_with_their_settings_and_tasks():
    app = app_with_breakers()
    tasks = [t for t in rare_tasks(app) if t.name.startswith("u.")]  # not the shared tasks other test apps made
    found = breakers.uses(app, tasks)
    assert found == {"deepl": breakers.Use(br.Settings(), ("u.summarize", "u.translate")),
                     "stripe": breakers.Use(br.Settings(1, 90.0, 10.0, 3600.0), ("u.charge",))}
    assert list(breakers.uses(app, tasks, ["texts"])) == ["deepl"]  # used by a task of the queues named
    assert breakers.uses(app, [t for t in tasks if t.name == "u.plain"]) == {}
    assert breakers.uses(app, tasks, ["elsewhere"]) == {}


def test_tasks_that_share_a_breaker_set_up_differently_are_refused_in_one_line():
    from rare_celery.tools.cli import Env, Failure

    app = Celery("unit-clash", broker="memory://", set_as_current=False)

    @app.task(base=RareTask, shared=False, name="u.a", breaker="deepl", breaker_failures=3)
    def a():
        pass

    @app.task(base=RareTask, shared=False, name="u.b", breaker="deepl", breaker_failures=4)
    def b():
        pass

    app.finalize()
    with pytest.raises(ConfigurationError, match="share breaker 'deepl'"):
        breakers.uses(app, rare_tasks(app))
    with pytest.raises(Failure, match="share breaker 'deepl'"):  # status and web: one line, exit code 2
        Env(app=app).breakers()


def reading_of(body: bytes) -> breakers.Reading:
    return breakers.reading(*state_note(body))


USE = breakers.Use(br.Settings(), ("u.summarize", "u.translate"))


def note(kind: str, **fields) -> bytes:
    return json.dumps({"breaker": "deepl", "kind": kind, "gen": 3, "at": NOW - 5, "by": f"w1@host{HOSTILE}",
                       "task": f"abc{HOSTILE}", **fields}).encode()


def test_a_state_note_as_a_row():
    opened = breakers.row("deepl", USE, reading_of(note("open", until=NOW + 25, open_for=30)))
    assert opened == {"breaker": "deepl", "state": "open", "gen": 3, "since": NOW - 5, "until": NOW + 25,
                      "open_for": 30, "worker": f"w1@host{HOSTILE}", "task": f"abc{HOSTILE}", "why": None, "problem": None,
                      "settings": {"failures": 5, "within": 60.0, "open_for": 30.0, "max_open": 300.0,
                                   "rate": None, "concurrency": None},
                      "tasks": ["u.summarize", "u.translate"]}
    probing = breakers.row("deepl", USE, reading_of(note("probe")))
    assert (probing["state"], probing["since"], probing["until"], probing["worker"]) == (
        "probing", NOW - 5, None, f"w1@host{HOSTILE}")
    never = breakers.row("deepl", USE, breakers.Reading(None))
    assert (never["state"], never["gen"], never["since"], never["worker"], never["task"]) == ("closed", 0, None, None, None)


@pytest.mark.parametrize(("body", "why"), [
    (b"not json", "not a JSON object"), (b"[1]", "not a JSON object"), (note("failure"), "a failure note"),
    (note("open"), "an open note without until and open_for"), (note("close", gen=-1), "no valid gen"),
    (json.dumps({"breaker": "other name!", "kind": "close", "gen": 1, "at": 1}).encode(), "no valid breaker name"),
    (note(f"<{HOSTILE}>"), f"unknown kind {repr(f'<{HOSTILE}>')[:40]}")])
def test_what_is_not_a_state_note_is_unknown_with_why(body, why):
    reading = reading_of(body)
    assert reading == breakers.Reading(None, problem=f"the state note is not one: {why}")
    r = breakers.row("deepl", USE, reading)
    assert (r["state"], r["gen"], r["worker"], r["task"]) == ("unknown", None, None, None)
    assert breakers.state_text(r, NOW) == f"unknown (the state note is not one: {why})"


def test_settings_in_words():
    assert breakers.settings_text({"failures": 5, "within": 60.0, "open_for": 30.0, "max_open": 300.0}) == \
        "trips after 5 failures in 1m, open 30s, at most 5m"
    assert breakers.settings_text({"failures": 1, "within": 1.5, "open_for": 90, "max_open": 86400}) == \
        "trips after 1 failure in 1s500ms, open 1m30s, at most 1d"


def row(state: str, gen: int = 3, since: float | None = NOW - 5, until: float | None = None, worker="w1@host",
        task="abc", problem=None) -> dict:
    return {"breaker": "deepl", "state": state, "gen": gen, "since": since, "until": until, "open_for": 30.0,
            "worker": worker, "task": task, "problem": problem,
            "settings": {"failures": 5, "within": 60.0, "open_for": 30.0, "max_open": 300.0}, "tasks": ["u.translate"]}


def test_each_state_in_words():
    assert breakers.state_text(row("open", until=NOW + 25), NOW) == "open until 2023-11-14 22:13:45 UTC (in 25s)"
    assert breakers.state_text(row("open", until=NOW - 90), NOW) == \
        "open until 2023-11-14 22:11:50 UTC (1m30s ago): the next attempt probes"
    assert breakers.state_text(row("probing"), NOW) == "probing since 2023-11-14 22:13:15 UTC (5s ago)"
    assert breakers.state_text(row("closed", since=NOW - 3600), NOW) == "closed since 2023-11-14 21:13:20 UTC (1h ago)"
    assert breakers.state_text(row("closed", gen=0, since=None), NOW) == "closed (never opened)"
    assert breakers.state_text(row("unknown", problem="AccessRefused: no"), NOW) == "unknown (AccessRefused: no)"
    assert breakers.relative(NOW + 0.4, NOW) == "now"


def test_who_made_the_last_change():
    assert breakers.change_text(row("open")) == "opened by w1@host, task abc"
    assert breakers.change_text(row("probing", task=None)) == "probe by w1@host"
    assert breakers.change_text(row("closed", worker=None)) == "closed: task abc"
    assert breakers.change_text(row("closed", gen=0, worker=None, task=None)) == ""


def test_the_status_section_and_its_escaping():
    rows = [row("open", until=NOW + 25, worker=f"w1@host{HOSTILE}"),
            {**row("closed", gen=0, since=None, worker=None, task=None), "breaker": "stripe", "tasks": ["u.charge"]}]
    lines = breakers.lines(rows, NOW)
    assert [line.split() for line in lines] == [
        ["BREAKER", "STATE", "OPEN", "PERIODS", "TASKS"],
        ["deepl", "open", "until", "2023-11-14", "22:13:45", "UTC", "(in", "25s)", "3", "u.translate"],
        ["trips", "after", "5", "failures", "in", "1m,", "open", "30s,", "at", "most", "5m;", "opened", "by",
         f"w1@host{HOSTILE},", "task", "abc"],
        ["stripe", "closed", "(never", "opened)", "0", "u.charge"],
        ["trips", "after", "5", "failures", "in", "1m,", "open", "30s,", "at", "most", "5m"]]
    assert lines[0].index("TASKS") == lines[1].index("u.translate") == lines[3].index("u.charge")  # in columns
    shown = terminal(lines[2])  # what the CLI's say() prints
    assert "\x1b" not in shown and "\u202e" not in shown and "w1@host<script>\\x1b]0;owned\\x07\\u202e" in shown
