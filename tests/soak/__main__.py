"""The soak (issue 29): a mixed workload under random faults, then an account of every message.

    python -m tests.soak --minutes 5 --seed 1 --faults-every 10      # make soak

Three workers (prefork -c 2, prefork -c 2, solo) run tests/apps/faults.py's tasks on classic and quorum work
queues, each worker through a proxy of its own (tests/proxy.py). For ``--minutes`` the soak publishes a
mix of jobs (tests/soak/workload.py: successes, fail-once, fail-until-exhausted, ``Bug``, fallback chains,
``Hop``, delayed starts, shelf lives that run out, a breaker's service, a service with limits, poison
messages; single ``delay()`` and ``bulk`` batches) while the nemesis (tests/soak/nemesis.py) injects a fault every ``--faults-every``
seconds on average. Then the faults stop, the workers drain what is left, and the checker
(tests/soak/checker.py) accounts for every job. Prints a Markdown table; exit 1 if anything was lost,
stuck, repeated without a fault that allows it, ended where it cannot end, ran over its attempt limit or
early. The same seed draws the same jobs and the same faults at the same moments (what the broker and
the workers then do is theirs).

The broker: ``RARE_TEST_HOST`` and the ``rabbitmqctl`` first on ``PATH`` (``make soak`` starts the RabbitMQ
4.3 node of scripts/rabbitmq4 and points both at it). The broker is restarted only when it is not the
default node (127.0.0.1:5672), which the soak never stops.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.soak.checker import Report, check, table
from tests.soak.fleet import Fleet
from tests.soak.nemesis import Nemesis
from tests.soak.workload import Job, Publisher
from tests.support import HOST, QUORUM_OK, Records, Vhost, drain, peek_ids, ready_counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5, help="how long jobs are published and faults injected")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults-every", type=float, default=10, help="mean seconds between faults")
    parser.add_argument("--rate", type=float, default=10, help="jobs published a second")
    parser.add_argument("--drain", type=float, default=300, help="seconds to let the workers finish at the end")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, records, run log)")
    parser.add_argument("--recheck", metavar="RUN_DIR", help="only check again a kept run (after a change to the checker)")
    return parser.parse_args(argv)


class RunLog:
    """The run log: every fault, with its time, in memory and as JSON lines in ``run.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path, self.entries = path, []
        self.file = path.open("a", buffering=1)

    def __call__(self, kind: str, target: str, detail: str) -> None:
        entry = {"t": time.time(), "kind": kind, "target": target, "detail": detail}
        self.entries.append(entry)
        self.file.write(json.dumps(entry) + "\n")
        print(f"  {time.strftime('%H:%M:%S')} {kind:<14} {target} {detail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.recheck:
        from tests.apps.faults import MAX_ATTEMPTS

        return 0 if account(Path(args.recheck), MAX_ATTEMPTS).ok else 1
    workdir = Path(tempfile.mkdtemp(prefix=f"rare-soak-{args.seed}-"))
    vhost = Vhost()
    env = {"RARE_FAULTS_BROKER": vhost.url, "RARE_FAULTS_DIR": str(workdir)}
    os.environ.update(env)
    faults = importlib.import_module("tests.apps.faults")  # after the environment points it at the vhost
    kinds = ["classic", "quorum"] if QUORUM_OK else ["classic"]
    queues = [q for kind in kinds for q in faults.queues_of(kind)]
    bug_queues = [q + ".bugs" for q in queues]
    log = RunLog(workdir / "run.jsonl")
    fleet = Fleet(faults, queues, vhost.url, workdir, log)
    restarts = HOST != "127.0.0.1:5672"
    print(f"soak: seed {args.seed}, {args.minutes:g} min, a fault every {args.faults_every:g} s, broker {HOST} "
          f"({'restarted by the nemesis' if restarts else 'the default node: never restarted'}), run dir {workdir}",
          flush=True)
    nemesis = Nemesis(fleet, random.Random(args.seed * 2 + 1), args.faults_every, log, workdir, vhost.url,
                      [q for q in bug_queues if not q.endswith("rescue.bugs")], restarts)
    publisher = Publisher(faults, kinds, random.Random(args.seed * 2))
    ok = False
    try:
        fleet.start_all()
        nemesis.start()
        start = time.monotonic()
        ticks = 0
        while time.monotonic() - start < args.minutes * 60:
            ticks += 1
            if ticks % 50 == 0:
                publisher.batch(int(args.rate * 2))
            else:
                for _ in range(max(1, round(args.rate / 10))):
                    publisher.one()
            fleet.supervise()
            time.sleep(0.1)
        print(f"soak: {len(publisher.jobs):,} jobs published ({len(publisher.unsure)} unsure); the faults stop, "
              "the workers drain", flush=True)
        nemesis.stop()
        ended = settle(fleet, workdir, vhost, bug_queues, publisher, args.drain)
        bugs = [((m.headers or {}).get("id") or "", (m.headers or {}).get("x-rare-reason") or "")
                for q in bug_queues for m in drain(vhost.url, q)]
        waiting = set() if ended else peek_ids(vhost.url, [q for q in others(vhost)])
        end = {"seed": args.seed, "minutes": args.minutes, "faults_every": args.faults_every,
               "jobs": [vars(j) for j in publisher.jobs.values()], "unsure": [vars(j) for j in publisher.unsure.values()],
               "bugs": bugs, "waiting": sorted(waiting)}
        (workdir / "end.json").write_text(json.dumps(end))
        report = account(workdir, faults.MAX_ATTEMPTS)
        ok = report.ok
        return 0 if ok else 1
    finally:
        nemesis.stopped.set()
        fleet.stop_all()
        vhost.delete()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"soak: the run directory is kept: {workdir}")


def account(workdir: Path, max_attempts: dict[str, int]) -> Report:
    """Check the run kept in ``workdir`` (records, run log, ``end.json``); print the table and the problems."""
    end = json.loads((workdir / "end.json").read_text())
    faults = [json.loads(line) for line in (workdir / "run.jsonl").read_text().splitlines() if line.endswith("}")]
    report = check({j["id"]: Job(**j) for j in end["jobs"]}, {j["id"]: Job(**j) for j in end["unsure"]},
                   Records(workdir).all(), [tuple(b) for b in end["bugs"]], set(end["waiting"]), faults, max_attempts)
    print(table(report, end["seed"], end["minutes"], end["faults_every"]))
    for problem in report.problems[:20]:
        print("\n" + problem)
    if len(report.problems) > 20:
        print(f"\n... and {len(report.problems) - 20} more")
    return report


def others(vhost: Vhost) -> list[str]:
    """The vhost's queues that must be empty at the end: all but bug queues, breaker notes, events, pidboxes."""
    return [q for q in vhost.queue_stats() if not q.endswith(".bugs") and not q.startswith(("rare.breaker", "celeryev"))
            and ".pidbox" not in q]


def settle(fleet: Fleet, workdir: Path, vhost: Vhost, bug_queues: list[str],
           publisher: Publisher, timeout: float) -> bool:
    """Until every job ended and nothing is in any queue but the bug queues (True), or ``timeout`` s."""
    records = Records(workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.supervise()
        oks = {r["id"] for r in records.all() if r["k"] == "ok"}
        ended = oks | peek_ids(vhost.url, bug_queues)
        if publisher.jobs.keys() <= ended:
            stats = vhost.queue_stats()
            queues_left = others(vhost)
            ready = ready_counts(vhost.url, queues_left)
            if not any(ready.get(q, 0) + stats[q]["unacked"] for q in queues_left):
                return True
        time.sleep(2)
    return False


if __name__ == "__main__":
    sys.exit(main())
