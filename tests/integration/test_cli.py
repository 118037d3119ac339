"""The rare-celery command line against the real RabbitMQ: through click's runner and the installed script.

Bug messages are put in place by publishing them with the headers a real one has (``bug_message``),
plus real ones routed there by a worker running tests/apps/cli_app.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import amqp
import click
import pytest
from click.testing import CliRunner
from kombu import Connection

from rare_celery.tools.cli import main
from rare_celery.topology import BREAKER_EXCHANGE, DELAY_EXCHANGE, breaker_state_queue, delay_queue
from tests.support import ROOT, Events, Vhost, Worker, message_count, wait_for

APP = "tests.apps.cli_app"
BIN = Path(sys.executable).parent


# -- running the command ---------------------------------------------------------------------------

@dataclass
class Ran:
    code: int
    out: str
    err: str

    def lines(self) -> list[str]:
        return self.out.splitlines()

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines()]


def cli(*args: str, input: str | None = None) -> Ran:
    """In process, through click's runner."""
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False, prog_name="rare-celery")
    return Ran(result.exit_code, result.stdout, result.stderr)


def script(*args: str, input: str | None = None, env: dict | None = None, celery: bool = False) -> Ran:
    """The installed console script (or ``celery ... rare``) in a subprocess."""
    if celery:
        cmd = [str(BIN / "celery")]
    elif (BIN / "rare-celery").exists():
        cmd = [str(BIN / "rare-celery")]
    else:  # not installed in this environment: the same entry point
        cmd = [sys.executable, "-m", "rare_celery.tools.cli"]
    out = subprocess.run([*cmd, *args], check=False, input=input, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})})
    return Ran(out.returncode, out.stdout, out.stderr)


def one_line_error(ran: Ran, code: int = 2) -> str:
    assert ran.code == code, (ran.code, ran.out, ran.err)
    text = ran.err.strip()
    assert "\n" not in text and "Traceback" not in text, text
    assert text.startswith("rare-celery: "), text
    return text


# -- bug messages ----------------------------------------------------------------------------------

@dataclass
class Msg:
    body: bytes
    headers: dict | None
    props: dict = field(default_factory=dict)

    def key(self):
        return self.body, self.headers, {k: self.props.get(k) for k in ("content_type", "correlation_id")}


def bug_message(task: str = "cli.record", args: list | None = None, *, queue: str | None = "cli.requeue",
                reason: str = "exhausted", attempts: int = 3, failed_ago: float = 60.0, task_id: str | None = None,
                error: str = "gateway down", extra: dict | None = None) -> Msg:
    """A message as RareTask._to_bugs publishes it to a bug queue."""
    tid = task_id or str(uuid.uuid4())
    args = [0] if args is None else args
    failed = time.time() - failed_ago
    headers = {
        "lang": "py", "task": task, "id": tid, "shadow": None, "eta": None, "expires": None, "group": None,
        "group_index": None, "retries": attempts - 1, "timelimit": [None, None], "root_id": tid, "parent_id": None,
        "argsrepr": repr(args), "kwargsrepr": "{}", "origin": "gen1@test", "ignore_result": False,
        "x-rare-attempt": attempts, "x-rare-first-at": failed - 30.0, "x-rare-exception": "builtins.ConnectionError",
        "x-rare-error": error, "x-rare-traceback": f'Traceback (most recent call last):\n  ...\nConnectionError: {error}\n',
        "x-rare-reason": reason, "x-rare-attempts": attempts, "x-rare-failed-at": failed, "x-rare-task": task,
        **({"x-rare-queue": queue} if queue else {}), **(extra or {}),
    }
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()
    props = {"content_type": "application/json", "content_encoding": "utf-8", "correlation_id": tid,
             "reply_to": "reply-1", "delivery_mode": 2, "priority": 0}
    return Msg(body, headers, props)


ODD = [  # what else ends up in bug queues: shown, never a crash
    Msg(b'[[1, 2], {}, {"callbacks": nul', {"task": "cli.record", "id": "bad-json", "x-rare-reason": "rejected",
                                             "x-rare-queue": "cli.requeue", "x-rare-error": "body could not be decoded"},
        {"content_type": "application/json", "content_encoding": "utf-8"}),
    Msg(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94.", {"task": "cli.record", "id": "pickled",
                                                                "x-rare-reason": "rejected"},
        {"content_type": "application/x-python-serialize", "content_encoding": "binary"}),
    Msg(b'{"hello": "from another producer"}', None, {"content_type": "application/json"}),
    Msg(b"\xff\xfe not utf-8 \x00", {"x-rare-reason": "rejected", "x-rare-attempts": "three",
                                     "x-rare-failed-at": "yesterday", "x-rare-hops": ["cli.a", "cli.b"]}, {}),
]


def publish(url: str, queue: str, messages: list[Msg], arguments: dict | None = None, declare: bool = True,
            exchange: str = "") -> None:
    """Publish with confirms to ``queue`` (declared first unless ``declare=False``) through ``exchange``."""
    with Connection(url) as conn:
        channel = conn.channel()
        if declare:
            channel.queue_declare(queue, durable=True, auto_delete=False, arguments=arguments)
        for m in messages:
            channel.basic_publish_confirm(amqp.Message(m.body, application_headers=m.headers, **m.props),
                                          exchange=exchange, routing_key=queue)
        channel.close()


def drain(url: str, queue: str) -> list:
    """Take every message out of ``queue``, bodies as the bytes they are (tests.support.drain decodes them)."""
    with Connection(url) as conn:
        channel = conn.channel()
        channel.auto_decode = False
        return list(iter(lambda: channel.basic_get(queue, no_ack=True), None))


