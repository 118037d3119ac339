"""Scale scenarios (issue 28): a million waiting retries, a million bugs, 500 delays, the cost per delay().

    python bench/scale.py waiting --kinds classic quorum       # 1,000,000 retries waiting in delay queues
    python bench/scale.py bugs                                  # a bug queue of 1,000,000 messages
    python bench/scale.py delays                                # 500 distinct delays in use at once
    python bench/scale.py cost                                  # p50/p99 of delay(), idle and busy broker
    python bench/scale.py all --quick                           # every scenario, small sizes, < 1 minute each

Run them against a RabbitMQ of their own, never the shared one (see bench/README.md, "Scale"):
``--host 127.0.0.1:5697 --ctl "rabbitmqctl -n rare-bench@localhost"`` are the defaults. Each scenario gets a
fresh vhost, deleted afterwards (also on Ctrl-C or an error). Every table is printed and appended, with the
broker's version and the commit measured, to ``bench/results/<--out>.md`` (default ``scale``, ``--quick``:
``scale-quick``); the raw numbers to ``<--out>.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench``, ``tests`` and ``rare_celery`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import amqp
import psutil
from kombu import Connection, Producer

from bench.apps import QUEUE, fail_once_name, make_app
from bench.harness import ROOT, Records, Worker, percentile
from rare_celery import declare
from rare_celery import headers as hdr
from rare_celery.batch import Bulk
from rare_celery.publish import to_bugs, to_delay
from rare_celery.topology import CLASSIC, QUORUM, RETURN_EXCHANGE, bug_queue_name, delay_kind

RESULTS = ROOT / "bench" / "results"
MB = 1e6


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the broker under test ------------------------------------------------------------------------

class Broker:
    """The RabbitMQ node the scenarios run on: AMQP at ``host``, managed by the ``ctl`` command."""

    def __init__(self, host: str, ctl: str, data_root: str = "") -> None:
        self.host, self.ctl_cmd, self.data_root = host, shlex.split(ctl), data_root
        self.vhosts: set[str] = set()

    def ctl(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run([*self.ctl_cmd, "-q", *args], capture_output=True, text=True, timeout=timeout,
                             check=False)
        if out.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout.strip()

    def eval(self, expr: str) -> str:
        return self.ctl("eval", expr)

    def version(self) -> str:
        return self.eval("rabbit_misc:version().").strip('"')

    def memory(self) -> int:
        """The node's Erlang VM memory (``erlang:memory(total)``), bytes."""
        return int(self.eval("erlang:memory(total)."))

    def settled_memory(self, limit: float = 60.0) -> int:
        """The node's memory once two readings 2 s apart differ by less than 1 % (at most ``limit`` s)."""
        last, deadline = self.memory(), time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(2)
            now = self.memory()
            if abs(now - last) < 0.01 * max(last, 1):
                return now
            last = now
        return last

    def data_dir(self) -> Path:
        for expr in ("rabbit:data_dir().", "rabbit_mnesia:dir()."):
            with contextlib.suppress(RuntimeError):
                out = self.eval(expr).strip('"')
                if out.startswith("/"):
                    return Path(self.data_root + out)
        raise RuntimeError("cannot find the node's data directory")

    def disk(self) -> int:
        """Bytes in the node's data directory (its message stores, queue indexes and logs)."""
        total = 0
        for folder, _, files in os.walk(self.data_dir()):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    def process(self) -> psutil.Process | None:
        """The node's ``beam.smp`` (the one listening on our port)."""
        port = int(self.host.rsplit(":", 1)[1])
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
        return None

    def new_vhost(self, label: str) -> Vhost:
        name = f"rare-scale-{label}-{uuid.uuid4().hex[:6]}"
        self.vhosts.add(name)
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return Vhost(self, name)

    def delete_vhost(self, name: str) -> None:
        with contextlib.suppress(RuntimeError):
            self.ctl("delete_vhost", name, timeout=900)
        self.vhosts.discard(name)

    def queues(self, vhost: str) -> dict[str, int]:
        out = self.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
        return {p[0]: int(p[1]) for p in (line.split("\t") for line in out.splitlines())
                if len(p) == 2 and p[1].isdigit()}

    def settled_queues(self, vhost: str, limit: float = 60.0) -> dict[str, int]:
        """``list_queues`` once two readings agree (quorum queues report on a timer)."""
        last, deadline = self.queues(vhost), time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(1)
            now = self.queues(vhost)
            if now == last:
                return now
            last = now
        return last


