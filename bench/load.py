"""The full load run of issue 7: 20,000 tasks with random outcomes through 2 worker processes, per queue type,
with the conservation check; prints a Markdown table and exits 1 if conservation fails.

    python bench/load.py                          # 20,000 tasks on classic, then 20,000 on quorum
    python bench/load.py -n 2000 --kinds classic  # a quick one

The tasks are tests/apps/faults.py's (``faults.<kind>.work`` / ``doomed`` / ``rescue``); each job's plan is
drawn from tests.support.PLANS: 40 % succeed, 25 % fail 1 or 2 times then succeed, 10 % always fail
(bug queue, ``exhausted`` after 4 attempts), 10 % raise Bug (bug queue at once), 15 % fail twice and fall
back to another task on another queue, which succeeds. Retries wait 0.5, 1.25 (off the delay grid: a second
round through ``rare.wait.50ms``) and 2 s. Each queue type gets a fresh vhost and two ``celery worker -c 1``
processes, started before the jobs are published (all of them at once, with confirms).

Conservation: every job ends in exactly one place (its own success record, or a bug queue with a reason
its plan allows) or is still waiting in a queue; none runs more distinct attempts of a task than its
``max_attempts``. ``lost``, ``stuck``, ``over limit`` or ``wrong end`` above 0 fails the run; ``duplicated``
(an attempt run twice: at-least-once delivery) is reported, and is 0 when no fault is injected.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tests`` and ``rare_celery`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import Vhost, Worker, Workload, tally_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="tasks per queue type (default 20,000)")
    parser.add_argument("--kinds", default="classic,quorum", help="queue types, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (celery worker -c 1 each)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per queue type before giving up")
    return parser.parse_args(argv)


def run_kind(kind: str, n: int, workers: int, seed: int, timeout: float) -> tuple:
    vhost = Vhost()
    workdir = Path(tempfile.mkdtemp(prefix=f"rare-load-{kind}-"))
    env = {"RARE_FAULTS_BROKER": vhost.url, "RARE_FAULTS_DIR": str(workdir)}
    os.environ.update(env)
    faults = importlib.reload(importlib.import_module("tests.apps.faults"))
    procs: list[Worker] = []
    try:
        procs = [Worker("tests.apps.faults", faults.queues_of(kind), env, workdir, name=f"load{i}", concurrency=1)
                 for i in range(workers)]
        for w in procs:
            w.wait_ready()
        load = Workload(faults, vhost, workdir, [kind], seed=seed)
        start = time.monotonic()
        load.publish(n)
        published = time.monotonic() - start
        print(f"{kind}: {n:,} published in {published:.1f} s", flush=True)
        last = [0.0]

        def progress(ended: int) -> None:
            if time.monotonic() - last[0] >= 10:
                last[0] = time.monotonic()
                print(f"{kind}: {ended:,}/{n:,} ended after {time.monotonic() - start:.0f} s", flush=True)

        finished = load.wait(timeout=timeout, stall=60, interval=1.0, progress=progress)
        elapsed = time.monotonic() - start
        tallies = load.tally()
        dead = [w.log.name for w in procs if w.proc.poll() is not None]
        return tallies[kind], elapsed, published, finished, dead
    finally:
        for w in procs:
            w.stop()
        vhost.delete()


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, notes = [], []
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        tally, elapsed, published, finished, dead = run_kind(kind, args.n, args.workers, args.seed, args.timeout)
        rows.append(tally)
        runs = tally.runs
        notes.append(f"- {kind}: {tally.published:,} tasks, {runs:,} attempts run, in {elapsed:.0f} s "
                     f"({tally.published / elapsed:.0f} tasks/s, {runs / elapsed:.0f} attempts/s; publishing "
                     f"took {published:.1f} s){'' if finished else '; DID NOT FINISH'}"
                     f"{'; workers died: ' + ', '.join(dead) if dead else ''}")
        for problem in tally.problems[:20]:
            notes.append(f"  - {problem}")
    print()
    print(tally_table(rows, f"Load: {args.n:,} tasks per queue type, {args.workers} worker processes"))
    print()
    print("\n".join(notes))
    return 0 if all(t.ok for t in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
