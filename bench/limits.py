"""The service-limits measurement (issue 26): a fake service that takes 50 requests a second, 3 at a time.

    python bench/limits.py                          # 5,000 tasks a scenario: bench/results/limits.{md,json}
    python bench/limits.py --tasks 500 --out limits-quick

Each scenario in a fresh vhost, with two workers (``celery -A bench.limits_app worker -P prefork -c 4``),
the tasks published at once (rare: inside ``bulk(app)``), the fake service in the task's body
(``bench/limits_app.py``: a request takes 50 ms and records when it began and ended):

* ``rare``: ``service_rate="50/s"``, ``service_concurrency=3``;
* ``plain``: Celery's own ``rate_limit="25/s"`` on each of the two workers (Celery's is per worker),
  nothing that limits the attempts in flight;
* ``rare, a worker killed``: the first worker is killed whole (SIGKILL) when a third of the tasks are
  done: how soon the other worker's requests start, and that the limits hold meanwhile;
* ``rare, Retry-After 10 s``: when a third are done, one request is answered 429 with
  ``Retry-After: 10``: the requests that start in those 10 s (goal 0).

Measured from the service's records: the most requests in any 1 s window (goal <= 50), the most in
flight (goal <= 3), throughput as a share of the limit (goal >= 90%; and over the last 80% of the
requests, once the backlog published at once has been read), how far from its place in the publish
order each task was served (arrival order), the longest wait of a task
(publish to its request), every task served exactly once. Then the cost of asking, in one process:
``take_rate``, ``take_slot`` + ``release`` and ``paused`` against the local broker, p50/p99.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``rare_celery`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import ROOT, Vhost, new_workdir, percentile

RESULTS = ROOT / "bench" / "results"
RATE, IN_FLIGHT, RETRY_AFTER = 50, 3, 10


class Worker:
    def __init__(self, vhost: Vhost, queue: str, workdir: Path, name: str) -> None:
        self.log = workdir / f"worker-{name}.log"
        env = {**os.environ, "LIMITS_BROKER": vhost.url, "LIMITS_DIR": str(workdir), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.limits_app", "worker", "-Q", queue, "-P", "prefork", "-c", "4",
             "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "-l", "info"],
            cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self, timeout: float = 60) -> Worker:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def requests(workdir: Path) -> list[dict]:
    out = []
    for path in workdir.glob("rec-*.txt"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 6 and parts[0] == "req":
                out.append({"id": parts[1], "began": float(parts[2]), "ended": float(parts[3]), "pid": int(parts[4]),
                            "status": int(parts[5])})
    return out


def most_in_any_window(times: list[float], window: float = 1.0) -> int:
    times, most, j = sorted(times), 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        most = max(most, i - j + 1)
    return most


def most_at_once(spans: list[tuple[float, float]], after: float = 0.0) -> int:
    edges = sorted([(b, 1) for b, e in spans if e > after] + [(e, -1) for b, e in spans if e > after])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def scenario(kind: str, tasks: int) -> dict:
    """One scenario: ``rare``, ``plain``, ``kill`` or ``retry-after``."""
    variant = "plain" if kind == "plain" else "rare"
    queue = f"limits.{variant}"
    vhost, workdir = Vhost(f"limits-{kind}"), new_workdir(f"limits-{kind}")
    workers: list[Worker] = []
    try:
        os.environ.update({"LIMITS_BROKER": vhost.url, "LIMITS_DIR": str(workdir)})
        sys.modules.pop("bench.limits_app", None)
        limits_app = importlib.import_module("bench.limits_app")  # again: its app points at this vhost
        from rare_celery import bulk

        workers = [Worker(vhost, queue, workdir, f"{kind}-{i}").ready() for i in range(2)]
        task = limits_app.rare if variant == "rare" else limits_app.plain
        published = time.time()
        if variant == "rare":
            with bulk(limits_app.app):
                ids = [task.delay(i).id for i in range(tasks)]
        else:
            ids = [task.delay(i).id for i in range(tasks)]
        sent = time.time()
        wanted, event_at, deadline = set(ids), None, time.time() + tasks / RATE * 3 + 120
        while True:
            reqs = requests(workdir)
            served = {r["id"] for r in reqs if r["status"] == 200}
            if event_at is None and kind in ("kill", "retry-after") and len(served) >= tasks // 3:
                event_at = time.time()
                if kind == "kill":
                    workers[0].kill()
                else:
                    (workdir / "busy").touch()
            if served >= wanted or time.time() > deadline:
                break
            time.sleep(0.5)
        reqs = requests(workdir)
    finally:
        for w in workers:
            w.stop()
        vhost.delete()
    ok = [r for r in reqs if r["status"] == 200]
    per_task = Counter(r["id"] for r in ok)
    first_ok = sorted(r["began"] for r in ok)
    out = {
        "scenario": kind, "tasks": tasks, "publish_s": round(sent - published, 2),
        "served": len(per_task), "served_twice": sum(1 for n in per_task.values() if n > 1),
        "missing": len(set(ids) - set(per_task)),
        "most_in_1s": most_in_any_window([r["began"] for r in reqs]),
        "most_in_flight": most_at_once([(r["began"], r["ended"]) for r in reqs]),
        "per_second": round((len(first_ok) - 1) / (first_ok[-1] - first_ok[0]), 1) if len(first_ok) > 1 else None,
        "longest_wait_s": round(max(first_ok) - published, 1) if first_ok else None,
        "attempts": len(reqs),
    }
    out["share_of_limit"] = round(out["per_second"] / RATE, 3) if out["per_second"] else None
    # arrival order: how far from its place in the publish order each task's first request came
    first = {}
    for r in sorted(ok, key=lambda r: r["began"]):
        first.setdefault(r["id"], len(first))
    places = sorted(abs(first[i] - n) for n, i in enumerate(ids) if i in first)
    out["out_of_order_p50"] = percentile(places, 50) if places else None
    out["out_of_order_p99"] = percentile(places, 99) if places else None
    # the busiest second after the first 20% of the requests (the backlog published at once has been read)
    steady = first_ok[len(first_ok) // 5:]
    out["steady_per_second"] = (round((len(steady) - 1) / (steady[-1] - steady[0]), 1)
                                if len(steady) > 1 and steady[-1] > steady[0] else None)
    if kind == "kill" and event_at is not None:
        survivor = workers[1].proc.pid
        after = sorted(r["began"] for r in reqs if r["began"] > event_at)
        out["first_request_after_kill_s"] = round(after[0] - event_at, 2) if after else None
        full = None  # when the survivor next had every slot in use
        spans = sorted((r["began"], r["ended"]) for r in reqs if r["began"] > event_at)
        for i, (b, _) in enumerate(spans):
            if sum(1 for b2, e2 in spans[: i + 1] if e2 > b) >= IN_FLIGHT:
                full = round(b - event_at, 2)
                break
        out["all_slots_in_use_again_s"] = full
        del survivor
    if kind == "retry-after" and event_at is not None:
        told = [r for r in reqs if r["status"] == 429]
        if told:
            t429 = told[0]["began"]
            out["requests_in_retry_after"] = sum(1 for r in reqs if t429 < r["began"] < t429 + RETRY_AFTER)
            out["admitted_after_100ms"] = sum(1 for r in reqs if t429 + 0.1 < r["began"] < t429 + RETRY_AFTER)
            out["first_request_after_s"] = round(min((r["began"] for r in reqs if r["began"] > t429), default=t429) - t429, 3)
    return out


def cost(n: int = 300) -> dict:
    """What asking costs, in one process: a place in a rate window, a slot taken and let go, the read of
    the service's pause queue."""
    vhost = Vhost("limits-cost")
    try:
        os.environ["LIMITS_BROKER"] = vhost.url
        sys.modules.pop("bench.limits_app", None)
        limits_app = importlib.import_module("bench.limits_app")
        from rare_celery import limits_io

        app = limits_app.app
        rate, slot, pause = [], [], []
        limits_io.take_rate(app, "cost", (1_000_000, 1.0))  # the declare, once
        for _ in range(n):
            t = time.perf_counter()
            assert limits_io.take_rate(app, "cost", (1_000_000, 1.0))
            rate.append((time.perf_counter() - t) * 1000)
        for _ in range(n):
            t = time.perf_counter()
            held = limits_io.take_slot(app, "cost", 3)
            assert held is not None
            held.release()
            slot.append((time.perf_counter() - t) * 1000)
        for _ in range(n):
            t = time.perf_counter()
            assert not limits_io.paused(app, "cost")
            pause.append((time.perf_counter() - t) * 1000)
    finally:
        vhost.delete()
    return {"rate_ms_p50": round(percentile(rate, 50), 2), "rate_ms_p99": round(percentile(rate, 99), 2),
            "slot_ms_p50": round(percentile(slot, 50), 2), "slot_ms_p99": round(percentile(slot, 99), 2),
            "pause_ms_p50": round(percentile(pause, 50), 2), "pause_ms_p99": round(percentile(pause, 99), 2), "n": n}


