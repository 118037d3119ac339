"""The web console and its metrics against the real RabbitMQ, over HTTP (the browser test is test_web_browser.py).

The console runs as users run it, ``rare-celery ... web --port 0`` in a subprocess; bug messages are
published with the headers real ones have (``bug_message``), plus real ones from a worker.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

pytest.importorskip("flask")
pytest.importorskip("prometheus_client")

from kombu import Connection

from tests.integration.test_cli import ODD, breaker_notes, bug_message, drain, keys, open_note, publish, settled
from tests.support import ROOT, Worker, message_count, wait_for
from tests.web_support import WebServer, text_of

APP = "tests.apps.web_app"


@pytest.fixture(scope="module")
def web_app(env):
    import importlib

    return importlib.import_module(APP)


@pytest.fixture(scope="module")
def web_worker(web_app, env, workdir):
    worker = Worker(APP, ["web.work", "web.other"], env, workdir, name="web", extra=["-E"]).wait_ready()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def any_queue(vhost):
    """A console without an app: it reads any queue."""
    server = WebServer("--broker", vhost.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app_console(web_app, vhost):
    server = WebServer("-A", APP)
    wait_for(lambda: "rare_events_receiver_up 1.0" in server.get("/metrics").text, 20, 0.2, "the event receiver")
    yield server
    server.stop()


@pytest.fixture()
def queue_name():
    return f"web.t.{uuid.uuid4().hex[:8]}.bugs"  # the tools read bug queues only


def form(page, **fields) -> dict:
    return {"csrf": page.csrf(), **fields}


def plan_and_confirm(server, queue: str, fields: dict, origin_page) -> tuple[str, object]:
    """POST the plan, follow it to its confirmation; returns (the question, the confirm form's token)."""
    posted = server.post("/plan", form(origin_page, q=queue, **fields))
    assert posted.status == 302, (posted.status, text_of(posted.text)[:500])
    confirm = server.job(posted.headers["Location"])
    return confirm


# -- reading a queue -------------------------------------------------------------------------------

def mixed(n: int, queue: str = "web.t") -> list:
    reasons = ("exhausted", "expired", "bug")
    return [bug_message("web.record" if i % 2 else "web.other", [i], queue=queue, reason=reasons[i % 3],
                        attempts=1 + i % 4, failed_ago=7200 if i % 5 == 0 else 60, error=f"down {i}")
            for i in range(n)]


def rows(page) -> list[str]:
    return re.findall(r'<tr class="message-row" data-task="([^"]*)"', page.text)


def test_a_console_without_an_app_never_reads_a_work_queue(vhost, any_queue):
    """Issue 23, item 3: one cross-site GET of a work queue's page made its messages come back redelivered,
    which workers count as failed attempts. The console reads bug queues only, and says why."""
    work = f"web.t.{uuid.uuid4().hex[:8]}"
    publish(vhost.url, work, [bug_message("web.record", [1], queue=work)])
    page = any_queue.get(f"/queue?q={work}")
    assert page.status == 400 and "is not a bug queue" in page.text
    with Connection(vhost.url) as conn:
        message = conn.default_channel.basic_get(work, no_ack=True)
    assert message is not None and not message.delivery_info["redelivered"]


def test_a_queue_page_reads_pages_and_filters_and_leaves_every_message_in_place(vhost, any_queue, queue_name):
    messages = mixed(1000)[:500] + ODD + mixed(1000)[500:]
    publish(vhost.url, queue_name, messages)
    page = any_queue.page(f"/queue?q={queue_name}")
    assert page.status == 200
    text = text_of(page.text)
    assert f"{len(messages):,} messages read" in text and "without taking them" in text
    assert len(rows(page)) == 50 and "page 1 of 21" in text
    want = {r: sum(1 for m in messages if (m.headers or {}).get("x-rare-reason") == r) for r in ("exhausted", "bug")}
    assert f"exhausted {want['exhausted']:,}" in text and f"bug {want['bug']:,}" in text
    settled(vhost, queue_name, len(messages))  # the read let go of them

    page = any_queue.page(f"/queue?q={queue_name}&task=web.rec*&reason=expired&since=1h&per=100")
    expected = [m for m in messages if (m.headers or {}).get("x-rare-task") == "web.record"
                and m.headers["x-rare-reason"] == "expired" and time.time() - m.headers["x-rare-failed-at"] < 3600]
    assert f"{len(expected):,} matching (task web.rec*, reason expired, failed within 1h)" in text_of(page.text)
    ids = re.findall(r'data-id="([^"]*)"', page.text)
    assert ids == [m.headers["id"] for m in expected][:100]
    page2 = any_queue.page(f"/queue?q={queue_name}&task=web.rec*&reason=expired&since=1h&per=100&page=2")
    assert re.findall(r'data-id="([^"]*)"', page2.text) == [m.headers["id"] for m in expected][100:200]
    one = any_queue.page(f"/queue?q={queue_name}&id={expected[3].headers['id']}")
    assert re.findall(r'data-id="([^"]*)"', one.text) == [expected[3].headers["id"]]
    bad = any_queue.page(f"/queue?q={queue_name}&since=1hour")
    assert "not a duration" in text_of(bad.text)

    settled(vhost, queue_name, len(messages))
    assert keys(drain(vhost.url, queue_name)) == [m.key() for m in messages]  # same order, same bytes


def test_a_long_read_shows_the_head_of_the_queue_at_once_counted_as_partial(vhost, queue_name, monkeypatch):
    """Issue 28: the first page of a queue of a million messages waited for the whole read (up to 120 s). It
    now shows the head read so far, said to be partial; the whole read follows. The read is slowed here
    (20 ms a message) so that it is still running when the page is answered."""
    from rare_celery.tools.web import reading
    from tests.web_support import console_client

    messages = mixed(300)
    publish(vhost.url, queue_name, messages)
    entry = reading.entry
    monkeypatch.setattr(reading, "entry", lambda held, intern: (time.sleep(0.02), entry(held, intern))[1])
    with console_client(vhost.url) as client:
        page = client.get(f"/queue?q={queue_name}").get_data(as_text=True)
        text = text_of(page)
        read = re.search(r"Still reading: ([\d,]+) of the 300 messages it holds so far", text)
        assert read, text[:1000]
        n = int(read.group(1).replace(",", ""))
        assert 0 < n < 300 and f"{n:,} messages read" in text
        assert re.findall(r'data-id="([^"]*)"', page) == [m.headers["id"] for m in messages[:min(n, 50)]]
        by_reason = {r: sum(1 for m in messages[:n] if m.headers["x-rare-reason"] == r) for r in ("exhausted", "bug")}
        assert f"exhausted {by_reason['exhausted']:,}" in text  # counted as far as the read has come

        def whole():
            p = client.get(f"/queue?q={queue_name}").get_data(as_text=True)
            return p if "Still reading" not in p and 'id="job"' not in p else None
        text = text_of(wait_for(whole, 60, 0.2, "the whole read"))
        assert "300 messages read" in text and "page 1 of 6" in text and "exhausted 100" in text
    settled(vhost, queue_name, len(messages))
    assert keys(drain(vhost.url, queue_name)) == [m.key() for m in messages]  # same order, same bytes


def test_a_read_that_stops_before_the_end_lets_go_quietly(vhost, queue_name, caplog):
    """Issue 28: a read of the head of a long queue (its limit, or a message page that found its message) left
    the broker pushing the rest; closing the channel then logged a warning per message in flight (a million-
    message bug queue: the console stuck writing them). The consumer is cancelled first."""
    import logging

    from rare_celery.tools import bugs
    from rare_celery.tools.web import reading

    messages = mixed(3000)
    publish(vhost.url, queue_name, messages)
    with caplog.at_level(logging.WARNING, logger="amqp"), Connection(vhost.url) as conn:
        bugs.connect(conn)
        snap = reading.scan(conn, queue_name, limit=100)
        found = reading.find(conn, queue_name, records_fingerprint(messages[10]), messages[10].headers["id"])
    assert len(snap.entries) == 100 and not snap.complete and found is not None
    assert not [r for r in caplog.records if r.name.startswith("amqp")], caplog.records[:3]
    settled(vhost, queue_name, len(messages))
    assert keys(drain(vhost.url, queue_name)) == [m.key() for m in messages]  # same order, same bytes


def records_fingerprint(m) -> str:
    from rare_celery.tools import records

    return records.fingerprint(m.body, m.props, m.headers)


def test_a_message_page_shows_everything_and_hostile_text_as_text(vhost, any_queue, queue_name):
    evil = "<script>window.pwned=1</script>"
    hops = [{"task": "web.sms", "queue": "web.work", "reason": "exhausted", "attempts": 3, "started": time.time() - 90,
             "left": time.time() - 60}]
    hostile = bug_message(f"web.{evil}", [evil, {"n": 1}], queue="web.work", error=f"boom {evil}",
                          extra={"x-rare-hops": hops, "x-rare-traceback": f"Traceback (most recent call last):\n"
                                                                          f"  File \"x.py\", line 1\n{evil}\n"})
    publish(vhost.url, queue_name, [hostile, *ODD])
    page = any_queue.page(f"/queue?q={queue_name}")
    assert evil not in page.text and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page.text
    links = page.links("message-link")
    assert len(links) == 5
    detail = any_queue.get(links[0])
    assert detail.status == 200 and evil not in detail.text
    text = text_of(detail.text)
    assert f"web.{evil}" in text and f"boom {evil}" in text and "builtins.ConnectionError" in text
    assert 'File "x.py", line 1' in text  # the whole traceback
    assert '"n": 1' in detail.text.replace("&#34;", '"')  # args as pretty JSON
    assert "web.sms on web.work: 3 attempts, then exhausted" in text  # the hop history
    assert "x-rare-first-at" in text and "UTC" in text and "ago" in text
    assert "script-src 'self'" in detail.headers["Content-Security-Policy"]
    pickled = any_queue.get(links[2])
    assert "body is application/x-python-serialize, not JSON: not decoded" in text_of(pickled.text)
    assert "\\x80\\x04" in text_of(pickled.text)  # a safe preview
    settled(vhost, queue_name, 5)
    assert keys(drain(vhost.url, queue_name)) == [m.key() for m in [hostile, *ODD]]


# -- putting things right --------------------------------------------------------------------------

def test_requeue_moves_exactly_what_was_counted_and_purge_only_the_chosen(vhost, any_queue, queue_name):
    url, target = vhost.url, f"{queue_name}.target"
    publish(url, target, [])
    messages = [bug_message("web.record" if i % 2 else "web.other", [i], queue=None) for i in range(10)]
    publish(url, queue_name, messages)
    page = any_queue.page(f"/queue?q={queue_name}")

    confirm = plan_and_confirm(any_queue, queue_name, {"do": "requeue:matching", "task": "web.record",
                                                       "to": target, "attempts": "keep"}, page)
    question = text_of(confirm.text)
    assert f"Requeue 5 messages (task web.record) from {queue_name} to {target} (5), keeping their attempts?" in question
    assert f"<h1>Requeue from {queue_name}: confirm</h1>" in confirm.text  # counted: no longer "counting what to ..."
    late = [bug_message("web.record", [100 + i], queue=None) for i in range(3)]  # they match, but came later
    publish(url, queue_name, late, declare=False)
    token = re.search(r'name="token" value="([^"]+)"', confirm.text).group(1)
    moved = any_queue.post("/confirm", {"csrf": confirm.csrf(), "token": token})
    result = any_queue.job(moved.headers["Location"])
    assert f"requeued 5 messages from {queue_name} to {target} (5)" in text_of(result.text)
    again = any_queue.post("/confirm", {"csrf": confirm.csrf(), "token": token})
    assert again.status == 400 and "expired or was used" in text_of(again.text)

    got = drain(url, target)
    assert [json.loads(m.body)[0] for m in got] == [[1], [3], [5], [7], [9]]
    assert all(m.headers["x-rare-attempt"] == 3 and "x-rare-reason" not in m.headers for m in got)
    rest = [m for m in messages if m.headers["task"] == "web.other"] + late
    settled(vhost, queue_name, len(rest))

    page = any_queue.page(f"/queue?q={queue_name}")
    fps = re.findall(r'name="fp" value="([0-9a-f]+)"', page.text)
    confirm = plan_and_confirm(any_queue, queue_name, {"do": "purge:selected", "fp": [fps[0], fps[2]]}, page)
    assert f"Delete 2 messages (the 2 messages ticked) from {queue_name} for good?" in text_of(confirm.text)
    token = re.search(r'name="token" value="([^"]+)"', confirm.text).group(1)
    result = any_queue.job(any_queue.post("/confirm", {"csrf": confirm.csrf(), "token": token}).headers["Location"])
    assert f"deleted 2 messages from {queue_name}" in text_of(result.text)
    left = [m for i, m in enumerate(rest) if i not in (0, 2)]
    settled(vhost, queue_name, len(left))
    assert keys(drain(url, queue_name)) == [m.key() for m in left]

    refused = plan_and_confirm(any_queue, queue_name, {"do": "requeue:matching", "everything": "yes"}, page)
    assert "Nothing to requeue" in text_of(refused.text)


def test_a_requeue_at_a_rate_says_so_and_goes_out_at_it(vhost, any_queue, queue_name):
    url, target = vhost.url, f"{queue_name}.target"
    publish(url, target, [])
    publish(url, queue_name, [bug_message("web.record", [i], queue=target) for i in range(12)])
    page = any_queue.page(f"/queue?q={queue_name}")
    bad = any_queue.post("/plan", form(page, q=queue_name, do="requeue:matching", everything="yes", rate="soon"))
    assert bad.status == 400 and "like 50/s" in text_of(bad.text)
    confirm = plan_and_confirm(any_queue, queue_name, {"do": "requeue:matching", "everything": "yes",
                                                       "rate": "600/m"}, page)
    assert "starting over at attempt 1, at most 10/s?" in text_of(confirm.text)  # 600/m: shown per second
    token = re.search(r'name="token" value="([^"]+)"', confirm.text).group(1)
    started = time.monotonic()
    moved = any_queue.post("/confirm", {"csrf": confirm.csrf(), "token": token})
    result = any_queue.job(moved.headers["Location"])
    assert f"requeued 12 messages from {queue_name} to {target} (12)" in text_of(result.text)
    assert time.monotonic() - started >= 11 / 10 - 0.1  # 12 moves, 10 a second: ~1.1 s at least
    assert len(drain(url, target)) == 12
    settled(vhost, queue_name, 0)


def test_failure_groups_on_the_queue_page_and_a_group_purged_whole(vhost, any_queue, queue_name):
    url = vhost.url
    declined = [bug_message("web.record", [i], queue=None, error=f"card {4000 + i} declined") for i in range(6)]
    down = [bug_message("web.record", [i], queue=None, error=f"gateway <b>down</b> for {i} s") for i in range(2)]
    publish(url, queue_name, declined[:3] + down + declined[3:])
    page = any_queue.page(f"/queue?q={queue_name}")
    rows = re.findall(r'<tr class="group-row" data-group="([0-9a-f]+)">.*?<td class="num">(\d+)</td>', page.text, re.DOTALL)
    assert [n for _, n in rows] == ["6", "2"]
    assert "gateway &lt;b&gt;down&lt;/b&gt; for &lt;n&gt; s" in page.text  # masked, and escaped
    group = rows[0][0]
    filtered = any_queue.page(f"/queue?q={queue_name}&group={group}")
    assert "6 matching (failure group " in text_of(filtered.text)
    confirm = plan_and_confirm(any_queue, queue_name, {"do": "purge:matching", "group": group}, filtered)
    assert f"Delete 6 messages (failure group {group}) from {queue_name} for good?" in text_of(confirm.text)
    token = re.search(r'name="token" value="([^"]+)"', confirm.text).group(1)
    result = any_queue.job(any_queue.post("/confirm", {"csrf": confirm.csrf(), "token": token}).headers["Location"])
    assert f"deleted 6 messages from {queue_name}" in text_of(result.text)
    settled(vhost, queue_name, 2)
    drain(url, queue_name)


def test_a_message_edited_on_its_page_is_requeued_with_its_new_arguments(vhost, any_queue, queue_name):
    url, target = vhost.url, f"{queue_name}.work"
    publish(url, target, [])
    publish(url, queue_name, [bug_message("web.record", [1, "+15550004"], queue=target)])
    page = any_queue.page(f"/queue?q={queue_name}")
    message = any_queue.page(page.links("message-link")[0])
    assert 'id="edit-form"' in message.text and "+15550004" in message.text
    fp = re.search(r'name="fp" value="([0-9a-f]+)"', message.text).group(1)
    fields = {"do": "requeue:one", "fp": fp, "edit": "yes", "args": '[1, "+15550005"]', "kwargs": "{}",
              "by": "bob <on call>"}
    bad = any_queue.post("/plan", form(message, q=queue_name, **{**fields, "args": '{"n": 1}'}))
    assert bad.status == 400 and "args: must be a JSON list" in text_of(bad.text)
    confirm = plan_and_confirm(any_queue, queue_name, fields, message)
    assert "edited by bob &lt;on call&gt;?" in confirm.text and "+15550005" in text_of(confirm.text)
    token = re.search(r'name="token" value="([^"]+)"', confirm.text).group(1)
    result = any_queue.job(any_queue.post("/confirm", {"csrf": confirm.csrf(), "token": token}).headers["Location"])
    assert f"requeued 1 message from {queue_name} to {target} (1)" in text_of(result.text)
    [moved] = drain(url, target)
    assert json.loads(moved.body)[:2] == [[1, "+15550005"], {}]
    [edit] = moved.headers["x-rare-edits"]
    assert edit["by"] == "bob <on call>" and json.loads(edit["args"]) == [1, "+15550004"]
    settled(vhost, queue_name, 0)


def test_a_requeue_to_a_missing_queue_or_without_origin_is_refused(vhost, any_queue, queue_name):
    publish(vhost.url, queue_name, [bug_message(queue=None), bug_message(queue="no.such.work")])
    page = any_queue.page(f"/queue?q={queue_name}")
    confirm = plan_and_confirm(any_queue, queue_name, {"do": "requeue:matching", "everything": "yes"}, page)
    text = text_of(confirm.text)
    assert "queue no.such.work (1 message goes there) does not exist" in text and 'id="confirm"' not in confirm.text
    nothing = any_queue.post("/plan", form(page, q=queue_name, do="requeue:matching"))
    assert nothing.status == 400 and "no filter is set" in text_of(nothing.text)
    settled(vhost, queue_name, 2)
    drain(vhost.url, queue_name)


# -- overview, metrics and events from a real worker ---------------------------------------------

def test_overview_and_metrics_count_what_the_worker_decided(vhost, web_app, web_worker, app_console, workdir):
    for queue in ("web.work.bugs", "web.other.bugs"):
        drain(vhost.url, queue)
    flaky = web_app.flaky.delay()  # retry after 1.99 s, then exhausted
    web_app.record_run.apply_async(["later"], countdown=1.5)  # a delayed start: sent round by the worker
    sms = web_app.sms.delay("dave")  # exhausted at once: hops to web.email, whose Bug ends in web.other.bugs
    wait_for(lambda: message_count(vhost.url, "web.work.bugs") == 1 and message_count(vhost.url, "web.other.bugs") == 1,
             30, 0.1, "both in their bug queues")

    def metric(text: str, name: str, **labels) -> float | None:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + ("{" if labels else " ")):
                got = line[len(name):].rsplit(" ", 1)
                if not labels or ",".join(sorted(got[0].strip("{}").split(","))) == want:
                    return float(got[1])
        return None

    def counted():
        text = app_console.get("/metrics").text
        return text if metric(text, "rare_routed_to_bugs_total", task="web.email", reason="bug",
                              queue="web.other.bugs") == 1 and metric(
            text, "rare_routed_to_bugs_total", task="web.flaky", reason="exhausted", queue="web.work.bugs") == 1 else None
    text = wait_for(counted, 30, 0.2, "the bug-queue counters")
    assert metric(text, "rare_retries_scheduled_total", task="web.flaky", queue="web.work") == 1
    assert metric(text, "rare_waits_total", task="web.record", queue="web.work") == 1
    assert metric(text, "rare_hops_total", source="web.sms", target="web.email", reason="exhausted") == 1
    assert metric(text, "rare_bug_queue_messages", queue="web.work.bugs", work_queue="web.work") == 1
    assert metric(text, "rare_bug_queue_messages", queue="web.other.bugs", work_queue="web.other") == 1
    assert metric(text, "rare_work_queue_consumers", queue="web.work") == 1
    assert metric(text, "rare_work_queue_ready", queue="web.work") == 0
    assert metric(text, "rare_delay_queue_messages", queue="rare.wait.1900ms", delay="1s900ms",
                  delay_seconds="1.9") == 0
    assert metric(text, "rare_unrouted_messages") == 0
    assert metric(text, "rare_broker_up") == 1

    report = json.loads(app_console.get("/api/overview").text)
    work = {w["queue"]: w for w in report["work_queues"]}
    assert work["web.work"]["consumers"] == 1 and work["web.work"]["bug_queues"] == [
        {"queue": "web.work.bugs", "exists": True, "messages": 1}]
    assert report["totals"]["bugs"] == 2 and report["unrouted"]["queue"] == "rare.unrouted"
    assert "rare.wait.1900ms" in {d["queue"] for d in report["delay_queues"]}
    page = app_console.get("/")
    assert 'data-url="/overview/tables"' in page.text and "guest:**@" in page.text and "guest:guest" not in page.text
    tables = app_console.get("/overview/tables")
    assert 'data-queue="web.work.bugs"' in tables.text and "rare.unrouted" in tables.text

    sms_page = app_console.page("/queue?q=web.other.bugs")
    detail = app_console.get(sms_page.links("message-link")[0])
    text = text_of(detail.text)
    assert sms.id in text and "web.sms on web.work: 1 attempts, then exhausted" in text and "no email address for dave" in text
    assert flaky.id  # its message page is the browser test's
    schedules = text_of(app_console.get("/schedules").text)
    assert "web.sms: backoff" in schedules and "-- hop 1: web.email takes over at +00:00:00" in schedules
    assert app_console.get("/queue?q=web.elsewhere.bugs").status == 400  # with -A: only the app's bug queues

    # a delayed start waits in a delay queue no schedule of the app uses: the overview and /metrics show it
    web_app.record_run.apply_async(["in half a minute"], countdown=30)

    def waiting_delay_queues():
        found = json.loads(app_console.get("/api/overview").text)["delay_queues"]
        return [d for d in found if d["queue"] != "rare.wait.1900ms" and d["messages"]]
    [delayed] = wait_for(waiting_delay_queues, 20, 0.2, "the delayed start in a delay queue the overview lists")
    assert delayed["messages"] == 1 and 25_000 <= delayed["delay_ms"] <= 30_500
    assert wait_for(lambda: metric(app_console.get("/metrics").text, "rare_delay_queue_messages",
                                   queue=delayed["queue"], delay=delayed["delay"],
                                   delay_seconds=str(delayed["delay_ms"] / 1000)) == 1, 10, 0.2, "/metrics")

    late = WebServer("-A", APP)  # a console started after the event: it looks for every delay queue when asked
    try:
        def listed():
            return {d["queue"]: d["messages"] for d in json.loads(late.get("/api/overview").text)["delay_queues"]}
        assert delayed["queue"] not in listed()
        page = late.get("/")
        assert late.post("/overview/scan", form(page)).status == 302
        assert listed()[delayed["queue"]] == 1
        assert metric(late.get("/metrics").text, "rare_delay_queue_messages", queue=delayed["queue"],
                      delay=delayed["delay"], delay_seconds=str(delayed["delay_ms"] / 1000)) == 1
    finally:
        late.stop()


