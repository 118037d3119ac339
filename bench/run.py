"""Measure rare_celery against Celery's own retries, on the local RabbitMQ, in one command.

    python bench/run.py                      # every scenario, 3 repeats (4: 5): bench/results/latest.{md,json}
    python bench/run.py --quick              # small sizes, 1 repeat, < 3 min: bench/results/quick.{md,json}
    python bench/run.py --scenarios throughput success --variants rare celery-countdown --repeats 5
    python bench/run.py --quick --profile    # plus one uncounted py-spy run each: bench/results/profiles/

Each run gets a fresh vhost and its own ``celery worker`` subprocess (``-P prefork -c 2``; some
scenarios also ``-P solo``), and everything is removed afterwards, also on Ctrl-C or a failure.
Scenarios and variants: see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``rare_celery`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.apps import DIAGNOSTIC, VARIANTS
from bench.harness import ROOT, cleanup, machine, stale_vhosts, wait_quiet
from bench.profile import Profiler, py_spy
from bench.scenarios import FULL, QUICK, RUNNERS, SCENARIOS, TimeoutScenario

RESULTS = ROOT / "bench" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (under ~3 minutes)")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"scenarios to run (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--variants", nargs="+", metavar="VARIANT",
                        choices=[*VARIANTS, *DIAGNOSTIC],
                        help="variants to run (default: each scenario's own list)")
    parser.add_argument("--pools", nargs="+", choices=["prefork", "solo"], default=["prefork", "solo"],
                        help="worker pools (solo runs only where a scenario lists it, bounded by a timeout)")
    parser.add_argument("--repeats", type=int, help="repeats per variant (default 3, scenario 4: 5; --quick 1)")
    parser.add_argument("--profile", action="store_true",
                        help="one extra, uncounted run per variant under py-spy; summaries in results/profiles/")
    parser.add_argument("--out", help="results base name in bench/results/ (default: latest, --quick: quick)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to use < 0.25 cores "
                             "(default 30; 0: do not wait)")
    args = parser.parse_args(argv)
    args.fixed_repeats = args.repeats is not None or args.quick
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.scenarios = args.scenarios or [k for k, s in SCENARIOS.items() if not (args.quick and s.full_only)]
    args.out = args.out or ("quick" if args.quick else "latest")
    if args.profile and not py_spy():
        parser.error("--profile needs py-spy (pip install py-spy)")
    return args


def plan(args) -> list[tuple[str, str, str, int]]:
    """(scenario, variant, pool, repeat) in run order; repeats interleave the variants."""
    out = []
    for key in args.scenarios:
        scenario = SCENARIOS[key]
        if key == "timeout":
            continue
        if args.variants:
            variants = [v for v in (*scenario.variants, *scenario.diagnostic) if v in args.variants]
        else:
            variants = list(scenario.variants) + ([] if args.quick else list(scenario.diagnostic))
        solo = scenario.quick_solo if args.quick else scenario.solo
        repeats = args.repeats if args.fixed_repeats or scenario.repeats is None else scenario.repeats
        repeats = repeats if scenario.repeat else 1
        if "prefork" in args.pools:
            out += [(key, v, "prefork", r) for r in range(repeats) for v in variants]
        if "solo" in args.pools:
            out += [(key, v, "solo", r) for r in range(repeats) for v in variants if v in solo]
    return out


def code_version() -> dict:
    """Which rare_celery was measured: the commit, and a hash of the package's files as they are now."""
    def git(*cmd):
        done = subprocess.run(["git", "--no-optional-locks", *cmd], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()
    digest = hashlib.sha256()
    for path in sorted((ROOT / "rare_celery").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    changed = git("status", "--porcelain", "--", "rare_celery")
    return {"commit": git("rev-parse", "--short", "HEAD"), "rare_celery_sha256": digest.hexdigest()[:12],
            "rare_celery_uncommitted": [line[3:] for line in changed.splitlines()]}


def measured(key: str, variant: str, pool: str, sizes, quiet_wait: float, tries: int = 3) -> dict:
    """One run, once the machine is quiet; run again (up to ``tries`` times) when the broker went away."""
    for attempt in range(1, tries + 1):
        waited = wait_quiet(quiet_wait) if quiet_wait > 0 else 0.0
        metrics = one(key, variant, pool, sizes)
        metrics["quiet_wait_s"] = waited
        trouble = metrics.get("disturbed") or _broker_error(metrics.get("error", ""))
        if not trouble:
            break
        say(f"    disturbed ({trouble[:160]}); " + ("running it again" if attempt < tries else "keeping it"))
        time.sleep(5)  # a restarting broker needs a moment
    metrics["tries"] = attempt
    return metrics


def _broker_error(text: str) -> str | None:
    signs = ("Connection refused", "CONNECTION_FORCED", "Connection reset", "nodedown", "unable to connect")
    return text if any(sign in text for sign in signs) else None


def one(key: str, variant: str, pool: str, sizes, profile_dir: Path | None = None) -> dict:
    profiler = None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        profiler = Profiler(profile_dir / f"{key}-{variant}-{pool}.txt")
    started = time.monotonic()
    try:
        metrics = RUNNERS[key](variant, pool, sizes, profiler=profiler)
    except Exception as exc:  # noqa: BLE001 - one failed run must not end the benchmark
        metrics = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
        traceback.print_exc()
    metrics["wall_s"] = time.monotonic() - started
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, _interrupt)
    stale = stale_vhosts()
    if stale:
        say(f"note: vhosts left by an earlier, killed run: {', '.join(stale)} (rabbitmqctl delete_vhost NAME)")
    began = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    runs: list[dict] = []
    timeout_part = None
    steps = plan(args)
    try:
        if "timeout" in args.scenarios:
            variants = [v for v in SCENARIOS["timeout"].variants if not args.variants or v in args.variants]
            timeout_part = TimeoutScenario(variants, sizes)
            say(f"[timeout] starting {', '.join(variants)} with consumer_timeout={sizes.consumer_timeout_ms} ms, "
                f"retry after {sizes.timeout_delay:g} s" + (" (in the background)" if args.quick else ""))
            timeout_part.start()
            if not args.quick:  # the full run waits for it alone, the quick run overlaps it with the rest
                runs += finish_timeout(timeout_part)
                timeout_part = None
        for i, (key, variant, pool, repeat) in enumerate(steps, 1):
            metrics = measured(key, variant, pool, sizes, args.quiet_wait)
            runs.append({"scenario": key, "variant": variant, "pool": pool, "repeat": repeat, **metrics})
            say(f"[{i}/{len(steps)}] {key:<10} {variant:<19} {pool:<7} #{repeat + 1}  {report.brief(key, metrics)}")
        if timeout_part is not None:
            runs += finish_timeout(timeout_part)
            timeout_part = None
        if args.profile:
            profile_dir = RESULTS / "profiles"
            for key, variant, pool, repeat in steps:
                if repeat == 0:
                    say(f"[profile] {key} {variant} {pool}")
                    one(key, variant, pool, sizes, profile_dir)
    except KeyboardInterrupt:
        say("interrupted: cleaning up (nothing written)")
        return 130
    finally:
        if timeout_part is not None:
            timeout_part.abort()
        for problem in cleanup():
            say(f"cleanup: {problem}")

    result = {
        "date": began.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "repeats": args.repeats,
        "success_repeats": max((r + 1 for k, _v, p, r in steps if k == "success" and p == "prefork"), default=0),
        "sizes": {k: v for k, v in vars(sizes).items()},
        "machine": machine(),
        "code": code_version(),
        "runs": runs,
    }
    result["summary"] = report.summarise(runs)
    result["targets"] = report.targets(result["summary"])
    result["retry_goals"] = report.retry_goals(result["summary"])
    markdown = report.markdown(result)
    print()
    print(markdown)
    write(RESULTS / f"{args.out}.json", json.dumps(result, indent=1, default=str) + "\n")
    write(RESULTS / f"{args.out}.md", markdown)
    say(f"wrote bench/results/{args.out}.md and .json in {result['duration_s']:.0f} s")
    return 1 if any("error" in run for run in runs) else 0


def finish_timeout(part: TimeoutScenario) -> list[dict]:
    say("[timeout] waiting for the long retries")
    results = part.finish()
    for variant, metrics in results.items():
        say(f"[timeout] {variant:<19} {report.brief('timeout', metrics)}")
    return [{"scenario": "timeout", "variant": v, "pool": "prefork", "repeat": 0, **m} for v, m in results.items()]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