class Vhost:
    def __init__(self, broker: Broker, name: str) -> None:
        self.broker, self.name = broker, name
        self.url = f"amqp://guest:guest@{broker.host}/{urllib.parse.quote(name, safe='')}"

    def delete(self) -> None:
        self.broker.delete_vhost(self.name)


# -- CPU of other processes -------------------------------------------------------------------------

class OtherCpu:
    """Cores used by processes other than ours (this one, its children, the broker) while a step lasts."""

    def __init__(self, broker: Broker, extra: Callable[[], list[psutil.Process]] = list) -> None:
        self.beam, self.extra, self.me = broker.process(), extra, psutil.Process()
        self.start = self._sample()

    def _ours(self) -> float:
        total = 0.0
        for proc in [self.me, *self.me.children(recursive=True), *([self.beam] if self.beam else [])]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + (t.children_user + t.children_system if proc is self.me else 0)
        return total

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        return time.monotonic(), sum(t) - t.idle - getattr(t, "iowait", 0.0), self._ours()

    def cores(self) -> float:
        (t0, b0, o0), (t1, b1, o1) = self.start, self._sample()
        return max(0.0, (b1 - b0) - (o1 - o0)) / max(t1 - t0, 1e-6)


class PeakRss:
    """The node's RSS (``beam.smp``, psutil: no rabbitmqctl call), sampled every 0.5 s in a thread: its peak."""

    def __init__(self, broker: Broker) -> None:
        self.proc, self.peak, self.stopped = broker.process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.5):
            with contextlib.suppress(psutil.Error, AttributeError):
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> float:
        self.stopped.set()
        self.thread.join()
        return self.peak / MB


# -- messages as rare_celery writes them -------------------------------------------------------------

def task_message(app: Any, task: str, size: int, extra: dict[str, Any]) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """A Celery protocol-2 message of ``task`` with ``extra`` headers, padded so that body + headers are about
    ``size`` bytes: (body, headers, properties)."""
    tid = str(uuid.uuid4())
    msg = app.amqp.as_task_v2(tid, task, args=[""], retries=1)
    headers = {**msg.headers, **extra}
    bare = json.dumps([[""], {}, msg.body[2]]).encode()
    used = len(bare) + len(json.dumps(headers, default=str))
    pad = "x" * max(0, size - used)
    body = json.dumps([[pad], {}, msg.body[2]]).encode()
    props = {"correlation_id": tid, "content_type": "application/json", "content_encoding": "utf-8"}
    return body, headers, props


def last_error() -> dict[str, Any]:
    try:
        raise ConnectionError("the service did not answer (bench/scale.py)")
    except ConnectionError as exc:
        return hdr.error(exc)


class Publisher:
    """Publishes many messages on one channel, confirms awaited in a window (``rare_celery.batch.Bulk``
    counts them), as fast as the broker takes them."""

    WINDOW = 5000

    def __init__(self, app: Any, url: str) -> None:
        self.conn = Connection(url, transport_options={"confirm_publish": False})
        self.conn.connect()
        self.channel = self.conn.channel()
        self.channel.confirm_select()
        self.bulk = Bulk(app, self.channel)
        self.producer = Producer(self.channel)

    def publish(self, body: bytes, exchange: str, routing_key: str, headers: dict[str, Any],
                properties: dict[str, Any]) -> None:
        self.producer.publish(body, exchange=exchange, routing_key=routing_key, headers=headers, delivery_mode=2,
                              retry=False, **properties)
        while len(self.bulk.sent) - self.bulk.answered > self.WINDOW:
            self.conn.drain_events(timeout=60)

    def finish(self) -> None:
        self.bulk.wait(600)
        self.conn.release()


def rss_mb(proc: psutil.Process | None) -> float:
    total = 0
    for p in ([proc, *proc.children(recursive=True)] if proc else []):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / MB


# -- 1. retries waiting in delay queues ------------------------------------------------------------