def test_hops_and_sends_round_again_end_their_runs_for_event_consumers(vhost, web_app, web_worker):
    """What Flower sees, checked with Celery's own event receiver and celery.events.state.State."""
    from celery.events.state import State

    received: list[dict] = []
    conn = Connection(vhost.url)
    receiver = web_app.app.events.Receiver(conn, handlers={"*": received.append})
    ready = threading.Event()
    receiver.on_iteration = ready.set
    thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        sms, flaky = web_app.sms.delay("erin"), web_app.flaky.delay()
        later = web_app.record_run.apply_async(["later"], countdown=1.5)  # a delayed start: sent round

        def ended(task_id: str):
            return any(e["type"] == "task-failed" and e.get("uuid") == task_id for e in received)
        done = lambda: any(e["type"] == "task-succeeded" and e.get("uuid") == later.id for e in received)
        wait_for(lambda: ended(sms.id) and ended(flaky.id) and done(), 30, 0.1, "both tasks to fail in the end")
        time.sleep(0.5)  # stragglers from other processes
    finally:
        receiver.should_stop = True
        thread.join(5)
        conn.release()

    def of(task_id):
        return [e for e in received if e.get("uuid") == task_id]

    [hop] = [e for e in of(sms.id) if e["type"] == "rare-hop"]
    assert (hop["name"], hop["source"], hop["target"], hop["reason"], hop["queue"]) == (
        "web.sms", "web.sms", "web.email", "exhausted", "web.other")
    [bugs] = [e for e in of(sms.id) if e["type"] == "rare-bugs"]
    assert (bugs["name"], bugs["reason"], bugs["attempts"], bugs["queue"], bugs["exception"]) == (
        "web.email", "bug", 1, "web.other.bugs", "rare_celery.exceptions.Bug")
    assert bugs["error"].startswith("no email address for ")
    [retry] = [e for e in of(flaky.id) if e["type"] == "rare-retry"]
    assert (retry["attempt"], retry["delay"], retry["queue"], retry["exception"]) == (
        1, 1.99, "web.work", "builtins.ConnectionError")
    assert retry["error"] == "flaky gateway down"
    [wait] = [e for e in of(later.id) if e["type"] == "rare-wait"]
    assert wait["queue"] == "web.work" and wait["due"] > wait["timestamp"]

    main = web_worker.proc.pid  # a wait from the worker's main process (screened) has no run to end
    for task_id in (sms.id, flaky.id, later.id):  # every started run has an end
        starts = sum(1 for e in of(task_id) if e["type"] == "task-started")
        ends = sum(1 for e in of(task_id) if e["type"] in ("task-succeeded", "task-failed", "task-retried",
                                                           "task-hopped", "task-waiting")
                   and not (e["type"] == "task-waiting" and e["pid"] == main))
        assert starts == ends, [e["type"] for e in of(task_id)]

    def states(task_id):
        state, seen = State(), []
        for event in sorted(of(task_id), key=lambda e: e["timestamp"]):
            state.event(dict(event))
            task = state.tasks.get(task_id)
            if task is not None and (not seen or seen[-1] != (task.state, task.name)):
                seen.append((task.state, task.name))
        return seen, state.tasks[task_id]

    seen, task = states(sms.id)
    assert "HOPPED" in [s for s, _ in seen] and seen[-1] == ("FAILURE", "web.email")
    assert task.exception and "no email address for erin" in task.exception  # the target's own error
    seen, task = states(flaky.id)
    assert "RETRY" in [s for s, _ in seen] and seen[-1][0] == "FAILURE"
    # the early arrival went round again from the worker's main process: no request, so no
    # task-received / task-started to inflate an event consumer's counts (2 attempts, 2 received)
    assert sum(1 for e in of(flaky.id) if e["type"] == "task-received") == 2, [e["type"] for e in of(flaky.id)]
    seen, task = states(later.id)  # the delayed start: WAITING from the first the consumer hears of it
    assert seen[0] == ("WAITING", "web.record") and seen[-1][0] == "SUCCESS"
    [waiting] = [e for e in of(later.id) if e["type"] == "task-waiting"][:1]
    assert waiting["eta"] == datetime.fromtimestamp(waiting["due"], timezone.utc).isoformat()