def markdown(rows: list[dict], asking: dict, args) -> str:
    lines = [f"# Service limits: {RATE}/s and {IN_FLIGHT} in flight, two workers (-c 4), {args.tasks:,} tasks",
             "", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python bench/limits.py --tasks {args.tasks}`.",
             "", ("| scenario | served (twice, missing) | most in any 1 s | most in flight | per second (share of 50/s) "
                 "| after the first 20% | places out of arrival order p50/p99 | longest wait | requests in all "
                 "| after the event |"), "|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        event = ""
        if "first_request_after_kill_s" in r:
            event = (f"first request {r['first_request_after_kill_s']} s after the kill; all {IN_FLIGHT} slots in use "
                     f"again after {r['all_slots_in_use_again_s']} s")
        if "requests_in_retry_after" in r:
            event = (f"{r['requests_in_retry_after']} requests in the {RETRY_AFTER} s after the 429 "
                     f"({r['admitted_after_100ms']} began later than 0.1 s after it; the first "
                     f"{r.get('first_request_after_s', 0) * 1000:.0f} ms after it)")
        lines.append(f"| {r['scenario']} | {r['served']:,} ({r['served_twice']}, {r['missing']}) | {r['most_in_1s']} | "
                     f"{r['most_in_flight']} | {r['per_second']} ({r['share_of_limit']:.0%}) | "
                     f"{r.get('steady_per_second')} | {r.get('out_of_order_p50')}/{r.get('out_of_order_p99')} | "
                     f"{r['longest_wait_s']} s | "
                     f"{r['attempts']:,} | {event} |")
    lines += ["", (f"What asking costs (one process, {asking['n']} each, local RabbitMQ): a place in the rate's window "
                  f"(one confirmed publish) p50 {asking['rate_ms_p50']} ms, p99 {asking['rate_ms_p99']} ms; a slot taken "
                  f"and let go (a declare and a delete on the process's kept connection) p50 {asking['slot_ms_p50']} ms, p99 "
                  f"{asking['slot_ms_p99']} ms; the pause queue read (a declare) p50 {asking.get('pause_ms_p50')} ms, p99 "
                  f"{asking.get('pause_ms_p99')} ms. Without limits an attempt asks nothing.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--scenarios", nargs="+", default=["rare", "plain", "kill", "retry-after"])
    parser.add_argument("--out", default="limits")
    args = parser.parse_args(argv)
    rows = []
    for kind in args.scenarios:
        print(f"-- {kind}", flush=True)
        rows.append(scenario(kind, args.tasks))
        print(json.dumps(rows[-1]), flush=True)
    asking = cost()
    text = markdown(rows, asking, args)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"rows": rows, "cost": asking}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