def waiting(broker: Broker, kind: str, n: int, delay: float, size: int) -> dict[str, Any]:
    """``n`` retries published straight to one delay queue (``delay`` s, on the grid), each due ``delay`` s
    after its own publish: memory and disk per waiting message, the worker's RSS while they wait, then the
    lateness with which each reaches the work queue (read by a plain consumer: the worker is stopped first)."""
    vhost = broker.new_vhost(f"wait-{kind}")
    workdir = Path(tempfile.mkdtemp(prefix="rare-scale-"))
    variant = "rare-quorum" if kind == QUORUM else "rare"
    app = make_app(variant, vhost.url, str(workdir), delays=(delay,))
    out: dict[str, Any] = {"scenario": "waiting", "kind": kind, "messages": n, "delay_s": delay, "size": size}
    worker = None
    try:
        mem0, disk0 = broker.settled_memory(), broker.disk()
        worker = Worker(variant, vhost, workdir, delays=(delay,))  # declares the work queue, waits on it
        worker.wait_ready(Records(workdir))
        out["worker_rss_idle_mb"] = worker.memory()["rss_mb"]
        assert delay_kind(app, QUEUE) == kind
        now = time.time()
        base = {**hdr.write(hdr.Attempt(number=2, first_at=now, due=now + delay, queue=QUEUE)), **last_error(),
                **hdr.new_copy()}
        body, headers, props = task_message(app, fail_once_name(delay), size, base)
        copy = to_delay(QUEUE, delay, kind, body, headers, props)
        out["delay_queue"] = copy.target.name
        out["message_bytes"] = len(body) + len(json.dumps(copy.headers, default=str))
        pub = Publisher(app, vhost.url)
        for entity in (copy.unrouted, RETURN_EXCHANGE, copy.target):
            declare.once(pub.channel, entity)
        declare.bind_return_once(pub.channel, QUEUE)
        cpu = OtherCpu(broker, worker.processes)
        out["broker_rss_before_mb"] = rss_mb(broker.process()) if broker.process() else None
        peak = PeakRss(broker)
        started = time.time()
        rss_samples = []
        for i in range(n):
            h = dict(copy.headers)
            tid = str(uuid.uuid4())
            h["id"] = h["root_id"] = tid
            h[hdr.COPY] = uuid.uuid4().hex
            h[hdr.DUE] = time.time() + delay
            pub.publish(body, copy.exchange, copy.routing_key, h, {**copy.properties, "correlation_id": tid})
            if i % 100_000 == 0:
                rss_samples.append(worker.memory()["rss_mb"])
        pub.finish()
        out["publish_s"] = time.time() - started
        out["publish_per_s"] = n / out["publish_s"]
        out["publish_other_cores"] = cpu.cores()
        first_due = started + delay
        if time.time() > first_due - 5:
            out["note"] = "the first messages came due before publishing ended: memory and disk not comparable"
        mem1 = broker.settled_memory(limit=min(60.0, max(5.0, first_due - time.time() - 30)))
        disk1 = broker.disk()
        queues = broker.settled_queues(vhost.name, limit=10)
        out["waiting"] = queues.get(copy.target.name, 0)
        listed = broker.ctl("list_queues", "-p", vhost.name, "--no-table-headers", "name", "arguments")
        out["mode"] = "lazy" if any(line.startswith(copy.target.name + "\t") and "lazy" in line
                                    for line in listed.splitlines()) else "default"
        out["broker_mem_mb"] = (mem1 - mem0) / MB
        out["mem_per_msg_b"] = (mem1 - mem0) / n
        out["disk_per_msg_b"] = (disk1 - disk0) / n
        # the worker while they wait: sampled until 15 s before the first one is due
        while time.time() < first_due - 15:
            rss_samples.append(worker.memory()["rss_mb"])
            time.sleep(min(5.0, max(0.1, first_due - 15 - time.time())))
        rss_samples.append(worker.memory()["rss_mb"])
        out["worker_rss_wait_mb"] = max(rss_samples)
        out["broker_rss_peak_mb"] = peak.stop()  # publishing and waiting
        worker.kill()
        cpu = OtherCpu(broker)
        late = consume_due(vhost, n, first_due, timeout=delay + out["publish_s"] + 900)
        out["other_cores"] = cpu.cores()
        out.update(late)
        return out
    finally:
        if worker is not None:
            worker.kill()
        vhost.delete()