def test_overview_and_metrics_show_a_breaker_as_its_state_note_says(vhost, web_app, app_console):
    evil = "<script>window.pwned=1</script>"
    with breaker_notes(vhost.url, "web-svc") as announce:
        note = open_note("web-svc", 3, f"w1@host{evil}", f"abc{evil}")
        announce(note)

        def shown():
            text = app_console.get("/overview/tables").text
            return text if 'data-breaker="web-svc" data-state="open"' in text else None
        tables = wait_for(shown, 20, 0.2, "the open breaker on the overview")
        assert evil not in tables and "by w1@host&lt;script&gt;window.pwned=1&lt;/script&gt;" in tables
        assert "task abc&lt;script&gt;" in tables
        [row] = re.findall(r'<tr class="breaker-row" data-breaker="web-svc".*?</tr>', tables, re.DOTALL)
        cells = [text_of(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)]
        assert cells[:2] == ["web-svc", "open"] and cells[2].startswith("until ") and cells[3] == "3"
        assert cells[5:] == ["trips after 3 failures in 10s, open 1m, at most 10m", "web.metered"]
        assert "1 of 1 breakers open" in text_of(tables)

        report = json.loads(app_console.get("/api/overview").text)
        assert [(b["breaker"], b["state"], b["gen"], b["until"], b["worker"], b["tasks"]) for b in report["breakers"]] \
            == [("web-svc", "open", 3, note["until"], f"w1@host{evil}", ["web.metered"])]
        assert report["totals"]["breakers_open"] == 1

        text = wait_for(lambda: (t := app_console.get("/metrics").text) and 'rare_breaker_state{breaker="web-svc"} 1.0'
                        in t and t, 20, 0.2, "the open breaker in the metrics")  # a scrape reuses the last for 2 s
        assert 'rare_breaker_open_periods{breaker="web-svc"} 3.0' in text
        [probe_at] = [line for line in text.splitlines() if line.startswith('rare_breaker_probe_at_seconds{breaker="web-svc"}')]
        assert float(probe_at.split()[-1]) == pytest.approx(note["until"])

        with web_app.app.events.default_dispatcher() as dispatcher:  # as a worker sends them
            fields = {"uuid": "abc", "name": "web.metered", "breaker": "web-svc", "gen": 3}
            dispatcher.send("rare-breaker-open", until=note["until"], open_for=60, reopened=False, **fields)
            dispatcher.send("rare-breaker-probe", worker="w1@host", **fields)
            dispatcher.send("rare-breaker-close", **fields)
            dispatcher.send("rare-breaker-close", **{**fields, "breaker": 'x"y\\z\n'})  # escaped as label values

        def counted():
            text = app_console.get("/metrics").text
            return text if 'rare_breaker_closes_total{breaker="x\\"y\\\\z\\n"} 1.0' in text else None
        text = wait_for(counted, 20, 0.2, "the breaker events counted")
        for name in ("rare_breaker_trips_total", "rare_breaker_probes_total", "rare_breaker_closes_total"):
            assert f'{name}{{breaker="web-svc"}} 1.0' in text, name

        announce({"breaker": "web-svc", "kind": "close", "gen": 3, "at": time.time(), "by": "w1@host", "task": "abc"})
        wait_for(lambda: 'rare_breaker_state{breaker="web-svc"} 0.0' in app_console.get("/metrics").text, 20, 0.2,
                 "the closed breaker in the metrics")
        text = app_console.get("/metrics").text
        assert 'rare_breaker_probe_at_seconds{breaker="web-svc"}' not in text
        assert 'rare_breaker_open_periods{breaker="web-svc"} 3.0' in text

    # the operator's lever: pause the service from the overview, with who and why, then resume it
    page = app_console.get("/")
    assert 'id="pause-form"' in page.text
    refused = app_console.post("/service/pause", form(page, service="web-svc", **{"for": "soon"}))
    assert refused.status == 400 and "for: " in text_of(refused.text)
    posted = app_console.post("/service/pause", form(page, service="web-svc", why=f"maintenance {evil}",
                                                     by="anna", **{"for": "10m"}))
    assert posted.status == 302
    row = json.loads(app_console.get("/api/overview").text)["breakers"][0]
    assert (row["state"], row["why"], row["worker"]) == ("open", f"paused: maintenance {evil}", "anna")
    gen = row["gen"]  # a new open period
    assert row["until"] == pytest.approx(time.time() + 600, abs=5)
    tables = app_console.get("/overview/tables").text
    assert evil not in tables and "(paused: maintenance &lt;script&gt;" in tables
    assert wait_for(lambda: 'rare_breaker_held{breaker="web-svc"} 1.0' in app_console.get("/metrics").text, 20, 0.2,
                    "the pause in the metrics")
    assert app_console.post("/service/resume", form(page, service="web-svc")).status == 302
    row = json.loads(app_console.get("/api/overview").text)["breakers"][0]
    assert (row["state"], row["gen"], row["worker"]) == ("closed", gen, "the console")
    assert wait_for(lambda: 'rare_breaker_held{breaker="web-svc"} 0.0' in app_console.get("/metrics").text, 20, 0.2,
                    "the resume in the metrics")
    assert app_console.post("/service/pause", form(page, service="nosuch", **{"for": "1m"})).status == 400