@contextlib.contextmanager
def breaker_notes(url: str, name: str) -> Iterator:
    """``announce(note)``: publish ``note`` (a dict, or raw bytes) as breaker ``name``'s state note, as a
    worker announces one (to ``rare.breakers``, key ``<name>.state``, its state queue declared first: it
    keeps the newest). Afterwards the state queue is deleted, and the exchange if it was not there before."""
    queue = breaker_state_queue(name)
    with Connection(url) as conn:
        try:
            conn.channel().exchange_declare(BREAKER_EXCHANGE.name, "topic", passive=True)
            made = False
        except amqp.exceptions.NotFound:
            made = True
        channel = conn.channel()
        queue.bind(channel).declare()  # the exchange, the queue, the binding

        def announce(note) -> None:
            body = note if isinstance(note, bytes) else json.dumps(note).encode()
            channel.basic_publish_confirm(amqp.Message(body, content_type="application/json", delivery_mode=2),
                                          exchange=BREAKER_EXCHANGE.name, routing_key=queue.routing_key)
        try:
            yield announce
        finally:
            channel.queue_delete(queue.name)
            if made:
                channel.exchange_delete(BREAKER_EXCHANGE.name)
            channel.close()


def open_note(name: str, gen: int, by: str, task: str, open_for: float = 60.0) -> dict:
    """The note a worker announces when breaker ``name`` opens (``rare_celery.breaker.State.as_note``)."""
    now = time.time()
    return {"breaker": name, "kind": "open", "gen": gen, "at": now, "until": now + open_for, "open_for": open_for,
            "by": by, "task": task}


def keys(messages) -> list:
    return [(bytes(m.body), m.headers or None, {k: m.properties.get(k) for k in ("content_type", "correlation_id")})
            for m in messages]


def settled(vhost: Vhost, queue: str, ready: int) -> dict:
    """Wait until ``queue`` holds ``ready`` messages and none unacked (the command let go of them)."""
    return wait_for(lambda: (s := vhost.queue_stats().get(queue)) and s["ready"] == ready and s["unacked"] == 0 and s,
                    15, 0.1, f"{queue} to hold {ready} messages, none unacked")


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cli_app(env):
    import importlib

    return importlib.import_module(APP)


@pytest.fixture(scope="session")
def cli_worker(cli_app, env, workdir):
    worker = Worker(APP, ["cli.requeue", "cli.real"], env, workdir, name="cli").wait_ready()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def cli_events(workdir):
    return Events(workdir / "cli-events.jsonl")


@pytest.fixture()
def queue_name():
    return f"cli.t.{uuid.uuid4().hex[:8]}.bugs"  # the tools read bug queues only


def mixed(n: int) -> list[Msg]:
    """``n`` bug messages: two tasks, three reasons, half of them failed two hours ago, the odd ones."""
    reasons = ("exhausted", "expired", "bug")
    out = [bug_message("cli.inspected" if i % 2 else "cli.other", [i], queue="cli.inspect", reason=reasons[i % 3],
                       attempts=1 + i % 4, failed_ago=7200 if i % 5 == 0 else 60, error=f"down {i}\nsecond line")
           for i in range(n - len(ODD))]
    return out[:100] + ODD + out[100:]


# -- inspect-bugs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inspect_queue(vhost, env):
    messages = mixed(1000)
    publish(vhost.url, "cli.inspect.bugs", messages)
    yield messages
    drain(vhost.url, "cli.inspect.bugs")


def test_inspect_table_summary_and_filters(vhost, inspect_queue):
    ran = cli("-A", APP, "inspect-bugs", "cli.inspect.bugs")
    assert ran.code == 0, ran.err
    lines = ran.lines()
    assert lines[0].split() == ["FAILED", "(UTC)", "TASK", "ID", "REASON", "ATT", "ERROR"]
    assert len(lines) == 1 + 1000 + 1
    first = lines[1].split()
    assert first[2:7] == ["cli.other", inspect_queue[0].headers["id"], "exhausted", "1", "ConnectionError:"]
    assert lines[1].endswith("ConnectionError: down 0 second line")  # the error on one line
    assert "pickled" in lines[102] and "body is application/x-python-serialize" in lines[102]
    expected_reasons = {r: sum(1 for m in inspect_queue if (m.headers or {}).get("x-rare-reason") == r)
                        for r in ("exhausted", "expired", "bug", "rejected")}
    assert lines[-1].startswith("1000 shown of 1000 read in cli.inspect.bugs; by reason: ")
    for reason, count in expected_reasons.items():
        assert f"{reason} {count}" in lines[-1]
    assert "by task: cli.inspected 498, cli.other 498, - 2, cli.record 2" in lines[-1]
    settled(vhost, "cli.inspect.bugs", 1000)

    ran = cli("-A", APP, "inspect-bugs", "cli.inspect.bugs", "--task", "cli.insp*", "--reason", "expired",
              "--since", "1h", "--limit", "5", "--json")
    assert ran.code == 0
    got = ran.json_lines()
    want = [m for m in inspect_queue if (m.headers or {}).get("x-rare-task") == "cli.inspected"
            and m.headers["x-rare-reason"] == "expired" and time.time() - m.headers["x-rare-failed-at"] < 3600][:5]
    assert [g["id"] for g in got] == [m.headers["id"] for m in want]
    assert ran.err.startswith("5 shown of ")  # the summary goes to stderr with --json
    settled(vhost, "cli.inspect.bugs", 1000)

    wanted = [inspect_queue[7].headers["id"], inspect_queue[900].headers["id"]]  # the on-call question: where is X?
    ran = cli("-A", APP, "inspect-bugs", "cli.inspect.bugs", "--id", wanted[1], "--id", wanted[0], "--json")
    assert ran.code == 0, ran.err
    assert [g["id"] for g in ran.json_lines()] == wanted  # in queue order
    settled(vhost, "cli.inspect.bugs", 1000)