def consume_due(vhost: Vhost, n: int, first_due: float, timeout: float, stall: float = 120.0) -> dict[str, Any]:
    """Read ``n`` messages from the work queue as they come back; lateness = arrival - ``x-rare-due``."""
    parsed = urllib.parse.urlparse(vhost.url)
    conn = amqp.Connection(f"{parsed.hostname}:{parsed.port}", userid="guest", password="guest",
                           virtual_host=vhost.name, heartbeat=0)
    conn.connect()
    channel = conn.channel()
    lateness: list[float] = []
    arrived: list[float] = []

    def on(message: Any) -> None:
        now = time.time()
        arrived.append(now)
        lateness.append(now - float(message.headers[hdr.DUE]))

    channel.basic_consume(QUEUE, callback=on, no_ack=True)
    deadline, last, last_change = time.monotonic() + timeout, 0, time.monotonic()
    try:
        while len(lateness) < n and time.monotonic() < deadline:
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=1)
            if len(lateness) != last:
                last, last_change = len(lateness), time.monotonic()
            elif time.time() > first_due and time.monotonic() - last_change > stall:
                break
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    out: dict[str, Any] = {"came_back": len(lateness)}
    if len(arrived) > 1:  # the pace they came back at, first to last
        out["back_per_s"] = len(arrived) / max(arrived[-1] - arrived[0], 1e-6)
    if lateness:
        out.update(late_p50_s=percentile(lateness, 50), late_p99_s=percentile(lateness, 99),
                   late_max_s=max(lateness), early=sum(1 for x in lateness if x < 0))
    return out


# -- 2. a bug queue of a million messages ------------------------------------------------------------

REASONS = ("exhausted", "bug", "expired", "exhausted", "exhausted")
TASKS = ("billing.charge", "notify.sms", "translate.deepl", "report.build")


def fill_bugs(vhost: Vhost, app: Any, n: int, size: int) -> float:
    """``n`` messages in ``bench.bugs`` as rare_celery routes them there (several reasons, tasks, errors)."""
    name = bug_queue_name(QUEUE)
    pub = Publisher(app, vhost.url)
    templates = []
    now = time.time()
    for i in range(20):
        task, reason = TASKS[i % len(TASKS)], REASONS[i % len(REASONS)]
        try:
            raise ValueError(f"error kind {i % 7}: the input was refused")
        except ValueError as exc:
            err = hdr.error(exc)
        extra = {**hdr.write(hdr.Attempt(number=4, first_at=now - 600, queue=QUEUE)), **err, **hdr.new_copy(),
                 **hdr.bug(reason, 4, task, now)}
        body, headers, props = task_message(app, task, size, extra)
        templates.append(to_bugs(name, body, headers, props))
    declare.once(pub.channel, templates[0].target)
    started = time.time()
    for i in range(n):
        copy = templates[i % len(templates)]
        h = dict(copy.headers)
        tid = str(uuid.uuid4())
        h["id"] = h["root_id"] = tid
        h[hdr.COPY] = uuid.uuid4().hex
        pub.publish(copy.body, copy.exchange, copy.routing_key, h, {**copy.properties, "correlation_id": tid})
    pub.finish()
    return time.time() - started


def bugs_scenario(broker: Broker, n: int, size: int, operator: bool = False) -> dict[str, Any]:
    from tests.web_support import WebServer

    vhost = broker.new_vhost("bugs")
    workdir = Path(tempfile.mkdtemp(prefix="rare-scale-"))
    app = make_app("rare", vhost.url, str(workdir))
    queue = bug_queue_name(QUEUE)
    out: dict[str, Any] = {"scenario": "bugs", "messages": n, "size": size}
    server = None
    try:
        out["fill_s"] = fill_bugs(vhost, app, n, size)
        say(f"[bugs] {n:,} published in {out['fill_s']:.1f} s")
        out["depth"] = broker.settled_queues(vhost.name, limit=10).get(queue, 0)
        cli = [sys.executable, "-m", "rare_celery.tools.cli", "--broker", vhost.url]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        cpu = OtherCpu(broker)
        t = time.monotonic()
        done = subprocess.run([*cli, "inspect-bugs", queue, "--limit", "50"], capture_output=True, text=True,
                              env=env, timeout=900, check=False)
        out["inspect_limit50_s"] = time.monotonic() - t
        out["inspect_limit50_rows"] = max(0, len(done.stdout.splitlines()) - 2)  # a header, a summary
        out["inspect_other_cores"] = cpu.cores()
        say(f"[bugs] inspect-bugs --limit 50: {out['inspect_limit50_s']:.2f} s")

        server = WebServer("--broker", vhost.url)
        page = server.get("/")  # the overview (the token cookie is set by WebServer)
        out["overview_s"] = _timed(lambda: server.get("/"))[0]
        cpu = OtherCpu(broker, lambda: [psutil.Process(server.proc.pid)])
        t = time.monotonic()
        page = server.get(f"/queue?q={urllib.parse.quote(queue)}")
        out["first_response_s"] = time.monotonic() - t
        out["first_response_rows"] = page.text.count('class="message-row"')
        out["first_response_is_progress"] = 'id="job"' in page.text
        first_rows = None if out["first_response_is_progress"] else out["first_response_s"]
        complete = None
        say(f"[bugs] first response in {out['first_response_s']:.2f} s: {out['first_response_rows']} rows")
        while time.monotonic() - t < 900:
            if first_rows is None or complete is None:
                try:
                    page = _get(server, f"/queue?q={urllib.parse.quote(queue)}", 30)
                except OSError as exc:  # noted, asked again
                    out["hung_requests"] = out.get("hung_requests", 0) + 1
                    say(f"[bugs] a page did not answer in 30 s ({exc}) at {time.monotonic() - t:.0f} s")
                    continue
                if 'id="snapshot"' in page.text:
                    first_rows = first_rows or time.monotonic() - t
                    if "Reading it again now" not in page.text and "Still reading" not in page.text:
                        complete = time.monotonic() - t
                        out["counts_text"] = " ".join(re.sub(r"<[^>]+>", " ", page.text.split('id="snapshot"')[1]
                                                             .split("</p>")[0]).split())[:300]
                        break
            with contextlib.suppress(psutil.Error):
                out["web_rss_peak_mb"] = max(out.get("web_rss_peak_mb", 0.0), rss_mb(psutil.Process(server.proc.pid)))
            time.sleep(2)
        out["first_rows_s"] = first_rows
        out["counts_s"] = complete
        out["web_other_cores"] = cpu.cores()
        server.proc.kill()
        server = None
        if operator:
            out.update(operator_actions(broker, vhost, cli, env, queue))
        t = time.monotonic()
        broker.ctl("purge_queue", "-p", vhost.name, queue, timeout=900)
        out["rabbitmqctl_purge_s"] = time.monotonic() - t
        return out
    finally:
        if server is not None:
            server.proc.kill()
        vhost.delete()