# -- starting it -----------------------------------------------------------------------------------

def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rare_celery.tools.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, check=False)


def test_starting_binding_auth_and_what_a_request_must_be(vhost, web_app):
    secret_url = vhost.url  # guest:guest
    refused = run("--broker", secret_url, "web", "--bind", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2 and "pass --auth user:password" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "guest:guest" not in refused.stderr
    down = run("--broker", "amqp://guest:s3cret@127.0.0.1:1//", "web", "--port", "0")
    assert down.returncode == 2 and "cannot connect to amqp://guest:**@127.0.0.1:1//" in down.stderr
    assert "s3cret" not in down.stderr

    server = WebServer("--broker", secret_url, env={"RARE_CELERY_WEB_AUTH": "oncall:pa55word"}, auth=("oncall", "pa55word"))
    try:
        assert "basic auth" in server.first_line and "pa55word" not in server.first_line and "guest:**@" in server.first_line
        assert server.get("/", Authorization="Basic bm86bm8=").status == 401
        assert server.get("/").status == 200
        publish(secret_url, "web.t.auth.bugs", [])
        page = server.page("/queue?q=web.t.auth.bugs")
        assert page.status == 200
        assert server.get("/", Host="evil.example:5580").status == 421  # DNS rebinding
        assert server.post("/plan", {"q": "x", "do": "purge:matching"}).status == 403  # no CSRF token
        assert server.post("/plan", form(page, q="x", do="purge:matching"),
                           Origin="http://evil.example").status == 403
        assert server.get("/static/console.js").status == 200
        assert server.get("/metrics").status == 200
    finally:
        server.stop()

    celery = WebServer("-A", APP, celery=True)  # celery -A APP rare web
    try:
        assert "app web" in celery.first_line
        assert celery.get("/schedules").status == 200
    finally:
        celery.stop()

    metrics = WebServer("--broker", secret_url, command="metrics")
    try:
        assert metrics.first_line.startswith("rare-celery metrics: http://127.0.0.1:")
        assert "rare_unrouted_messages 0.0" in metrics.get("/metrics").text
        assert metrics.get("/queue?q=x").status == 404 and metrics.get("/").text.startswith("rare-celery metrics")
    finally:
        metrics.stop()
