"""The demo: start a worker, publish the three stories, print what happens as it happens.

    python -m example_project.demo [--profile demo|ci] [--json]

Starts a local "translation service" (down for its first seconds), a ``celery worker`` subprocess,
publishes a mix of tasks, and prints one line per event, read from Celery events (the worker's own
task-started/-succeeded/-failed/-retried, rare_celery's own ``rare-*`` events, and the
``rare-attempt`` event of ``example_project/timeline.py``). Then it
shows ``rare-celery inspect-bugs`` and ``rare-celery status``, a summary, stops the worker and exits
0 if every task is accounted for as expected (1 if not, 2 without a broker).
"""

from __future__ import annotations

import argparse
import ast
import heapq
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kombu.utils.uuid import uuid

DEADLINE = 100  # seconds: the demo must end well under 2 minutes
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TranslationService(ThreadingHTTPServer):
    """A DeepL-like ``POST /v2/translate`` that answers 503 for its first ``down_for`` seconds."""

    def __init__(self, down_for: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.up_at = time.time() + down_for
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v2/translate"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        service = self.server
        with service.lock:
            service.in_flight += 1
            service.requests += 1
            service.max_in_flight = max(service.max_in_flight, service.in_flight)
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if time.time() < service.up_at:
                return self._answer(503, {"message": "service unavailable"})
            text = (body.get("text") or [""])[0]
            if not text:
                return self._answer(400, {"message": "text is empty"})
            return self._answer(200, {"translations": [{"text": f"[{body.get('target_lang')}] {text}"}]})
        finally:
            with service.lock:
                service.in_flight -= 1

    def _answer(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


USERS = [
    {"name": "alice", "phone": "+15550001", "email": "alice@example.com", "device": "device-alice"},
    {"name": "bob", "phone": "+15550002", "email": "bob@example.com", "device": "device-bob"},
    {"name": "carol", "phone": "+15550003", "email": "carol@example.com", "device": "device-carol"},
    {"name": "dave", "phone": "+15550004", "email": "dave@example.com", "device": "device-dave"},
]
# label -> (expected end, how): "ok" succeeds where it started, "fallback" succeeds further down the
# chain, "bugs" ends in the bug queue.
EXPECTED = {
    "sms alice": "ok", "sms bob": "fallback", "sms carol": "fallback", "sms dave": "bugs",
    "translate #1": "ok", "translate #2": "ok", "translate #3": "ok", "translate (empty)": "bugs",
    "charge sub-ok": "ok", "charge sub-broke": "fallback", "charge sub-expired": "fallback",
}


ERROR = "\0error\0"  # where a retry line's error goes once Celery's task-retried names it


class Timeline:
    """Collects Celery events for the tasks this run published and prints one line each, in the
    order they happened (events from different worker processes can arrive a little out of order,
    so lines wait ``HOLD`` seconds and are printed sorted by the time the worker stamped on them)."""

    HOLD = 0.3

    def __init__(self, labels: dict[str, str], started: float, out) -> None:
        self.labels, self.started, self.out = labels, started, out
        self.pending: list[tuple[float, int, dict]] = []
        self.order = itertools.count()
        self.retries: dict[str, dict] = {}  # task id -> its last retry line, until task-retried names the error
        self.ended: dict[str, str] = {}   # task id -> "ok" | "fallback" | "bugs"
        self.published: dict[str, str] = {}  # task id -> the task it was published to
        self.names: dict[str, str] = {}  # task id -> the task running it now
        self.lock = threading.Lock()

    def line(self, task_id: str, text: str, **parts) -> dict:
        item = {"text": f"{self.labels[task_id]:<19} {text}", **parts}
        heapq.heappush(self.pending, (self.at, next(self.order), item))
        return item

    def flush(self, everything: bool = False) -> None:
        with self.lock:
            while self.pending and (everything or self.pending[0][0] < time.time() - self.HOLD):
                at, _, item = heapq.heappop(self.pending)
                text = item["text"].replace(ERROR, item["error"]) if "error" in item else item["text"]
                self.out(f"+{at - self.started:6.2f}s  {text}")

    def on_event(self, event: dict) -> None:
        task_id, kind = event.get("uuid"), event.get("type", "")
        if task_id not in self.labels:
            return
        with self.lock:
            self.at = event.get("timestamp") or time.time()
            if kind == "task-received":
                self.names[task_id] = event.get("name", "?")
            name = self.names.get(task_id, "?")
            if kind == "rare-attempt":
                self.line(task_id, f"{name}: attempt {event['attempt']} started")
            elif kind == "rare-retry":  # rare_celery's event names the exception's type; task-retried shows it
                kind_name = str(event.get("exception") or "?").rsplit(".", 1)[-1]
                self.retries[task_id] = self.line(
                    task_id, f"{name}: attempt {event['attempt']} failed ({ERROR}), again in {event['delay']:.2f}s",
                    error=_short(kind_name))
            elif kind == "task-retried" and task_id in self.retries:
                self.retries.pop(task_id)["error"] = _short(str(event.get("exception", "")))
            elif kind == "rare-hop":
                self.line(task_id, f"{event['source']} -> {event['target']} ({event['reason']})")
            elif kind == "rare-breaker-open":
                self.line(task_id, f"breaker {event['breaker']} open: no request until +"
                                   f"{event['until'] - self.started:.2f}s"
                                   f"{' (its probe failed)' if event.get('reopened') else ''}")
            elif kind == "rare-breaker-probe":
                self.line(task_id, f"{name}: probes breaker {event['breaker']}")
            elif kind == "rare-breaker-close":
                self.line(task_id, f"breaker {event['breaker']} closed: requests again")
            elif kind == "rare-wait" and event.get("breaker"):
                self.line(task_id, f"{name}: waits for breaker {event['breaker']}, not run")
            elif kind == "rare-bugs":
                self.ended[task_id] = "bugs"
                self.line(task_id, f"{name}: to bug queue {event['queue']} ({event['reason']}, "
                                   f"{event['attempts']} attempts)")
            elif kind == "task-succeeded":
                # a task id keeps its id across hops: finishing under another name is a fallback
                self.ended[task_id] = "ok" if name == self.published[task_id] else "fallback"
                self.line(task_id, f"{name}: succeeded -> {_short(_unrepr(event.get('result', '')))}")

    def done(self) -> bool:
        with self.lock:
            return len(self.ended) == len(self.labels)


def _short(text: str, limit: int = 60) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unrepr(text: str) -> str:
    try:
        return str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return text


def broker_reachable(url: str) -> str | None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any reason is the same answer: no broker
        return f"{Connection(url).as_uri()}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo", choices=["demo", "ci"])
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    options = parser.parse_args(argv)
    os.environ["RARE_PROFILE"] = options.profile
    url = os.environ.setdefault("RARE_BROKER_URL", "amqp://guest:guest@localhost:5672//")
    problem = broker_reachable(url)
    if problem:
        print(f"No RabbitMQ at {problem}. Start one: `apt-get install rabbitmq-server` (Debian/Ubuntu) or "
              f"`docker run -d -p 5672:5672 rabbitmq:3.13`, or set RARE_BROKER_URL.", file=sys.stderr)
        return 2

    service = TranslationService(down_for=4 if options.profile == "demo" else 2)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    os.environ["TRANSLATE_URL"] = service.url
    from example_project import app
    from example_project.app import QUEUES

    _purge(app, QUEUES)
    worker = _start_worker(QUEUES)
    started = time.time()
    try:
        return _run(app, service, worker, started, options)
    finally:
        _stop(worker)
        service.shutdown()


def _run(app, service, worker, started, options) -> int:
    from example_project.billing import charge
    from example_project.notify import send_sms
    from example_project.translate import translate

    print(f"demo: profile {options.profile}, broker {app.connection_for_write().as_uri()}, "
          f"translation service {service.url} (down for its first seconds), worker log {LOG}")
    work = [(f"sms {user['name']}", send_sms, (user, "Your code is 4242")) for user in USERS]
    work += [(f"translate #{n}", translate, (text, "DE"))
             for n, text in enumerate(["Hello", "Good morning", "Thank you"], 1)]
    work += [("translate (empty)", translate, ("", "DE"))]
    work += [(f"charge {sub}", charge, (sub,)) for sub in ("sub-ok", "sub-broke", "sub-expired")]
    ids = {label: uuid() for label, _, _ in work}
    labels = {task_id: label for label, task_id in ids.items()}
    timeline = Timeline(labels, started, print)
    timeline.published.update({ids[label]: task.name for label, task, _ in work})
    timeline.names.update(timeline.published)
    receiver = _receive_events(app, timeline)
    _wait_for_worker(app, worker)
    timeline.started = time.time()
    print("demo: worker ready; publishing")
    for label, task, args in work:
        task.apply_async(args, task_id=ids[label])

    deadline = time.time() + DEADLINE
    while not timeline.done() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.1)
        timeline.flush()
    receiver.should_stop = True
    timeline.flush(everything=True)
    time.sleep(0.5)  # let the broker settle its last acks before reading queue depths

    for command in (["inspect-bugs"], ["status"]):
        print(f"\n$ rare-celery -A example_project {' '.join(command)}")
        subprocess.run([sys.executable, "-m", "rare_celery.tools.cli", "-A", "example_project", *command],
                       cwd=ROOT, check=False)
    return _summary(labels, timeline, service, started, options)