def operator_actions(broker: Broker, vhost: Vhost, cli: list[str], env: dict[str, str], queue: str) -> dict[str, Any]:
    """What an operator does with a big bug queue, each timed: its failure groups (a whole read), a requeue of one
    task's messages at a pace, a purge of one reason's (the tools' own commands, as an operator runs them)."""
    out: dict[str, Any] = {}

    def run(key: str, *args: str) -> str:
        cpu = OtherCpu(broker)
        t = time.monotonic()
        done = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=3600, check=False)
        out[key + "_s"] = time.monotonic() - t
        out[key + "_other_cores"] = cpu.cores()
        last = (done.stdout.strip().splitlines() or [""])[-1] + " " + (done.stderr.strip().splitlines() or [""])[-1]
        out[key + "_said"] = last.strip()[:200]
        return done.stdout

    run("groups", "inspect-bugs", queue, "--groups")
    with Connection(vhost.url) as conn:
        conn.default_channel.queue_declare("scale.requeued", durable=True, auto_delete=False)
    run("requeue", "requeue-bugs", queue, "--task", "notify.sms", "--to", "scale.requeued", "--rate", "5000/s", "--yes")
    run("purge", "purge-bugs", queue, "--reason", "expired", "--yes")
    out["left"] = broker.settled_queues(vhost.name, limit=10).get(queue)
    return out


def _get(server: Any, path: str, timeout: float) -> Any:
    """``server.get(path)`` (tests.web_support.WebServer) with a shorter timeout."""
    request = urllib.request.Request(server.url + path, headers={"Cookie": server.cookie} if server.cookie else {})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return type("Page", (), {"text": r.read().decode()})


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.monotonic()
    result = fn()
    return time.monotonic() - t, result


