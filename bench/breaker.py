"""The outage measurement: a translation service down for a minute, with and without the circuit breaker.

    python bench/breaker.py                                  # 60 s outage, 2,000 tasks: bench/results/breaker.{md,json}
    python bench/breaker.py --down-for 15 --tasks 200 --out breaker-small
    python bench/breaker.py --variants breaker

Per variant, in a fresh vhost: a fake DeepL-like service in this process (``POST``, 503 for
``--down-for`` seconds from the first publish, then 200; every request counted with its time), two
``celery -A bench.breaker_app worker -Q <queue> -P prefork -c 2`` subprocesses, and ``--tasks`` tasks
published over the first ``--spread`` seconds of the outage. Measured: requests that reached the down
service, requests in all, the time from the service's recovery to the last task done, that every task
succeeded exactly once, and what is left in the bug and work queues. Workers are killed and vhosts
deleted at the end, also on Ctrl-C, SIGTERM or an error. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``rare_celery`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.breaker_app import QUEUES, TASKS, make_app
from bench.harness import ROOT, BenchError, Vhost, cleanup, machine, new_workdir, stale_vhosts
from bench.run import _interrupt, say, write
from example_project.demo import _Handler as DemoHandler

RESULTS = ROOT / "bench" / "results"
VARIANTS = tuple(QUEUES)  # breaker, plain
BREAKER_FAILURES = 5  # the breaker's default trip count (bench.breaker_app uses the defaults)


# -- the fake translation service -----------------------------------------------------------------

class Service(ThreadingHTTPServer):
    """A DeepL-like ``POST /v2/translate``: 503 until :meth:`start_outage` + ``down_for`` s, then 200.
    Every request is kept as (time, status, text): the text is the task id."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.down_from = self.up_at = math.inf  # down until the outage starts and ends
        self.lock = threading.Lock()
        self.requests: list[tuple[float, int, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.thread = threading.Thread(target=self.serve_forever, name="fake-service", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v2/translate"

    def start_outage(self, down_for: float) -> float:
        now = time.time()
        self.down_from, self.up_at = now, now + down_for
        return now

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def snapshot(self) -> list[tuple[float, int, str]]:
        with self.lock:
            return list(self.requests)


class _Handler(DemoHandler):
    def do_POST(self):
        service: Service = self.server
        now = time.time()
        with service.lock:
            service.in_flight += 1
            service.max_in_flight = max(service.max_in_flight, service.in_flight)
        try:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                text = str((body.get("text") or [""])[0])
            except (ValueError, TypeError):
                body, text = {}, ""
            code = 503 if now < service.up_at else (200 if text else 400)
            with service.lock:
                service.requests.append((now, code, text))
            if code == 503:
                self._answer(503, {"message": "service unavailable"})
            elif code == 400:
                self._answer(400, {"message": "text is empty"})
            else:
                self._answer(200, {"translations": [{"text": f"[{body.get('target_lang')}] {text}"}]})
        finally:
            with service.lock:
                service.in_flight -= 1



# -- workers and their records --------------------------------------------------------------------

class BreakerWorker(harness.Worker):
    """``celery -A bench.breaker_app worker -Q <queue>``: the bench's worker (kill, log, cleanup) with
    this measurement's app and queue."""

    def __init__(self, label: str, queue: str, vhost: Vhost, directory: Path, url: str) -> None:
        self.directory = directory
        self.name = f"breaker-{label}-{uuid.uuid4().hex[:6]}"
        self.log = directory / f"worker-{label}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BREAKER_BROKER": vhost.url, "BREAKER_URL": url,
               "BREAKER_DIR": str(directory)}
        cmd = [sys.executable, "-m", "celery", "-A", "bench.breaker_app", "worker", "-Q", queue, "-P", "prefork",
               "-c", "2", "--without-mingle", "--without-gossip", "-l", "warning", "-n", f"{self.name}@%h"]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        harness._LIVE_WORKERS.add(self)  # killed by harness.cleanup() too


class Records(harness.Records):
    """The lines the worker processes append (``bench/breaker_app.py``), read incrementally."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self.ready: set[str] = set()
        self.ok: list[tuple[str, float, int]] = []  # task id, time, pid
        self.ok_ids: Counter = Counter()
        self.changes: list[dict] = []  # breaker open / probe / close

    def _parse(self, parts: list[str]) -> None:
        if not parts:
            return
        if parts[0] == "ok":
            self.ok.append((parts[1], float(parts[2]), int(parts[3])))
            self.ok_ids[parts[1]] += 1
        elif parts[0] == "ready":
            self.ready.add(parts[1].split("@")[0])
        elif parts[0] == "breaker":
            self.changes.append({"kind": parts[1], "gen": int(parts[2]), "t": float(parts[3]),
                                 "until": None if parts[4] == "-" else float(parts[4]),
                                 "task": None if parts[5] == "-" else parts[5]})


def wait_ready(workers: list[BreakerWorker], records: Records, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(w.name in records.ready for w in workers):
        records.poll()
        for w in workers:
            if not w.alive():
                raise BenchError(f"worker {w.name} exited with {w.proc.returncode}:\n{w.text()[-3000:]}")
        if time.monotonic() > deadline:
            late = [w.name for w in workers if w.name not in records.ready]
            raise BenchError(f"workers {', '.join(late)} not ready after {timeout:g}s:\n{workers[0].text()[-3000:]}")
        time.sleep(0.05)


def settled_queues(vhost: Vhost, tries: int = 10) -> dict[str, dict[str, int]]:
    """The queues' counts once two readings a second apart agree (quorum queues report on a timer)."""
    last = vhost.queues()
    for _ in range(tries):
        time.sleep(1.0)
        now = vhost.queues()
        if now == last:
            return now
        last = now
    return last


# -- one variant ----------------------------------------------------------------------------------

def run_variant(variant: str, args) -> dict:
    queue, task_name = QUEUES[variant], TASKS[variant]
    directory = new_workdir(f"breaker-{variant}")
    vhost = Vhost(f"breaker-{variant}")
    service = Service()
    workers: list[BreakerWorker] = []
    app = None
    try:
        workers = [BreakerWorker(f"{variant}{i}", queue, vhost, directory, service.url) for i in (1, 2)]
        records = Records(directory)
        wait_ready(workers, records)
        say(f"  [{variant}] 2 workers ready (logs in {directory}); outage of {args.down_for:g} s starts, "
            f"publishing {args.tasks} tasks over {args.spread:g} s")
        app = make_app(vhost.url, service.url, str(directory))
        task = app.tasks[task_name]
        ids = [uuid.uuid4().hex for _ in range(args.tasks)]
        wanted = set(ids)
        t0 = service.start_outage(args.down_for)
        for i, task_id in enumerate(ids):
            pause = t0 + args.spread * i / args.tasks - time.time()
            if pause > 0:
                time.sleep(pause)
            task.apply_async((task_id, "DE"), task_id=task_id)
        published = time.time()
        say(f"  [{variant}] published in {published - t0:.1f} s; waiting for {args.tasks} successes "
            f"(at most until +{args.down_for + args.wait:g} s)")
        deadline = t0 + args.down_for + args.wait
        next_note = time.time() + 30
        complete = False
        while time.time() < deadline:
            records.poll()
            if wanted.issubset(records.ok_ids):
                complete = True
                break
            dead = [w.name for w in workers if not w.alive()]
            if dead:
                raise BenchError(f"worker {', '.join(dead)} died:\n{workers[0].text()[-3000:]}")
            if time.time() > next_note:
                done = len(wanted.intersection(records.ok_ids))
                say(f"  [{variant}] +{time.time() - t0:5.0f} s: {done} done, {len(service.requests)} requests")
                next_note += 30
            time.sleep(0.2)
        time.sleep(args.settle)  # a late second success would show up here
        records.poll()
        queues = settled_queues(vhost)
        return measure(variant, args, service, records, workers, queues, ids, t0, published, complete, directory)
    finally:
        for w in workers:
            w.kill()
        if app is not None:
            app.close()
        vhost.delete()
        service.stop()


def measure(variant, args, service, records, workers, queues, ids, t0, published, complete, directory) -> dict:
    up_at = service.up_at
    requests = service.snapshot()
    wanted = set(ids)
    during = [r for r in requests if r[0] < up_at]
    failed = [r for r in requests if r[1] != 200]
    per_task = Counter(r[2] for r in requests)
    answered = Counter(r[2] for r in requests if r[1] == 200)
    ok_times = [t for task_id, t, _ in records.ok if task_id in wanted]
    ended = wanted.intersection(records.ok_ids)
    changes = sorted(records.changes, key=lambda c: c["t"])
    opens = [c for c in changes if c["kind"] == "open"]
    first_open = opens[0]["t"] if opens else None
    # requests per 5 s from the start of the outage: where the load on the service came from
    buckets = Counter(int((r[0] - t0) // 5) * 5 for r in requests)
    bug_queues = {name: q for name, q in queues.items() if name.endswith(".bugs")}
    left = {name: q for name, q in queues.items() if q["ready"] or q["unacked"]}
    log_lines = []
    for w in workers:
        for line in w.text().splitlines():
            if line.strip() and ("WARNING" in line or "ERROR" in line or "CRITICAL" in line or "Traceback" in line):
                log_lines.append(f"{w.name}: {line.strip()[:300]}")
    return {
        "variant": variant,
        "queue": queues.get(QUEUES[variant]),
        "complete": complete,
        "published": len(ids),
        "publish_s": round(published - t0, 2),
        "published_during_outage": published < up_at,
        "requests_during_outage": len(during),
        "requests_total": len(requests),
        "requests_failed": len(failed),
        "requests_after_recovery": len(requests) - len(during),
        "failed_after_first_open": sum(1 for r in failed if first_open is not None and r[0] > first_open),
        "max_in_flight": service.max_in_flight,
        "max_requests_per_task": max(per_task.values(), default=0),
        "tasks_answered_200_twice": sum(1 for k, n in answered.items() if n > 1),
        "recovery_to_last_done_s": round(max(ok_times) - up_at, 2) if ok_times else None,
        "recovery_to_first_done_s": round(min(ok_times) - up_at, 2) if ok_times else None,
        "tasks_ended": len(ended),
        "tasks_missing": len(wanted) - len(ended),
        "tasks_succeeded_twice": sum(1 for i in wanted if records.ok_ids[i] > 1),
        "unknown_successes": sum(n for i, n in records.ok_ids.items() if i not in wanted),
        "breaker_opens": len({c["gen"] for c in opens}),
        "breaker_probes": len({c["gen"] for c in changes if c["kind"] == "probe"}),
        "breaker_closes": len({c["gen"] for c in changes if c["kind"] == "close"}),
        "breaker_changes": [{**c, "t": round(c["t"] - t0, 3),
                             "until": None if c["until"] is None else round(c["until"] - t0, 3)} for c in changes],
        "bug_queue_messages": sum(q["ready"] + q["unacked"] for q in bug_queues.values()),
        "bug_queues": bug_queues,
        "work_queue_left": sum(q["ready"] + q["unacked"] for n, q in queues.items() if n == QUEUES[variant]),
        "queues_not_empty": left,
        "requests_per_5s": {str(k): buckets[k] for k in sorted(buckets)},
        "failed_request_times": [round(r[0] - t0, 3) for r in failed[:100]],  # s from the outage's start
        "worker_log_warnings": log_lines[:200],
        "worker_log_warning_count": len(log_lines),
        "disturbed": next((d for d in (w.disturbance() for w in workers) if d), None),
        "workdir": str(directory),
    }


# -- the report -----------------------------------------------------------------------------------

ROWS = [
    ("requests_during_outage", "requests that reached the down service"),
    ("requests_total", "requests in all"),
    ("requests_failed", "failed requests (503)"),
    ("failed_after_first_open", "failed requests after the breaker first opened"),
    ("breaker_opens", "open periods (trip + failed probes)"),
    ("breaker_probes", "probes"),
    ("max_requests_per_task", "most requests for one task"),
    ("max_in_flight", "most requests in flight at once"),
    ("publish_s", "publishing took (s, from the outage's start)"),
    ("published_during_outage", "all published during the outage"),
    ("recovery_to_first_done_s", "recovery -> first task done (s)"),
    ("recovery_to_last_done_s", "recovery -> last task done (s)"),
    ("tasks_ended", "tasks ended (distinct successes)"),
    ("tasks_missing", "tasks not ended"),
    ("tasks_succeeded_twice", "tasks that succeeded more than once"),
    ("tasks_answered_200_twice", "tasks the service answered 200 more than once"),
    ("bug_queue_messages", "messages in the bug queue"),
    ("work_queue_left", "messages left in the work queue"),
]


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(result: dict) -> str:
    runs = result["runs"]
    opts = result["options"]
    lines = [
        f"# Outage: the translation service down for {opts['down_for']:g} s, {opts['tasks']:,} tasks, two workers",
        "",
        (f"{result['date']}, `{result['command']}`, {result['duration_s']:.0f} s. Each variant in a fresh vhost: "
        f"two `celery -A bench.breaker_app worker -Q <queue> -P prefork -c 2` workers; the fake service answers "
        f"503 for {opts['down_for']:g} s from the first publish, then 200; the tasks are published over the first "
        f"{opts['spread']:g} s. Policy (both): the production translate policy (`max_attempts=None`, "
        f"`expires_in=2h`, back-off 5, 10, 20, 30, 60, 120, 300, 600 s with 20% jitter); `breaker`: "
        f"`breaker=\"deepl\"` with its defaults ({BREAKER_FAILURES} failures in a row within 60 s, open 30 s, "
        f"doubled after each failed probe, at most 300 s)."),
        "",
        "| | " + " | ".join(r["variant"] for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt(r.get(key)) if "error" not in r else "error" for r in runs)
                     + " |")
    for r in runs:
        if "error" in r:
            lines += ["", f"**{r['variant']}: {r['error'][:500]}**"]
            continue
        if r["variant"] == "breaker" and r.get("breaker_changes"):
            seen = []
            for c in r["breaker_changes"]:
                if c["kind"] == "open":
                    seen.append(f"open at +{c['t']:.1f} s until +{c['until']:.1f} s (gen {c['gen']})")
                else:
                    seen.append(f"{c['kind']} at +{c['t']:.1f} s (gen {c['gen']})")
            lines += ["", f"Breaker (times from the outage's start, recovery at +{opts['down_for']:g} s): "
                          + "; ".join(seen) + "."]
        if not r.get("complete"):
            lines += ["", f"**{r['variant']}: not every task ended within the wait**"]
        if r.get("queues_not_empty"):
            lines += ["", f"{r['variant']}: queues not empty at the end: "
                          + ", ".join(f"`{n}` {q['ready']} ready / {q['unacked']} unacked"
                                      + (" (the breaker's last state: kept on purpose)"
                                         if n.startswith("rare.breaker.") else "")
                                      for n, q in sorted(r["queues_not_empty"].items()))]
        if r.get("disturbed"):
            lines += ["", f"**{r['variant']}: a worker lost its broker connection: {r['disturbed']}**"]
    lines += ["", "Requests per 5 s from the outage's start (`t:n`: n requests from +t s):"]
    for r in runs:
        if "error" not in r:
            lines.append(f"- {r['variant']}: " + " ".join(f"{k}:{v}" for k, v in r["requests_per_5s"].items()))
    m = result["machine"]
    lines += ["", (f"Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, Celery {m['celery']}, "
                  f"kombu {m['kombu']}, RabbitMQ {m['rabbitmq']}; rare_celery {result['code']}."), ""]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--down-for", type=float, default=60.0, help="seconds the service answers 503 (default 60)")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks published per variant (default 2000)")
    parser.add_argument("--spread", type=float, default=10.0,
                        help="publish the tasks over this many seconds from the outage's start (default 10)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--wait", type=float, default=400.0,
                        help="wait at most down-for + this many seconds for every task to end (default 400)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to keep watching after the last task ended, for late repeats (default 5)")
    parser.add_argument("--out", default="breaker", help="results base name in bench/results/ (default breaker)")
    args = parser.parse_args(argv)
    if args.spread >= args.down_for:
        parser.error("--spread must be shorter than --down-for: every task is published during the outage")
    return args


def code_version() -> str:
    def git(*cmd):
        return subprocess.run(["git", "--no-optional-locks", *cmd], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    changed = git("status", "--porcelain", "--", "rare_celery")
    return f"{git('rev-parse', '--short', 'HEAD')}" + (f" + {len(changed.splitlines())} uncommitted files"
                                                       if changed else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    stale = stale_vhosts()
    if stale:
        say(f"note: vhosts left by an earlier, killed run: {', '.join(stale)} (rabbitmqctl delete_vhost NAME)")
    began = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    runs = []
    try:
        for variant in args.variants:
            say(f"[{variant}]")
            try:
                metrics = run_variant(variant, args)
            except BenchError as exc:
                traceback.print_exc()
                metrics = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"[-3000:]}
            runs.append(metrics)
            if "error" not in metrics:
                say(f"  [{variant}] requests during the outage {metrics['requests_during_outage']}, in all "
                    f"{metrics['requests_total']}; recovery -> last done {fmt(metrics['recovery_to_last_done_s'])} s; "
                    f"ended {metrics['tasks_ended']}/{metrics['published']}, twice {metrics['tasks_succeeded_twice']}, "
                    f"bug queue {metrics['bug_queue_messages']}")
    except KeyboardInterrupt:
        say("interrupted: cleaning up (nothing written)")
        return 130
    finally:
        for problem in cleanup():
            say(f"cleanup: {problem}")
    result = {
        "date": began.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "command": " ".join(["python", "bench/breaker.py", *(argv if argv is not None else sys.argv[1:])]),
        "options": {"down_for": args.down_for, "tasks": args.tasks, "spread": args.spread, "wait": args.wait,
                    "variants": args.variants},
        "machine": machine(),
        "code": code_version(),
        "runs": runs,
    }
    text = markdown(result)
    print()
    print(text)
    write(RESULTS / f"{args.out}.json", json.dumps(result, indent=1, default=str) + "\n")
    write(RESULTS / f"{args.out}.md", text)
    say(f"wrote bench/results/{args.out}.md and .json")
    bad = any("error" in r or not r["complete"] or r["tasks_succeeded_twice"] or r["bug_queue_messages"]
              or r["work_queue_left"] for r in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