def _summary(labels, timeline, service, started, options) -> int:
    outcome = {labels[i]: timeline.ended.get(i, "missing") for i in labels}
    counts = {k: sum(1 for v in outcome.values() if v == k) for k in ("ok", "fallback", "bugs", "missing")}
    expected = outcome == EXPECTED
    summary = {
        "published": len(labels), "succeeded": counts["ok"] + counts["fallback"], "fell_back": counts["fallback"],
        "in_bug_queue": counts["bugs"], "unaccounted": counts["missing"], "as_expected": expected,
        "translate_requests": service.requests, "translate_max_in_flight": service.max_in_flight,
        "seconds": round(time.time() - started, 1),
    }
    print(f"\ndemo: published {summary['published']}: {summary['succeeded']} succeeded "
          f"({summary['fell_back']} after a fallback or hop), {summary['in_bug_queue']} in the bug queue, "
          f"{summary['unaccounted']} unaccounted; translation requests {service.requests}, at most "
          f"{service.max_in_flight} in flight for 4 tasks; {summary['seconds']} s")
    if not expected:
        for label, got in outcome.items():
            if got != EXPECTED[label]:
                print(f"demo: {label}: expected {EXPECTED[label]}, got {got}")
    if options.json:
        print(json.dumps(summary))
    return 0 if expected else 1