# -- main ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="+", choices=["waiting", "bugs", "delays", "cost", "all"])
    p.add_argument("--host", default="127.0.0.1:5697", help="the broker's AMQP address (guest/guest)")
    p.add_argument("--ctl", default="rabbitmqctl -n rare-bench@localhost", help="the rabbitmqctl command of that node")
    p.add_argument("--data-root", default="", help="prefix of the node's data directory (a node in a chroot)")
    p.add_argument("--quick", action="store_true", help="small sizes: each scenario in under a minute")
    p.add_argument("--messages", type=int, help="messages (waiting, bugs; default 1,000,000, --quick 20,000)")
    p.add_argument("--kinds", nargs="+", default=[CLASSIC, QUORUM], choices=[CLASSIC, QUORUM])
    p.add_argument("--delay", type=float, help="the retry delay of 'waiting', on the grid (default 360, --quick 20)")
    p.add_argument("--size", type=int, default=1024, help="bytes of body + headers per message (default 1024)")
    p.add_argument("--distinct", type=int, help="distinct delays of 'delays' (default 500, --quick 50)")
    p.add_argument("--calls", type=int, help="delay() calls per variant of 'cost' (default 5,000, --quick 500)")
    p.add_argument("--out", help="results base name in bench/results (default scale, --quick: scale-quick)")
    p.add_argument("--operator", action="store_true",
                   help="bugs: also time --groups, a paced requeue and a purge with the CLI (whole reads)")
    p.add_argument("--label", default="", help="a note written with every row (e.g. 'before', 'lazy')")
    args = p.parse_args(argv)
    if "all" in args.scenarios:
        args.scenarios = ["waiting", "bugs", "delays", "cost"]
    args.messages = args.messages or (20_000 if args.quick else 1_000_000)
    args.delay = args.delay or (20.0 if args.quick else 360.0)
    args.distinct = args.distinct or (50 if args.quick else 500)
    args.calls = args.calls or (500 if args.quick else 5000)
    args.out = args.out or ("scale-quick" if args.quick else "scale")
    return args


def code_version() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *cmd], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "rare_celery") else ""
    return git("rev-parse", "--short", "HEAD") + dirty