def test_inspect_json_has_every_field_and_survives_odd_messages(vhost, inspect_queue):
    ran = cli("-A", APP, "inspect-bugs", "cli.inspect.bugs", "--json")
    assert ran.code == 0
    rows = ran.json_lines()
    assert len(rows) == 1000
    m, row = inspect_queue[7], rows[7]
    h = m.headers
    assert row == {
        "id": h["id"], "task": "cli.inspected", "queue": "cli.inspect", "bug_queue": "cli.inspect.bugs", "position": 7,
        "reason": "exhausted" if 7 % 3 == 0 else ("expired" if 7 % 3 == 1 else "bug"), "attempts": 1 + 7 % 4,
        "exception": "builtins.ConnectionError", "error": "down 7\nsecond line", "traceback": h["x-rare-traceback"],
        "first_attempt_at": row["first_attempt_at"], "failed_at": row["failed_at"], "args": [7], "kwargs": {},
        "hops": []}
    assert row["failed_at"].endswith("Z") and row["first_attempt_at"] < row["failed_at"]
    bad_json, pickled, foreign, binary = rows[100:104]
    assert bad_json["id"] == "bad-json" and bad_json["args"] is None and "not valid JSON" in bad_json["body_error"]
    assert pickled["args"] is None and "not decoded" in pickled["body_error"]
    assert foreign["id"] is None and foreign["reason"] is None and "not a Celery task" in foreign["body_error"]
    assert foreign["body_preview"] == '{"hello": "from another producer"}'
    assert binary["attempts"] is None and binary["failed_at"] is None and binary["hops"] == ["cli.a", "cli.b"]
    assert binary["body_preview"].startswith("\\xff\\xfe not utf-8")
    settled(vhost, "cli.inspect.bugs", 1000)


