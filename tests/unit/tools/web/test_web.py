"""The web console's pure parts: bind and auth rules, request checks, filters, escaping; pages rendered
from a snapshot without a broker (Flask's test client)."""

from __future__ import annotations

import base64
import time

import pytest

pytest.importorskip("flask")

from rare_celery.tools import records
from rare_celery.tools.web import metrics, reading, security
from rare_celery.tools.web.app import Filters, ago, create_app, shown
from rare_celery.tools.web.console import Console

EVIL = "<script>window.pwned=1</script>"


def test_binding_anything_but_loopback_needs_auth(monkeypatch):
    monkeypatch.delenv(security.AUTH_ENV, raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        security.check_bind(host, None)
    with pytest.raises(security.BadSetting, match="pass --auth user:password"):
        security.check_bind("0.0.0.0", None)
    security.check_bind("0.0.0.0", ("a", "b"))
    assert security.parse_auth("oncall:p:w") == ("oncall", "p:w")
    monkeypatch.setenv(security.AUTH_ENV, "env:pw")
    assert security.parse_auth(None) == ("env", "pw")
    for bad in ("nopassword", ":pw", "user:"):
        with pytest.raises(security.BadSetting):
            security.parse_auth(bad)


def test_requests_are_checked_for_auth_host_and_csrf():
    guard = security.Guard(("oncall", "pw"), loopback_only=True)
    good = "Basic " + base64.b64encode(b"oncall:pw").decode()
    assert guard.authorized(good)
    assert not guard.authorized("Basic " + base64.b64encode(b"oncall:nope").decode())
    assert not guard.authorized("Basic !!!") and not guard.authorized(None) and not guard.authorized("Bearer x")
    assert guard.host_allowed("127.0.0.1:5580") and guard.host_allowed("localhost") and guard.host_allowed("[::1]:80")
    assert not guard.host_allowed("evil.example:5580") and not guard.host_allowed("127.0.0.1.evil.example")
    assert guard.post_allowed(guard.csrf, None, "same-origin", "x")
    assert guard.post_allowed(guard.csrf, "http://127.0.0.1:5580", None, "127.0.0.1:5580")
    assert not guard.post_allowed("wrong", None, "same-origin", "x")
    assert not guard.post_allowed(guard.csrf, None, "cross-site", "x")
    assert not guard.post_allowed(guard.csrf, "http://evil.example", None, "127.0.0.1:5580")


def test_filters_from_a_query_string():
    from werkzeug.datastructures import MultiDict

    f = Filters.from_args(MultiDict([("task", "billing.*, notify.sms"), ("reason", "expired"), ("reason", "bug"),
                                     ("since", "1h"), ("page", "3"), ("per", "999")]))
    assert f.tasks == ("billing.*", "notify.sms") and f.reasons == ("expired", "bug") and f.page == 3 and f.per == 50
    select = f.selector()
    assert select.failed_after == pytest.approx(time.time() - 3600, abs=5) and select.failed_before is None
    assert f.describe() == "task billing.* or notify.sms, reason expired or bug, failed within 1h"
    bad = Filters.from_args(MultiDict([("older", "7 days")]))
    bad.selector()
    assert bad.problems and "not a duration" in bad.problems[0]


def test_text_from_messages_is_shown_with_its_controls_escaped():
    assert shown("ok\x1b[31m red\u202e") == "ok\\x1b[31m red\\u202e"
    assert shown("line 1\nline 2") == "line 1\nline 2"
    assert ago(time.time() - 90).endswith("ago") and ago(None) == ""


def entry(i: int, task: str, reason: str, error: str = "down") -> reading.Entry:
    return reading.Entry(i, f"{i:064x}", f"id-{i}", task, reason, 3, time.time() - 60, time.time() - 90, "work",
                         error, True, records.group_of(task, error))


def client(entries):
    console = Console(lambda: None)
    console.snapshots["q.bugs"] = reading.Snapshot("q.bugs", entries, len(entries), time.time(), 0.1, True)
    guard = security.Guard(None, loopback_only=True)
    app = create_app(console, guard, metrics.registry(console, metrics.Counters()))
    test = app.test_client()
    for host in ("127.0.0.1", "localhost"):  # the cookie, for each host name the tests use (as a browser keeps it)
        assert test.get("/?token=" + guard.token, headers={"Host": host}).status_code == 302
    return test, guard


def test_a_snapshot_page_escapes_hostile_messages_and_paginates():
    entries = [entry(i, "web.a" if i % 2 else "web.b", "bug" if i % 3 else "expired") for i in range(120)]
    entries[7] = entry(7, f"web.{EVIL}", "bug", f"boom {EVIL}")
    test, _ = client(entries)
    page = test.get("/queue?q=q.bugs", headers={"Host": "127.0.0.1:5580"})
    body = page.get_data(as_text=True)
    assert page.status_code == 200 and EVIL not in body and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in body
    assert "page 1 of 3" in body and "120 messages read" in body
    assert body.count('class="message-row"') == 50
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    filtered = test.get("/queue?q=q.bugs&task=web.a&reason=expired", headers={"Host": "localhost"}).get_data(as_text=True)
    want = sum(1 for e in entries if e.task == "web.a" and e.reason == "expired")
    assert f"{want} matching (task web.a, reason expired)" in filtered
    assert test.get("/queue?q=q.bugs", headers={"Host": "rebound.example"}).status_code == 421
    assert test.post("/plan", data={"q": "q.bugs", "do": "purge:matching"},
                     headers={"Host": "127.0.0.1"}).status_code == 403


def test_event_counters_keep_labels_bounded():
    counters = metrics.Counters()
    counters.add({"type": "rare-bugs", "name": "t", "reason": "exhausted", "queue": "q.bugs"})
    counters.add({"type": "rare-bugs", "name": "t", "reason": "<made up>", "queue": "q.bugs"})
    counters.add({"type": "rare-retry", "name": "t", "queue": "q", "delay": 1.99})
    counters.add({"type": "task-succeeded", "uuid": "x"})  # not ours: not counted
    counters.add({"type": "rare-hop", "name": "billing.charge", "target": "billing.notify", "reason": "card expired"})
    for i in range(metrics.MAX_SERIES + 10):
        counters.add({"type": "rare-expired", "name": f"t{i}"})
    counts = counters.snapshot()
    assert counts["rare-bugs"] == {("t", "exhausted", "q.bugs"): 1, ("t", "other", "q.bugs"): 1}
    assert counts["rare-hop"] == {("billing.charge", "billing.notify", "card expired"): 1}  # the app's own reason
    assert len(counts["rare-expired"]) == metrics.MAX_SERIES + 1 and counts["rare-expired"][("other",)] == 10
    # the delay queue the retry waits in: without an app, either kind (the overview lists the one that exists)
    assert counters.delays == {("classic", 1900): {"q"}, ("quorum", 1900): {"q"}}


def test_put_backs_and_lost_attempts_are_counted_per_queue():
    """Issue 23: an operator sees a worker that keeps dying (lost attempts) and endings that cannot be
    published (put-backs), per queue."""
    counters = metrics.Counters()
    for _ in range(3):
        counters.add({"type": "rare-lost", "name": "t", "reason": "worker_lost", "queue": "sms", "attempt": 1})
    counters.add({"type": "rare-put-back", "name": "t", "queue": "sms", "deliveries": 1, "why": "nacked"})
    counts = counters.snapshot()
    assert counts["rare-lost"] == {("t", "worker_lost", "sms"): 3}
    assert counts["rare-put-back"] == {("t", "sms"): 1}


def test_a_retry_learned_from_events_is_filed_under_the_kind_of_delay_queue_it_waits_in():
    counters = metrics.Counters(lambda queue: ("quorum",) if queue.endswith(".q") else ("classic",))
    counters.add({"type": "rare-retry", "name": "t", "queue": "work.q", "delay": 7.3})  # jitter: off the schedule
    counters.add({"type": "rare-retry", "name": "t", "queue": "work", "delay": 30})
    assert counters.delays == {("quorum", 7300): {"work.q"}, ("classic", 30000): {"work"}}


def test_console_structures_stay_bounded_whatever_queue_names_are_asked_for(monkeypatch):
    import contextlib

    from rare_celery.tools.web import console as console_module

    counters = metrics.Counters()
    for i in range(5000):
        counters.add({"type": "rare-retry", "name": "t", "queue": f"q{i}", "delay": 5})
    assert all(len(users) <= metrics.MAX_USERS for users in counters.delays.values())
    console = Console(lambda: None)
    assert len({id(console.queue_lock(f"q{i}")) for i in range(5000)}) <= console_module.LOCKS
    assert console.queue_lock("same") is console.queue_lock("same")
    monkeypatch.setattr(console, "connection", contextlib.nullcontext)
    monkeypatch.setattr(reading, "scan", lambda conn, queue, progress: reading.Snapshot(queue, [], 0, time.time(), 0, True))
    for i in range(300):
        _, job = console.snapshot(f"q{i}.bugs")
        console.wait(job, 5)
    assert len(console.snapshots) <= console_module.KEEP_SNAPSHOTS and "q299.bugs" in console.snapshots
    assert len(console.scans) <= 1


def breaker_report(now: float) -> dict:
    """An overview report as Console.overview makes it, for an app with two breakers."""
    settings = {"failures": 3, "within": 10.0, "open_for": 60.0, "max_open": 600.0}
    return {"work_queues": [], "delay_queues": [], "unrouted": {"queue": "rare.unrouted", "exists": True, "messages": 0},
            "totals": {"ready": 0, "consumers": 0, "bugs": 0, "waiting": 0, "unrouted": 0, "breakers_open": 1},
            "read_at": now,
            "breakers": [
                {"breaker": "deepl", "state": "open", "gen": 3, "since": now - 5, "until": now + 55, "open_for": 60.0,
                 "worker": f"w1@{EVIL}", "task": f"abc{EVIL}\x1b[2J", "problem": None, "settings": settings,
                 "tasks": ["web.translate"]},
                {"breaker": "stripe", "state": "closed", "gen": 0, "since": None, "until": None, "open_for": None,
                 "worker": None, "task": None, "problem": None, "settings": settings, "tasks": ["web.charge"]},
                {"breaker": "mail", "state": "unknown", "gen": None, "since": None, "until": None, "open_for": None,
                 "worker": None, "task": None, "problem": "the state note is not one: not a JSON object", "settings": settings,
                 "tasks": ["web.mail"]}]}


def test_the_overview_shows_each_breaker_with_the_note_escaped(monkeypatch):
    now = time.time()
    test, _ = client([])
    monkeypatch.setattr(Console, "overview", lambda self, scan=False: breaker_report(now))
    body = test.get("/overview/tables", headers={"Host": "127.0.0.1"}).get_data(as_text=True)
    assert EVIL not in body and "\x1b" not in body
    assert "by w1@&lt;script&gt;window.pwned=1&lt;/script&gt;, task abc&lt;script&gt;window.pwned=1&lt;/script&gt;\\x1b[2J" in body
    assert '<tr class="breaker-row" data-breaker="deepl" data-state="open">' in body
    assert "trips after 3 failures in 10s, open 1m, at most 10m" in body and "in 55s" in body
    assert "never opened" in body and "unknown (the state note is not one: not a JSON object)" in body
    assert "1</span> of 3 breakers open" in body
    without = {k: v for k, v in breaker_report(now).items() if k != "breakers"}  # an app without breakers
    monkeypatch.setattr(Console, "overview", lambda self, scan=False: without)
    plain = test.get("/overview/tables", headers={"Host": "127.0.0.1"}).get_data(as_text=True)
    assert "breaker" not in plain  # no section, no total
    assert Console(lambda: None).breakers == {}  # a console without an app has none


def test_metrics_give_each_breakers_state_and_count_its_events(monkeypatch):
    from prometheus_client import generate_latest

    now = time.time()
    console, counters = Console(lambda: None), metrics.Counters()
    console.overview = lambda scan=False: breaker_report(now)
    counters.add({"type": "rare-breaker-open", "breaker": "deepl", "gen": 3, "until": now + 55})
    counters.add({"type": "rare-breaker-probe", "breaker": "deepl", "gen": 3, "worker": "w1"})
    counters.add({"type": "rare-breaker-close", "breaker": "deepl", "gen": 3})
    counters.add({"type": "rare-breaker-close", "breaker": 'a"b\\c\nd', "gen": 1})  # untrusted: a label escaped
    text = generate_latest(metrics.registry(console, counters)).decode()
    lines = set(text.splitlines())
    assert {'rare_breaker_state{breaker="deepl"} 1.0', 'rare_breaker_state{breaker="stripe"} 0.0',
            'rare_breaker_open_periods{breaker="deepl"} 3.0', 'rare_breaker_open_periods{breaker="stripe"} 0.0',
            'rare_breaker_trips_total{breaker="deepl"} 1.0', 'rare_breaker_probes_total{breaker="deepl"} 1.0',
            'rare_breaker_closes_total{breaker="deepl"} 1.0',
            'rare_breaker_closes_total{breaker="a\\"b\\\\c\\nd"} 1.0'} <= lines
    [probe_at] = [line for line in lines if line.startswith("rare_breaker_probe_at_seconds{")]
    assert probe_at.startswith('rare_breaker_probe_at_seconds{breaker="deepl"} ')
    assert float(probe_at.split()[-1]) == pytest.approx(now + 55)
    assert 'breaker="mail"' not in text  # its state could not be read: no samples this scrape
    console.overview = lambda scan=False: {k: v for k, v in breaker_report(now).items() if k != "breakers"}
    assert "rare_breaker_state" not in generate_latest(metrics.registry(console, counters)).decode()