def record(args: argparse.Namespace, broker_version: str, row: dict[str, Any]) -> None:
    row = {**row, "label": args.label, "rabbitmq": broker_version, "commit": code_version(),
           "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / f"{args.out}.jsonl").open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    say(json.dumps(row, default=str))
    (RESULTS / f"{args.out}-tables.md").write_text(report(args.out))


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


TABLES: dict[str, tuple[str, list[tuple[str, str, int]]]] = {
    "waiting": ("Retries waiting in delay queues", [
        ("label", "run", 0), ("rabbitmq", "RabbitMQ", 0), ("kind", "delay queue", 0), ("mode", "mode", 0), ("messages", "messages", 0),
        ("message_bytes", "bytes each", 0), ("publish_s", "publish s", 1), ("publish_per_s", "msg/s", 0),
        ("mem_per_msg_b", "broker RAM B/msg", 0), ("disk_per_msg_b", "disk B/msg", 0),
        ("broker_rss_before_mb", "broker RSS before MB", 0), ("broker_rss_peak_mb", "broker RSS peak MB", 0),
        ("worker_rss_idle_mb", "worker RSS idle MB", 1), ("worker_rss_wait_mb", "worker RSS waiting MB", 1),
        ("came_back", "came back", 0), ("back_per_s", "back msg/s", 0), ("late_p50_s", "late p50 s", 2), ("late_p99_s", "late p99 s", 2),
        ("late_max_s", "late max s", 2), ("early", "early", 0), ("other_cores", "other cores", 2)]),
    "bugs": ("A bug queue of many messages", [
        ("label", "run", 0), ("rabbitmq", "RabbitMQ", 0), ("depth", "messages", 0), ("fill_s", "fill s", 1),
        ("first_response_s", "console: 1st response s", 2), ("first_response_rows", "rows in it", 0),
        ("first_rows_s", "console: 1st page of rows s", 2), ("counts_s", "console: read done s", 1),
        ("web_rss_peak_mb", "console RSS peak MB", 0), ("inspect_limit50_s", "inspect-bugs --limit 50 s", 2), ("rabbitmqctl_purge_s", "rabbitmqctl purge_queue s", 1),
        ("web_other_cores", "other cores", 2)]),
    "operator": ("What an operator does with a big bug queue (the CLI)", [
        ("label", "run", 0), ("rabbitmq", "RabbitMQ", 0), ("depth", "messages", 0),
        ("groups_s", "inspect-bugs --groups s", 1), ("requeue_s", "requeue-bugs --task (1/4) --rate 5000/s s", 1),
        ("requeue_said", "it said", 0), ("purge_s", "purge-bugs --reason expired s", 1), ("purge_said", "it said", 0),
        ("left", "left", 0)]),
    "delays": ("Distinct delays in use at once", [
        ("label", "run", 0), ("rabbitmq", "RabbitMQ", 0), ("distinct", "distinct delays", 0),
        ("per_delay", "retries each", 0), ("range_s", "range s", 0), ("delay_queues_at_publish", "queues at publish", 0),
        ("delay_queues_after", "queues after", 0), ("broker_mem_mb", "broker RAM MB (waiting)", 1), ("ran", "ran", 0),
        ("late_p50_s", "late p50 s", 3), ("late_p99_s", "late p99 s", 3), ("late_max_s", "late max s", 3),
        ("early", "early", 0), ("other_cores", "other cores", 2)]),
    "cost": ("The cost of delay() from one process", [
        ("label", "run", 0), ("rabbitmq", "RabbitMQ", 0), ("load", "broker", 0), ("variant", "variant", 0),
        ("calls", "calls", 0), ("p50_ms", "p50 ms", 3), ("p99_ms", "p99 ms", 3), ("max_ms", "max ms", 1),
        ("per_message_ms", "per message ms", 3), ("per_s", "calls/s", 0), ("other_cores", "other cores", 2)]),
}


def render(rows: list[dict[str, Any]]) -> str:
    """Markdown tables of every row recorded so far, one table per scenario."""
    out = []
    for scenario, (title, columns) in TABLES.items():
        mine = [r for r in rows if r.get("scenario") == scenario
                or (scenario == "operator" and r.get("scenario") == "bugs" and "groups_s" in r)]
        if not mine:
            continue
        out += [f"### {title}", "", "| " + " | ".join(c[1] for c in columns) + " |",
                "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(_f(r.get(key), digits) for key, _, digits in columns) + " |" for r in mine]
        notes = sorted({f"{r.get('label') or '-'}: {r['note']}" for r in mine if r.get("note")})
        out += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def report(name: str) -> str:
    path = RESULTS / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return render(rows)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    broker = Broker(args.host, args.ctl, args.data_root)
    signal.signal(signal.SIGTERM, _interrupt)
    version = broker.version()
    say(f"RabbitMQ {version} at {args.host}; {', '.join(args.scenarios)}; {args.messages:,} messages")
    try:
        for scenario in args.scenarios:
            if scenario == "waiting":
                for kind in args.kinds:
                    record(args, version, waiting(broker, kind, args.messages, args.delay, args.size))
            elif scenario == "bugs":
                record(args, version, bugs_scenario(broker, args.messages, args.size, args.operator))
            elif scenario == "delays":
                record(args, version, delays_scenario(broker, args.distinct, args.quick))
            elif scenario == "cost":
                for row in cost_scenario(broker, args.calls):
                    record(args, version, row)
    finally:
        for name in list(broker.vhosts):
            broker.delete_vhost(name)
    return 0


def delays_scenario(broker: Broker, distinct: int, quick: bool, per_delay: int = 20) -> dict[str, Any]:
    """``distinct`` different delays (jittered: distinct whole ms, spread over a minute) in use at once, ``per_delay``
    retries each, published as a RareTask's retries are (``to_delay``: the grid queue below the delay, the rest
    sent round again by the worker); a real worker runs them when due. Queues declared, broker memory while
    they wait, lateness of each run against its due time."""
    import random

    lo, hi = (10.0, 20.0) if quick else (30.0, 90.0)
    vhost = broker.new_vhost("delays")
    workdir = Path(tempfile.mkdtemp(prefix="rare-scale-"))
    app = make_app("rare", vhost.url, str(workdir), delays=(1.0,))
    out: dict[str, Any] = {"scenario": "delays", "distinct": distinct, "per_delay": per_delay, "range_s": [lo, hi]}
    worker = None
    try:
        rng = random.Random(28)
        delays = sorted(rng.sample(range(int(lo * 1000), int(hi * 1000)), distinct))
        mem0 = broker.settled_memory()
        records = Records(workdir)
        worker = Worker("rare", vhost, workdir, delays=(1.0,))
        worker.wait_ready(records)
        mem_worker = broker.settled_memory()
        now = time.time()
        base = {**hdr.write(hdr.Attempt(number=2, first_at=now, queue=QUEUE)), **last_error(), **hdr.new_copy()}
        body, headers, props = task_message(app, fail_once_name(1.0), 1024, base)
        pub = Publisher(app, vhost.url)
        declare.once(pub.channel, RETURN_EXCHANGE)
        declare.bind_return_once(pub.channel, QUEUE)
        due: dict[str, float] = {}
        cpu = OtherCpu(broker, worker.processes)
        started = time.time()
        for ms in delays:
            copy = to_delay(QUEUE, ms / 1000, CLASSIC, body, headers, props)
            for entity in (copy.unrouted, copy.target):
                declare.once(pub.channel, entity)
            for _ in range(per_delay):
                h = dict(copy.headers)
                tid = str(uuid.uuid4())
                h["id"] = h["root_id"] = tid
                h[hdr.COPY] = uuid.uuid4().hex
                h[hdr.DUE] = due[tid] = time.time() + ms / 1000
                pub.publish(body, copy.exchange, copy.routing_key, h, {**copy.properties, "correlation_id": tid})
        pub.finish()
        out["publish_s"] = time.time() - started
        queues = broker.queues(vhost.name)
        out["delay_queues_at_publish"] = sum(1 for q in queues if q.startswith("rare.wait."))
        out["broker_mem_mb"] = (broker.settled_memory(limit=max(4.0, lo - (time.time() - started) - 4)) - mem_worker) / MB
        n = len(due)
        records.wait(lambda r: len(r.ok) >= n, timeout=hi + 120, stall=60, worker=worker)
        lateness = [start - due[tid] for tid, _, start, _ in records.ok if tid in due]
        out["ran"] = len(lateness)
        out["delay_queues_after"] = sum(1 for q in broker.queues(vhost.name) if q.startswith("rare.wait."))
        out["other_cores"] = cpu.cores()
        out["worker_rss_mb"] = worker.memory()["rss_mb"]
        out["broker_mem_worker_mb"] = (mem_worker - mem0) / MB
        if lateness:
            out.update(late_p50_s=percentile(lateness, 50), late_p99_s=percentile(lateness, 99),
                       late_max_s=max(lateness), early=sum(1 for x in lateness if x < 0))
        return out
    finally:
        if worker is not None:
            worker.kill()
        vhost.delete()


def _load(url: str, stop: Any) -> None:
    """Keeps the broker busy: persistent 1 KB messages, unconfirmed, as fast as one process publishes them, into a
    queue that keeps its newest 10,000 (``x-max-length``: the load neither grows nor ends)."""
    with Connection(url) as conn:
        channel = conn.channel()
        channel.queue_declare("scale.load", durable=True, auto_delete=False,
                              arguments={"x-max-length": 10_000, "x-queue-type": "classic"})
        body = b"x" * 1024
        while not stop.is_set():
            for _ in range(200):
                channel.basic_publish(amqp.Message(body, delivery_mode=2), exchange="", routing_key="scale.load")


def cost_scenario(broker: Broker, calls: int) -> list[dict[str, Any]]:
    """p50/p99 of ``task.delay()`` from one process: a RareTask (each confirmed), a plain Celery task (no confirms),
    and RareTasks inside ``with rare_celery.bulk(app):`` (per message: the block's time / calls), on an idle
    broker and on one kept busy by another process (:func:`_load`)."""
    import multiprocessing

    import rare_celery

    vhost = broker.new_vhost("cost")
    workdir = Path(tempfile.mkdtemp(prefix="rare-scale-"))
    rows: list[dict[str, Any]] = []
    apps = {"rare": make_app("rare", vhost.url, str(workdir)), "plain": make_app("success-only", vhost.url, str(workdir))}
    try:
        for load in ("idle", "busy"):
            stop, loader = multiprocessing.Event(), None
            if load == "busy":
                loader = multiprocessing.Process(target=_load, args=(vhost.url, stop), daemon=True)
                loader.start()
                time.sleep(2)  # not a measurement: the load gets going
            try:
                for variant in ("plain", "rare", "rare-bulk"):
                    app = apps["rare" if variant == "rare-bulk" else variant]
                    task = app.tasks["bench.succeed"]
                    for i in range(50):  # warm-up: connections, declarations
                        task.delay(i)
                    cpu = OtherCpu(broker)  # the load process is a child: counted as ours
                    times = []
                    block = time.perf_counter()
                    with rare_celery.bulk(app) if variant == "rare-bulk" else contextlib.nullcontext():
                        for i in range(calls):
                            t = time.perf_counter()
                            task.delay(i)
                            times.append(time.perf_counter() - t)
                    block = time.perf_counter() - block
                    rows.append({"scenario": "cost", "load": load, "variant": variant, "calls": calls,
                                 "p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
                                 "max_ms": max(times) * 1000, "per_message_ms": block / calls * 1000,
                                 "per_s": calls / block, "other_cores": cpu.cores()})
                    say(json.dumps(rows[-1]))
                    with Connection(vhost.url) as conn:
                        conn.default_channel.queue_purge(QUEUE)
            finally:
                if loader is not None:
                    stop.set()
                    loader.join(10)
                    if loader.is_alive():
                        loader.kill()
        return rows
    finally:
        vhost.delete()


if __name__ == "__main__":
    sys.exit(main())