def test_inspect_leaves_1000_messages_byte_for_byte_also_when_killed(vhost, env, queue_name):
    messages = mixed(1000)
    publish(vhost.url, queue_name, messages)
    ran = cli("--broker", vhost.url, "inspect-bugs", queue_name, "--json")
    assert ran.code == 0 and len(ran.json_lines()) == 1000
    settled(vhost, queue_name, 1000)

    # the installed script, killed while it holds part of the queue
    cmd = [str(BIN / "rare-celery")] if (BIN / "rare-celery").exists() else [sys.executable, "-m", "rare_celery.tools.cli"]
    proc = subprocess.Popen([*cmd, "--broker", vhost.url, "inspect-bugs", queue_name], stdout=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().startswith(b"FAILED")
    wait_for(lambda: vhost.queue_stats()[queue_name]["unacked"] > 0, 15, what="the script to hold messages")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    settled(vhost, queue_name, 1000)

    assert keys(drain(vhost.url, queue_name)) == [m.key() for m in messages]


def test_inspect_on_a_quorum_queue_keeps_every_message_not_their_order(vhost, env, queue_name):
    messages = [bug_message(args=[i]) for i in range(50)]
    publish(vhost.url, queue_name, messages, arguments={"x-queue-type": "quorum"})
    for _ in range(2):
        ran = cli("--broker", vhost.url, "inspect-bugs", queue_name, "--json")
        assert sorted(r["args"][0] for r in ran.json_lines()) == list(range(50))
        settled(vhost, queue_name, 50)
    after = drain(vhost.url, queue_name)
    assert sorted(json.loads(m.body)[0][0] for m in after) == list(range(50))
    assert all(m.headers["x-delivery-count"] >= 2 for m in after)  # RabbitMQ counts each read


# -- a real bug, from a real worker, inspected and requeued -----------------------------------------

def test_real_bug_from_the_worker_is_inspected_then_requeued_and_runs_again(vhost, cli_app, cli_worker, cli_events):
    started = time.time()
    result = cli_app.broken.delay(21)
    wait_for(lambda: message_count(vhost.url, "cli.real.dead") == 1, 20, 0.1, "the bug in cli.real.dead")

    ran = cli("-A", APP, "inspect-bugs", "--task", "cli.broken", "--json")  # every bug queue of the app
    assert ran.code == 0, ran.err
    [row] = ran.json_lines()
    assert row["id"] == result.id and row["task"] == "cli.broken" and row["queue"] == "cli.real"
    assert row["bug_queue"] == "cli.real.dead" and row["reason"] == "bug" and row["attempts"] == 1
    assert row["exception"] == "rare_celery.exceptions.Bug" and row["error"] == "invalid input 21"
    assert "raise Bug" in row["traceback"] and row["args"] == [21] and row["kwargs"] == {} and row["hops"] == []
    from datetime import datetime

    first = datetime.fromisoformat(row["first_attempt_at"].replace("Z", "+00:00")).timestamp()
    failed = datetime.fromisoformat(row["failed_at"].replace("Z", "+00:00")).timestamp()
    assert started - 1 <= first <= failed <= time.time()

    ran = script("-A", APP, "requeue-bugs", "cli.real.dead", "--id", result.id, "--yes")
    assert ran.code == 0, ran.err
    assert ran.out.strip() == "requeued 1 message from cli.real.dead to cli.real (1)"
    runs = wait_for(lambda: len(r := cli_events.of(result.id, "run")) == 2 and r, 20, what="the second run")
    assert runs[1]["attempt"] == 1 and runs[1]["reason"] is None
    assert message_count(vhost.url, "cli.real.dead") == 0


def test_a_bug_edited_and_requeued_runs_with_its_new_arguments(vhost, cli_app, cli_worker, cli_events):
    """edit-bug: the worker's bug, its argument corrected, runs again with it; the edit travels with the
    message (x-rare-edits: who, when, the arguments before)."""
    result = cli_app.broken.delay(21)
    wait_for(lambda: message_count(vhost.url, "cli.real.dead") == 1, 20, 0.1, "the bug in cli.real.dead")
    for bad, why in ((["--args", "[22"], "not JSON"), (["--args", '{"n": 22}'], "must be a JSON list"),
                     (["--kwargs", "[1]"], "must be a JSON object"), ([], "say what to change")):
        ran = cli("-A", APP, "edit-bug", "cli.real.dead", result.id, *bad, "--yes")
        assert ran.code == 2 and why in ran.err, (bad, ran.err)
    ran = cli("-A", APP, "edit-bug", "cli.real.dead", result.id, "--args", "[22]", "--by", "alice", input="n\n")
    assert ran.code == 1 and "args:   [21]\n     -> [22]" in ran.out and "kwargs: {} (unchanged)" in ran.out
    assert message_count(vhost.url, "cli.real.dead") == 1  # not confirmed: untouched
    before = time.time()
    ran = script("-A", APP, "edit-bug", "cli.real.dead", result.id, "--args", "[22]", "--by", "alice", "--yes")
    assert ran.code == 0, ran.err
    assert ran.out.strip().endswith(f"requeued {result.id} edited from cli.real.dead to cli.real (1), "
                                    "recorded as edited by alice")
    assert result.get(timeout=20) == 44  # 22 * 2: it ran with the new argument
    run = wait_for(lambda: len(r := cli_events.of(result.id, "run")) == 2 and r[1], 20, what="the second run")
    assert run["n"] == 22 and run["attempt"] == 1
    [edit] = run["edits"]
    assert edit["by"] == "alice" and edit["args"] == "[21]" and edit["kwargs"] == "{}" and before <= edit["at"] <= time.time()
    assert message_count(vhost.url, "cli.real.dead") == 0
    ran = cli("-A", APP, "edit-bug", "cli.real.dead", result.id, "--args", "[1]", "--yes")
    assert ran.code == 1 and "no message with id" in ran.err


def test_a_message_that_cannot_be_read_cannot_be_edited_and_stays(vhost, env, queue_name):
    pickled = bug_message(task_id="p1", queue=f"{queue_name}.work")
    pickled.body, pickled.props["content_type"] = b"\x80\x04K\x01.", "application/x-python-serialize"
    publish(vhost.url, queue_name, [pickled])
    publish(vhost.url, f"{queue_name}.work", [])
    ran = cli("--broker", vhost.url, "edit-bug", queue_name, "p1", "--args", "[1]", "--yes")
    assert "p1 cannot be edited: body is application/x-python-serialize" in one_line_error(ran)
    settled(vhost, queue_name, 1)
    drain(vhost.url, queue_name)


def test_the_tools_never_read_a_work_queue(vhost, env):
    """Issue 23, item 3. A read hands messages back ``redelivered``, and a worker takes a redelivered
    message for one whose worker died (a failed attempt): inspect-bugs, requeue-bugs and purge-bugs
    refuse a queue that is not a bug queue, with or without -A, and leave its messages untouched."""
    work = f"cli.t.{uuid.uuid4().hex[:8]}"
    publish(vhost.url, work, [bug_message("cli.record", [1])])
    for args in (["inspect-bugs", work], ["requeue-bugs", work, "--all", "-y"], ["purge-bugs", work, "--all", "-y"]):
        assert "is not a bug queue" in one_line_error(cli("--broker", vhost.url, *args)), args
    assert "is not a bug queue" in one_line_error(cli("-A", APP, "inspect-bugs", "cli.requeue"))
    with Connection(vhost.url) as conn:
        message = conn.default_channel.basic_get(work, no_ack=True)
    assert message is not None and not message.delivery_info["redelivered"]


# -- requeue-bugs ----------------------------------------------------------------------------------

def test_requeue_moves_exactly_a_filtered_subset_of_1000_while_new_bugs_arrive(
        vhost, cli_app, cli_worker, cli_events, monkeypatch):
    run_id = uuid.uuid4().hex[:6]
    reasons = ("exhausted", "expired", "bug", "rejected")
    messages = [bug_message("cli.record" if i % 7 else "cli.gone", [f"{run_id}-{i}"], reason=reasons[i % 4],
                            extra={"x-death": [{"queue": "x", "count": 1}], "x-first-death-queue": "x"})
                for i in range(1000)]
    chosen = [m for m in messages if m.headers["task"] == "cli.record" and m.headers["x-rare-reason"] == "expired"]
    publish(vhost.url, "cli.requeue.bugs", messages)
    late = [bug_message("cli.record", [f"{run_id}-late-{i}"], reason="expired") for i in range(250)]
    during = threading.Event()

    def confirm(text, abort=False, **kw):  # new matching bugs arrive between the count and the move
        assert text == f"Requeue {len(chosen)} messages from cli.requeue.bugs to cli.requeue ({len(chosen)})?"
        publish(vhost.url, "cli.requeue.bugs", late[:50], declare=False)
        threading.Thread(target=lambda: (during.set(), publish(vhost.url, "cli.requeue.bugs", late[50:],
                                                               declare=False))).start()
        during.wait(5)
        return True

    monkeypatch.setattr(click, "confirm", confirm)
    ran = cli("-A", APP, "requeue-bugs", "cli.requeue.bugs", "--task", "cli.record", "--reason", "expired")
    assert ran.code == 0, ran.err
    assert ran.out.strip() == f"requeued {len(chosen)} messages from cli.requeue.bugs to cli.requeue ({len(chosen)})"

    tags = {json.loads(m.body)[0][0] for m in chosen}
    wait_for(lambda: {e["tag"] for e in cli_events.all() if e.get("tag", "").startswith(run_id)} == tags, 60, 0.2,
             "every requeued task to run again")
    settled(vhost, "cli.requeue", 0)
    runs = [e for e in cli_events.all() if e.get("tag", "").startswith(run_id)]
    assert len(runs) == len(chosen)  # once each
    assert all(r["attempt"] == 1 and r["reason"] is None for r in runs)
    assert all(r["deadline"] is None for r in runs)  # dropped: the worker starts the shelf life again

    wait_for(lambda: message_count(vhost.url, "cli.requeue.bugs") == 1000 - len(chosen) + 250, 10,
             what="the late bugs")
    after = drain(vhost.url, "cli.requeue.bugs")
    rest = [m for m in messages if m not in chosen]
    assert keys(after) == [m.key() for m in rest + late]  # nothing lost, nothing moved twice, order kept


def test_requeue_at_a_rate_goes_out_at_that_rate(vhost, env, queue_name):
    """``--rate 20/s``: 30 bugs for a service that takes 20 a second arrive over ~1.5 s, not at once; every
    one arrives, the rest of the queue stays. A rate that is not one: exit 2, one line."""
    url, origin = vhost.url, f"{queue_name}.work"
    messages = [bug_message(args=[i], queue=origin) for i in range(30)] + [bug_message(args=[99], queue=origin,
                                                                                        reason="bug")]
    publish(url, queue_name, messages)
    publish(url, origin, [])
    arrived: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        with Connection(url) as conn:
            channel = conn.channel()
            while not stop.is_set():
                if channel.basic_get(origin, no_ack=True) is not None:
                    arrived.append(time.monotonic())
                else:
                    time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ran = cli("--broker", url, "requeue-bugs", queue_name, "--reason", "exhausted", "--rate", "20/s", "--yes")
        assert ran.code == 0 and ran.out.strip() == f"requeued 30 messages from {queue_name} to {origin} (30)"
        wait_for(lambda: len(arrived) == 30, 10, 0.05, "all 30 in the work queue")
    finally:
        stop.set()
        watcher.join(5)
    assert arrived[-1] - arrived[0] >= 29 / 20 - 0.1  # evened out at 20 a second
    assert max(sum(1 for t in arrived if start <= t < start + 1) for start in arrived) <= 21  # any 1 s window
    settled(vhost, queue_name, 1)  # the one that did not match stays
    for bad in ("fast", "20", "0/s"):
        ran = cli("--broker", url, "requeue-bugs", queue_name, "--all", "--rate", bad, "--yes")
        assert ran.code == 2 and "--rate" in ran.err and "like 50/s" in ran.err, ran.err
    settled(vhost, queue_name, 1)
    drain(url, queue_name)


def test_failure_groups_are_listed_and_one_is_requeued_whole(vhost, env, queue_name):
    """Bugs that failed the same way but for ids and numbers are one group: inspect-bugs --groups counts
    them, requeue-bugs --group moves exactly that group."""
    url, origin = vhost.url, f"{queue_name}.work"
    declined = [bug_message("cli.charge", [i], queue=origin, error=f"card {4000 + i} declined for sub {uuid.uuid4()}")
                for i in range(7)]
    down = [bug_message("cli.charge", [i], queue=origin, error=f"gateway down for {i} s") for i in range(3)]
    other = [bug_message("cli.sms", [i], queue=origin, error=f"gateway down for {i} s") for i in range(2)]
    publish(url, queue_name, declined[:4] + down + other + declined[4:])
    publish(url, origin, [])
    ran = cli("--broker", url, "inspect-bugs", queue_name, "--groups", "--json")
    assert ran.code == 0, ran.err
    groups = ran.json_lines()
    assert [(g["count"], g["task"], g["error"]) for g in groups] == [
        (7, "cli.charge", "ConnectionError: card <n> declined for sub <id>"),
        (3, "cli.charge", "ConnectionError: gateway down for <n> s"),
        (2, "cli.sms", "ConnectionError: gateway down for <n> s")]
    table = cli("--broker", url, "inspect-bugs", queue_name, "--groups")
    assert table.lines()[0].split()[:2] == ["GROUP", "COUNT"] and groups[0]["group"] in table.lines()[1]
    ran = cli("--broker", url, "requeue-bugs", queue_name, "--group", groups[0]["group"], "--yes")
    assert ran.code == 0 and ran.out.strip() == f"requeued 7 messages from {queue_name} to {origin} (7)", ran.out
    assert sorted(json.loads(m.body)[0] for m in drain(url, origin)) == [[i] for i in range(7)]
    settled(vhost, queue_name, 5)  # the other groups stay
    drain(url, queue_name)


def test_requeue_options_and_errors(vhost, env, queue_name):
    url, origin, target = vhost.url, f"{queue_name}.work", f"{queue_name}.other"
    messages = [bug_message(args=[i], queue=None if i == 4 else origin, reason="bug" if i < 2 else "exhausted",
                            attempts=2, extra={"x-death": [{"count": 1}], "x-rare-deadline": time.time() + 5})
                for i in range(6)]
    publish(url, queue_name, messages)
    publish(url, target, [])

    ran = cli("--broker", url, "requeue-bugs", queue_name, "--reason", "bug", "--dry-run")
    assert "does not exist: declare it" in one_line_error(ran)  # its origin queue is not there (yet)
    publish(url, origin, [])
    ran = cli("--broker", url, "requeue-bugs", queue_name, "--reason", "bug", "--dry-run")
    assert ran.code == 0 and ran.lines()[-1] == f"would requeue 2 messages from {queue_name} to {origin} (2)"
    assert len(ran.lines()) == 3 and messages[0].headers["id"] in ran.lines()[0]
    settled(vhost, queue_name, 6)

    ran = cli("--broker", url, "requeue-bugs", queue_name, "--reason", "bug", input="n\n")
    assert ran.code == 1 and "Aborted" in ran.err
    settled(vhost, queue_name, 6)

    ran = script("--broker", url, "requeue-bugs", queue_name, "--id", messages[0].headers["id"], "--to", target,
                 "--keep-attempts", "--yes")
    assert ran.code == 0 and ran.out.strip() == f"requeued 1 message from {queue_name} to {target} (1)"
    ran = cli("--broker", url, "requeue-bugs", queue_name, "--id", messages[1].headers["id"], "--to", target, "-y")
    assert ran.code == 0
    kept, reset = drain(url, target)
    for m in (kept, reset):
        assert bytes(m.body) == messages[0 if m is kept else 1].body
        assert not any(k.startswith(("x-death", "x-first-death")) for k in m.headers)
        assert not {"x-rare-reason", "x-rare-attempts", "x-rare-failed-at", "x-rare-task"} & set(m.headers)
        assert m.headers["x-rare-queue"] == target and m.properties["correlation_id"] == m.headers["id"]
    assert kept.headers["x-rare-attempt"] == 2 and kept.headers["retries"] == 1
    assert kept.headers["x-rare-first-at"] == messages[0].headers["x-rare-first-at"]
    assert kept.headers["x-rare-deadline"] == messages[0].headers["x-rare-deadline"]
    assert reset.headers["x-rare-attempt"] == 1 and reset.headers["retries"] == 0
    assert reset.headers["x-rare-first-at"] > messages[1].headers["x-rare-failed-at"]
    assert "x-rare-deadline" not in reset.headers  # no app: the task's shelf life is not known

    assert "--all" in one_line_error(cli("--broker", url, "requeue-bugs", queue_name))
    assert "not a bug queue of the app" in one_line_error(cli("-A", APP, "requeue-bugs", queue_name, "--all"))
    assert "does not exist" in one_line_error(script("--broker", url, "requeue-bugs", queue_name, "--all",
                                                     "--to", "no.such.queue", "-y"))
    full = f"{queue_name}.full"  # a queue that refuses more: nothing is lost, the move stops
    publish(url, full, [bug_message()], arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    text = one_line_error(cli("--broker", url, "requeue-bugs", queue_name, "--all", "--to", full, "-y"))
    assert f"refused (nacked) a message for queue '{full}'; stopped after moving 0" in text
    settled(vhost, queue_name, 4)
    ran = cli("--broker", url, "requeue-bugs", queue_name, "--id", "no-such-id", "-y")
    assert ran.code == 1 and "nothing to requeue" in ran.err
    ran = cli("--broker", url, "requeue-bugs", queue_name, "--id", messages[4].headers["id"], "-y")
    assert ran.code == 1 and "1 matching messages have no origin queue" in ran.err
    settled(vhost, queue_name, 4)
    assert keys(drain(url, queue_name)) == [m.key() for m in messages[2:]]


# -- purge-bugs ------------------------------------------------------------------------------------

def test_purge_deletes_only_the_matching(vhost, env):
    day = 86400
    messages = [bug_message("cli.purged" if i % 3 else "cli.other", [i], queue="cli.purge",
                            reason="expired" if i % 2 else "exhausted", failed_ago=10 * day if i < 30 else 3600)
                for i in range(60)] + ODD
    publish(vhost.url, "cli.purge.bugs", messages)

    def old_expired(m):
        return (m.headers or {}).get("x-rare-reason") == "expired" and m.headers["x-rare-failed-at"] < time.time() - 7 * day

    ran = cli("-A", APP, "purge-bugs", "cli.purge.bugs", "--reason", "expired", "--older-than", "7d", input="n\n")
    assert ran.code == 1 and "Delete 15 messages from cli.purge.bugs for good?" in ran.out
    settled(vhost, "cli.purge.bugs", 64)
    ran = cli("-A", APP, "purge-bugs", "cli.purge.bugs", "--reason", "expired", "--older-than", "7d", input="y\n")
    assert ran.code == 0 and ran.lines()[-1] == "deleted 15 messages from cli.purge.bugs"
    rest = [m for m in messages if not old_expired(m)]
    settled(vhost, "cli.purge.bugs", len(rest))

    ran = script("-A", APP, "purge-bugs", "cli.purge.bugs", "--task", "cli.other", "--reason", "exhausted", "--yes")
    assert ran.code == 0 and ran.out.strip() == "deleted 10 messages from cli.purge.bugs"
    rest = [m for m in rest if not ((m.headers or {}).get("task") == "cli.other"
                                    and m.headers.get("x-rare-reason") == "exhausted")]
    ran = cli("-A", APP, "purge-bugs", "cli.purge.bugs", "--task", "cli.nothing", "--yes")
    assert ran.code == 1 and "nothing to purge" in ran.err
    assert "--all" in one_line_error(cli("-A", APP, "purge-bugs", "cli.purge.bugs"))
    assert "not a duration: '7x'" in one_line_error(script("-A", APP, "purge-bugs", "cli.purge.bugs",
                                                           "--older-than", "7x"))
    settled(vhost, "cli.purge.bugs", len(rest))
    assert keys(drain(vhost.url, "cli.purge.bugs")) == [m.key() for m in rest]


# -- status ----------------------------------------------------------------------------------------

def test_status_numbers_match_what_is_there(vhost, env):
    publish(vhost.url, "cli.status", [bug_message("cli.watched", [i]) for i in range(7)])
    publish(vhost.url, "cli.status.bugs", [bug_message("cli.watched", [i], queue="cli.status") for i in range(4)])
    waiting = delay_queue(770_000)  # cli.watched's first retry waits 777 s: it starts in rare.wait.770s
    with Connection(vhost.url) as conn:
        waiting.bind(conn.default_channel).declare()
    delayed = [bug_message("cli.watched", [i], extra={"BCC": [waiting.routing_key]}) for i in range(3)]
    publish(vhost.url, "cli.status", delayed, declare=False, exchange=DELAY_EXCHANGE.name)  # as publish.to_delay does
    try:
        check_status(vhost)
    finally:  # the delay queue is shared by the session: leave nothing waiting in it
        for queue in (waiting.name, "cli.status", "cli.status.bugs"):
            drain(vhost.url, queue)


def check_status(vhost: Vhost) -> None:

    with Connection(vhost.url) as conn:  # a consumer on the work queue, holding one message
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        channel.basic_consume("cli.status", callback=lambda m: None)
        wait_for(lambda: vhost.queue_stats()["cli.status"]["unacked"] == 1, 10, what="the consumer")

        ran = cli("-A", APP, "status", "--json")
        assert ran.code == 0, ran.err
        report = json.loads(ran.out)
        [work] = [w for w in report["work_queues"] if w["queue"] == "cli.status"]
        assert work == {"queue": "cli.status", "kind": "classic", "exists": True, "ready": 6, "consumers": 1,
                        "bug_queues": [{"queue": "cli.status.bugs", "exists": True, "messages": 4}]}
        delays = {d["queue"]: d for d in report["delay_queues"]}
        assert delays["rare.wait.770s"] == {"queue": "rare.wait.770s", "kind": "classic", "delay_ms": 770_000, "delay": "12m50s",
                                             "exists": True, "messages": 3, "work_queues": ["cli.status"]}
        assert delays["rare.wait.68h"]["work_queues"] == ["cli.billing"]

        ran = script("-A", APP, "status")
        assert ran.code == 0, ran.err
        assert ["cli.status", "6", "1", "cli.status.bugs", "4"] in [line.split() for line in ran.lines()]
        assert ["rare.wait.770s", "12m50s", "3", "cli.status"] in [line.split() for line in ran.lines()]

        ran = script("-A", APP, "rare", "status", "cli.status", "--json", celery=True)  # celery -A APP rare ...
        assert ran.code == 0, ran.err
        report = json.loads(ran.out)
        assert [w["ready"] for w in report["work_queues"]] == [6]
        assert [(d["queue"], d["messages"]) for d in report["delay_queues"]] == [("rare.wait.770s", 3),
                                                                                 ("rare.wait.2h", None)]

        ran = cli("--broker", vhost.url, "status", "cli.status", "--scan", "--json")
        report = json.loads(ran.out)
        assert report["work_queues"][0]["ready"] == 6
        assert {"queue": "rare.wait.770s", "kind": "classic", "delay_ms": 770_000, "delay": "12m50s", "exists": True, "messages": 3,
                "work_queues": []} in report["delay_queues"]
        assert all(d["exists"] for d in report["delay_queues"])
        channel.close()


def test_status_shows_each_breaker_as_its_state_note_says_with_the_note_escaped(vhost, env):
    hostile_by, hostile_task = f"w1@host<script>{HOSTILE}", f"abc{HOSTILE}"

    def breaker(*args: str) -> dict:
        ran = cli("-A", APP, "status", "--json", *args)
        assert ran.code == 0, ran.err
        return {b["breaker"]: b for b in json.loads(ran.out).get("breakers", [])}

    def text() -> list[str]:
        """The header of the breakers section, cli-svc's row and its detail line (apps imported earlier
        in this test process add their shared tasks, and their breakers, to the app)."""
        ran = cli("-A", APP, "status")
        assert ran.code == 0, ran.err
        assert "\x1b" not in ran.out and "\x07" not in ran.out and "\u202e" not in ran.out, repr(ran.out)
        lines = ran.lines()
        row = next(i for i, line in enumerate(lines) if line.startswith("cli-svc "))
        header = next(line for line in reversed(lines[:row]) if line.startswith("BREAKER "))
        return [header, lines[row], lines[row + 1]]

    with breaker_notes(vhost.url, "cli-svc") as announce:
        never = breaker()["cli-svc"]
        assert (never["state"], never["gen"], never["tasks"]) == ("closed", 0, ["cli.metered"])
        assert never["settings"] == {"failures": 5, "within": 60.0, "open_for": 30.0, "max_open": 300.0, "rate": None,
                                     "concurrency": None}
        lines = text()
        assert lines[-3].split() == ["BREAKER", "STATE", "OPEN", "PERIODS", "TASKS"]
        assert lines[-2].split() == ["cli-svc", "closed", "(never", "opened)", "0", "cli.metered"]
        assert lines[-1].strip() == "trips after 5 failures in 1m, open 30s, at most 5m"

        note = open_note("cli-svc", 3, hostile_by, hostile_task)
        announce(note)
        got = wait_for(lambda: (b := breaker()["cli-svc"])["state"] == "open" and b, 10, 0.1, "the open state")
        assert (got["gen"], got["until"], got["open_for"], got["since"]) == (3, note["until"], 60.0, note["at"])
        assert (got["worker"], got["task"], got["problem"]) == (hostile_by, hostile_task, None)  # JSON keeps the value
        lines = text()
        row, detail = lines[-2], lines[-1]
        assert row.startswith("cli-svc ") and re.search(r" open until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in (1m|5\ds)\)",
                                                        row), row
        assert row.split()[-2:] == ["3", "cli.metered"]
        assert detail.strip() == ("trips after 5 failures in 1m, open 30s, at most 5m; opened by "
                                  "w1@host<script>\\x1b]0;owned\\x07\\x1b[2J\\x1b[1;31mred\\u202e, task "
                                  "abc\\x1b]0;owned\\x07\\x1b[2J\\x1b[1;31mred\\u202e")
        assert breaker("cli.status") == {}  # no task on that queue names a breaker

        announce({"breaker": "cli-svc", "kind": "probe", "gen": 3, "at": time.time() - 2, "by": hostile_by,
                  "task": hostile_task})
        wait_for(lambda: breaker()["cli-svc"]["state"] == "probing", 10, 0.1, "the probing state")
        assert " probing since " in text()[-2] and "probe by w1@host<script>\\x1b]0;owned" in text()[-1]

        announce(b"<script>not a note")
        got = wait_for(lambda: (b := breaker()["cli-svc"])["state"] == "unknown" and b, 10, 0.1, "the bad note")
        assert got["problem"] == "the state note is not one: not a JSON object" and got["gen"] is None
        assert "unknown (the state note is not one: not a JSON object)" in text()[-2]
    assert "rare.breaker.cli-svc" not in vhost.queue_stats()


# -- schedule --------------------------------------------------------------------------------------

BILLING = """\
cli.charge: backoff exponential(60, cap=259200.0), max_attempts=None, shelf life 7d, fallback cli.notify_disconnect
work queue cli.billing (classic), bug queue cli.billing.bugs

  attempt  1  +00:00:00       first run
  attempt  2  +00:01:00       1m after attempt 1 (in rare.wait.1m)
  attempt  3  +00:03:00       2m after attempt 2 (in rare.wait.2m)
  attempt  4  +00:07:00       4m after attempt 3 (in rare.wait.4m)
  attempt  5  +00:15:00       8m after attempt 4 (in rare.wait.8m)
  attempt  6  +00:31:00       16m after attempt 5 (in rare.wait.16m)
  attempt  7  +01:03:00       32m after attempt 6 (in rare.wait.32m)
  attempt  8  +02:07:00       1h4m after attempt 7 (in rare.wait.64m)
  attempt  9  +04:15:00       2h8m after attempt 8 (in rare.wait.7600s, then 1m20s more)
  attempt 10  +08:31:00       4h16m after attempt 9 (in rare.wait.250m, then 6m more)
  attempt 11  +17:03:00       8h32m after attempt 10 (in rare.wait.510m, then 2m more)
  attempt 12  +1d 10:07:00    17h4m after attempt 11 (in rare.wait.17h, then 4m more)
  attempt 13  +2d 20:15:00    1d10h8m after attempt 12 (in rare.wait.34h, then 8m more)
  attempt 14  +5d 16:31:00    2d20h16m after attempt 13 (in rare.wait.68h, then 16m more)
  shelf life ends at +7d 00:00:00
then: attempt 15 would start at +8d 16:31:00, after the shelf life, so when attempt 14 fails the work hops to \
cli.notify_disconnect (reason: expired)
at any attempt: a Bug, or an exception that is not retried (retry_on: Exception), goes to cli.billing.bugs at \
once (reason: bug)

-- hop 1: cli.notify_disconnect takes over at +5d 16:31:00 (fresh attempts, shelf life)
cli.notify_disconnect: backoff manual([10, 60]), max_attempts=3, shelf life none
work queue cli.default (classic), bug queue cli.default.bugs

  attempt 1  +5d 16:31:00    first run
  attempt 2  +5d 16:31:10    10s after attempt 1 (in rare.wait.10s)
  attempt 3  +5d 16:32:10    1m after attempt 2 (in rare.wait.1m)
then: attempt 3 is the last; when it fails the message goes to cli.default.bugs (reason: exhausted)
at any attempt: a Bug, or an exception that is not retried (retry_on: Exception), goes to cli.default.bugs at \
once (reason: bug)
"""


def test_schedule_of_the_billing_policy_needs_no_broker(env):
    assert cli("-A", APP, "schedule", "cli.charge").out == BILLING
    nowhere = {"RARE_TEST_BROKER": "amqp://guest:guest@127.0.0.1:1//"}
    assert script("-A", APP, "schedule", "cli.charge", env=nowhere).out == BILLING
    short = cli("-A", APP, "schedule", "cli.charge", "--attempts", "3").lines()
    assert short[3:7] == ["  attempt  1  +00:00:00       first run",
                          "  attempt  2  +00:01:00       1m after attempt 1 (in rare.wait.1m)",
                          "  ... 11 more attempts ...",
                          BILLING.splitlines()[16]]
    assert "reason: exhausted" in cli("-A", APP, "schedule", "cli.record").out
    notify = cli("-A", APP, "schedule", "cli.notify").lines()  # one timeline per payload handler
    assert [line for line in notify if line.startswith("cli.")] == [
        "cli.notify[email]: backoff constant(1), max_attempts=2, shelf life none, fallback cli.letter",
        "cli.letter: backoff constant(60), max_attempts=2, shelf life none, fallback cli.notify",
        "cli.notify[sms]: backoff manual([5, 30]), max_attempts=3, shelf life none"]
    assert ("  that hop is refused (hop loop: cli.notify -> cli.letter -> cli.notify): the message goes to "
            "cli.default.bugs (reason: hop_limit)") in notify
    assert "cli.broken, cli.charge, cli.inspected" in one_line_error(cli("-A", APP, "schedule", "cli.plain"))
    assert "needs the app" in one_line_error(script("schedule", "cli.charge"))


# -- declare ---------------------------------------------------------------------------------------

def test_declare_creates_the_topology_and_explains_a_clash(env):
    other = Vhost()  # an empty vhost of its own: the declared set is exactly what is checked
    try:
        # in a subprocess: this test process also holds other test apps, whose shared tasks every app sees
        dry = script("-A", APP, "--broker", other.url, "declare", "--dry-run")
        assert dry.code == 0 and other.queue_stats() == {}
        names = [line.split()[3] for line in dry.lines() if line.startswith("would declare queue")]
        assert {"cli.billing", "cli.billing.bugs", "cli.real.dead", "rare.wait.1m", "rare.wait.68h",
                "rare.wait.770s", "rare.wait.200ms"} <= set(names)
        assert dry.lines()[0].split()[:4] == ["would", "declare", "exchange", "rare.delay"]

        ran = script("-A", APP, "--broker", other.url, "declare")
        assert ran.code == 0, ran.err
        assert set(other.queue_stats()) == set(names)
        assert cli("-A", APP, "--broker", other.url, "declare").code == 0  # again: nothing changes

        with Connection(other.url) as conn:
            channel = conn.channel()
            channel.queue_delete("cli.billing.bugs")
            channel.queue_declare("cli.billing.bugs", durable=True, auto_delete=False,
                                  arguments={"x-queue-type": "quorum"})
        text = one_line_error(cli("-A", APP, "--broker", other.url, "declare"))
        assert "queue 'cli.billing.bugs'" in text and "x-queue-type" in text and "rabbitmqctl delete_queue" in text
    finally:
        other.delete()


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("run", [cli, script], ids=["runner", "script"])
def test_errors_are_one_line_with_the_password_masked(vhost, env, run):
    text = one_line_error(run("--broker", "amqp://guest:s3cret@127.0.0.1:1/x", "inspect-bugs", "q.bugs"))
    assert "cannot connect to amqp://guest:**@127.0.0.1:1/x" in text and "s3cret" not in text
    bad = vhost.url.replace("guest:guest", "guest:wrong")
    text = one_line_error(run("--broker", bad, "status", "q"))
    assert "ACCESS_REFUSED" in text and "wrong" not in text
    assert "queue 'no.such.q.bugs' does not exist at amqp://guest:**@" in one_line_error(
        run("--broker", vhost.url, "inspect-bugs", "no.such.q.bugs"))
    assert "not a duration: '1hour'" in one_line_error(run("--broker", vhost.url, "inspect-bugs", "q.bugs",
                                                           "--since", "1hour"))
    assert "cannot load the app 'tests.apps.nope'" in one_line_error(run("-A", "tests.apps.nope", "status"))
    assert "pass -A/--app APP" in one_line_error(run("inspect-bugs", "q"))
    assert "No such option '--bogus'. (see 'rare-celery status -h')" in one_line_error(run("--broker", vhost.url, "status", "--bogus"))


# -- text from messages reaches the terminal escaped (issue 10, item 11) ----------------------------------

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[1;31mred\u202e"


def test_escape_sequences_from_a_message_never_reach_the_terminal(vhost):
    queue = f"cli.hostile.{uuid.uuid4().hex[:6]}.bugs"
    evil = bug_message(task=f"cli.{HOSTILE}", error=f"boom {HOSTILE}", task_id=f"id-{HOSTILE}",
                       queue=f"cli.{HOSTILE}")
    publish(vhost.url, queue, [evil])
    for ran in (cli("--broker", vhost.url, "inspect-bugs", queue),
                cli("--broker", vhost.url, "requeue-bugs", queue, "--all", "--dry-run")):
        text = ran.out + ran.err
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, repr(text)
        assert "\\x1b]0;owned\\x07" in text  # shown, as visible escapes
    shown = cli("--broker", vhost.url, "inspect-bugs", queue, "--json")
    assert "\x1b" not in shown.out and shown.json_lines()[0]["error"] == f"boom {HOSTILE}"  # JSON keeps the value