def _purge(app, queues) -> None:
    """Start clean: empty the work and bug queues a previous run may have left."""
    with app.connection_for_write() as conn:
        for name in [*queues, *(f"{q}.bugs" for q in queues)]:
            channel = conn.channel()
            try:
                channel.queue_purge(name)
            except conn.channel_errors:
                pass  # not there yet
            finally:
                channel.close()


LOG = os.path.join(tempfile.gettempdir(), "rare-celery-demo-worker.log")


def _start_worker(queues) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "celery", "-A", "example_project", "worker", "-Q", ",".join(queues), "-E",
           "-P", "prefork", "-c", "4", "--without-mingle", "--without-gossip", "-l", "info",
           "-n", f"demo-{os.getpid()}@%h"]
    with open(LOG, "w") as log:  # the worker's own log: kept out of the timeline
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def _receive_events(app, timeline):
    conn = app.connection_for_read()
    receiver = app.events.Receiver(conn, handlers={"*": timeline.on_event})

    def capture():
        try:
            receiver.capture(limit=None, timeout=None, wakeup=False)
        finally:
            conn.release()
    threading.Thread(target=capture, daemon=True).start()
    return receiver


def _wait_for_worker(app, worker, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"demo: the worker exited with {worker.returncode}")
        if app.control.ping(timeout=0.5):
            return
    raise SystemExit("demo: the worker did not start in time")


if __name__ == "__main__":
    sys.exit(main())
