"""The web console's pure parts: bind and auth rules, request checks, filters, escaping; pages rendered
from a snapshot without a broker (Flask's test client)."""

from __future__ import annotations

import base64
import time

import pytest

pytest.importorskip("flask")

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
                         error, True)


def client(entries):
    console = Console(lambda: None)
    console.snapshots["q.bugs"] = reading.Snapshot("q.bugs", entries, len(entries), time.time(), 0.1, True)
    guard = security.Guard(None, loopback_only=True)
    app = create_app(console, guard, metrics.registry(console, metrics.Counters()))
    return app.test_client(), guard


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
    for i in range(metrics.MAX_SERIES + 10):
        counters.add({"type": "rare-expired", "name": f"t{i}"})
    counts = counters.snapshot()
    assert counts["rare-bugs"] == {("t", "exhausted", "q.bugs"): 1, ("t", "other", "q.bugs"): 1}
    assert len(counts["rare-expired"]) == metrics.MAX_SERIES + 1 and counts["rare-expired"][("other",)] == 10
    assert counters.delays == {("classic", 1900): {"q"}}  # the delay queue the retry waits in
