"""Turning runs into a summary (median and spread over repeats), the issue's targets, and Markdown."""

from __future__ import annotations

import statistics

from .scenarios import SCENARIOS

BASELINE = "celery-countdown"
# success path: each RareTask variant against the plain Task on the same kind of queue
PLAIN_FOR = {"rare": "success-only", "rare-quorum": "celery-native-delay"}
# diagnostic: the same plain Task with acks_late=True, as RareTask acks
ACKS_LATE_FOR = {"rare": "plain-acks-late", "rare-quorum": "plain-quorum-acks-late",
                 "success-only": "plain-acks-late", "celery-native-delay": "plain-quorum-acks-late"}
QUEUE_KIND = {"success-only": "classic", "celery-countdown": "classic", "rare": "classic", "rare-bulk": "classic",
              "plain-acks-late": "classic", "celery-native-delay": "quorum, topic, confirms",
              "rare-quorum": "quorum", "plain-quorum-acks-late": "quorum"}


# -- summary --------------------------------------------------------------------------------------

def summarise(runs: list[dict]) -> dict:
    """scenario -> "variant|pool" -> {variant, pool, runs, errors, metrics: name -> median/min/max/values}."""
    out: dict[str, dict] = {}
    for run in runs:
        key = f"{run['variant']}|{run['pool']}"
        entry = out.setdefault(run["scenario"], {}).setdefault(
            key, {"variant": run["variant"], "pool": run["pool"], "runs": 0, "errors": [], "metrics": {},
                  "last": {}})
        entry["runs"] += 1
        if "error" in run:
            entry["errors"].append(run["error"])
            continue
        for name, value in run.items():
            if name in ("scenario", "variant", "pool", "repeat"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry["metrics"].setdefault(name, {"values": []})["values"].append(value)
            else:
                entry["last"][name] = value
    for entries in out.values():
        for entry in entries.values():
            for stat in entry["metrics"].values():
                values = stat["values"]
                stat.update(median=statistics.median(values), min=min(values), max=max(values))
    return out


def _get(summary: dict, scenario: str, variant: str, pool: str = "prefork") -> dict | None:
    return summary.get(scenario, {}).get(f"{variant}|{pool}")


def med(entry: dict | None, metric: str):
    stat = (entry or {}).get("metrics", {}).get(metric)
    return None if stat is None else stat["median"]


def worst(entry: dict | None, metric: str):
    stat = (entry or {}).get("metrics", {}).get(metric)
    return None if stat is None else stat["max"]


def total(entry: dict | None, metric: str):
    stat = (entry or {}).get("metrics", {}).get(metric)
    return None if stat is None else sum(stat["values"])


def spread(entry: dict | None, metric: str, digits: int = 0) -> str:
    stat = (entry or {}).get("metrics", {}).get(metric)
    if stat is None or len(stat["values"]) < 2:
        return "-"
    return f"{stat['min']:,.{digits}f}-{stat['max']:,.{digits}f}"


def num(value, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


# -- targets --------------------------------------------------------------------------------------

def targets(summary: dict) -> list[dict]:
    """The issue's targets for ``rare`` (and ``rare-quorum``), each met / missed / not measured."""
    out = []

    def add(target, variant, met, value, text):
        out.append({"target": target, "variant": variant, "met": met, "value": value, "text": text})

    for variant in ("rare", "rare-quorum"):
        base = med(_get(summary, "throughput", BASELINE), "tasks_per_s")
        mine = med(_get(summary, "throughput", variant), "tasks_per_s")
        r = ratio(mine, base)
        add("retry throughput >= 2x celery-countdown", variant, None if r is None else r >= 2, r,
            f"{num(mine)} vs {num(base)} tasks/s = {num(r, 2)}x")

        entry = _get(summary, "accuracy", variant)
        p99s = [worst(entry, f"{d}_p99_ms") for d in ("1s", "5s")]
        early = [total(entry, f"{d}_early") for d in ("1s", "5s")]
        met = None if None in p99s or None in early else max(p99s) <= 100 and sum(early) == 0
        add("p99 lateness <= 100 ms (1 s and 5 s), zero early", variant, met, p99s,
            f"p99 {num(p99s[0], 1)} ms (1 s), {num(p99s[1], 1)} ms (5 s), worst repeat; "
            f"early {num(early[0])} + {num(early[1])}")

        entry = _get(summary, "memory", variant)
        delta, unacked = med(entry, "rss_delta_mb"), med(entry, "unacked")
        ran, expected = med(entry, "first_attempts_run"), med(entry, "expected")
        met = None if delta is None else delta < 5 and unacked == 0 and ran == expected
        add("pending memory < 5 MB above idle, zero unacked", variant, met, delta,
            f"+{num(delta, 1)} MB RSS with {num(ran)}/{num(expected)} waiting, {num(unacked)} unacked")

        entry = _get(summary, "paced", variant)
        if entry is not None:
            p99s = [worst(entry, f"{d}_p99_ms") for d in ("1s", "5s")]
            early = [total(entry, f"{d}_early") for d in ("1s", "5s")]
            met = None if None in p99s or None in early else max(p99s) <= 100 and sum(early) == 0
            add("(diagnostic) the same, paced so the worker keeps up", variant, met, p99s,
                f"p99 {num(p99s[0], 1)} ms (1 s), {num(p99s[1], 1)} ms (5 s); early {num(early[0])} + {num(early[1])}")

        plain = PLAIN_FOR[variant]
        base = med(_get(summary, "success", plain), "tasks_per_s")
        mine = med(_get(summary, "success", variant), "tasks_per_s")
        slower = None if not mine or not base else base / mine - 1
        add("success path <= 10% slower than a plain Task", variant, None if slower is None else slower <= 0.10,
            slower, f"{num(mine)} vs {num(base)} tasks/s ({plain}): "
                    f"{num(None if slower is None else 100 * slower, 1)}% more time per task")

    for e in summary.get("timeout", {}).values():
        last = e["last"]
        if not last:
            continue
        variant = e["variant"]
        closed, ran = last.get("channel_closed"), last.get("attempt2_ran")
        if variant.startswith("rare"):
            add("long delay survives consumer_timeout", variant, (not closed) and bool(ran), None,
                f"channel closed: {closed}, attempt 2 ran: {ran}")
    return out


def total_cpu(entry: dict | None) -> float | None:
    """Worker + broker + publisher CPU per task (ms), each a median over repeats."""
    cpu = [med(entry, k) for k in ("worker_cpu_ms", "broker_cpu_ms", "publisher_cpu_ms")]
    return None if None in cpu else sum(cpu)


def retry_goals(summary: dict) -> list[dict]:
    """Issue 28's goals for the retry path, each met / missed / not measured (medians over repeats)."""
    out = []

    def add(target, variant, met, value, text):
        out.append({"target": target, "variant": variant, "met": met, "value": value, "text": text})

    for variant in ("rare", "rare-bulk"):
        for pool, goal in (("prefork", 2.0), ("solo", 1.5)):
            base = med(_get(summary, "throughput", BASELINE, pool), "tasks_per_s")
            mine = med(_get(summary, "throughput", variant, pool), "tasks_per_s")
            r = ratio(mine, base)
            add(f"fail-once throughput >= {goal:g}x celery-countdown ({pool})", variant,
                None if r is None else r >= goal, r, f"{num(mine)} vs {num(base)} tasks/s = {num(r, 2)}x")
        base, mine = (total_cpu(_get(summary, "throughput", v)) for v in (BASELINE, variant))
        add("total CPU per fail-once task <= celery-countdown's (prefork)", variant,
            None if mine is None or base is None else mine <= base, mine,
            f"{num(mine, 2)} vs {num(base, 2)} ms (worker + broker + publisher)")
    for pool in ("prefork", "solo"):
        entry = _get(summary, "throughput", "rare", pool)
        failed, ok = med(entry, "hold_failed_p50_ms"), med(entry, "hold_ok_p50_ms")
        r = ratio(failed, ok)
        add(f"a failed attempt holds its process (beyond its run) within 2x of a success's ({pool}, p50)", "rare",
            None if r is None else r <= 2, r,
            f"{num(failed, 3)} vs {num(ok, 3)} ms = {num(r, 2)}x; p99 {num(med(entry, 'hold_failed_p99_ms'), 3)} vs "
            f"{num(med(entry, 'hold_ok_p99_ms'), 3)} ms")
    base = med(_get(summary, "success", "plain-acks-late"), "tasks_per_s")
    mine = med(_get(summary, "success", "rare"), "tasks_per_s")
    slower = None if not mine or not base else base / mine - 1
    add("success path within 3% of a plain acks_late Task", "rare", None if slower is None else slower <= 0.03,
        slower, f"{num(mine)} vs {num(base)} tasks/s: {num(None if slower is None else 100 * slower, 1)}% more time "
                f"per task (spread: rare {spread(_get(summary, 'success', 'rare'), 'tasks_per_s')}, acks_late "
                f"{spread(_get(summary, 'success', 'plain-acks-late'), 'tasks_per_s')})")
    return out


# -- one line per run (progress) ------------------------------------------------------------------

def brief(scenario: str, m: dict) -> str:
    if "error" in m:
        return "ERROR " + m["error"].splitlines()[0][:200]
    tail = "" if not m.get("timed_out") else "  TIMED OUT"
    if m.get("worker_died"):
        tail += "  WORKER DIED"
    if scenario in ("throughput", "success"):
        return (f"{m['tasks_per_s']:,.0f} tasks/s  ({m['completed']}/{m['expected']}, worker CPU "
                f"{m['worker_cpu_ms']:.2f} ms/task, max pause {m['max_pause_s']:.2f} s){tail}")
    if scenario in ("accuracy", "paced"):
        return (f"1 s: p50 {num(m.get('1s_p50_ms'), 1)} p99 {num(m.get('1s_p99_ms'), 1)} ms, "
                f"5 s: p50 {num(m.get('5s_p50_ms'), 1)} p99 {num(m.get('5s_p99_ms'), 1)} ms, "
                f"early {m.get('1s_early')}+{m.get('5s_early')}{tail}")
    if scenario == "memory":
        return (f"{m['first_attempts_run']}/{m['expected']} waiting, RSS +{m['rss_delta_mb']:.1f} MB, "
                f"unacked {m['unacked']}, ready {m['ready_work_queue']}, delayed {m['in_delay_queues']}{tail}")
    if scenario == "timeout":
        return (f"channel closed: {m['channel_closed']}, worker exited: {m['worker_exited']}, "
                f"attempt 2 ran: {m['attempt2_ran']} (late {num(m.get('lateness_ms'), 0)} ms)")
    return str(m)


# -- Markdown -------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _label(entry: dict) -> str:
    return entry["variant"] if entry["pool"] == "prefork" else f"{entry['variant']} (solo)"


def _done(entry: dict) -> str:
    if entry["errors"]:
        return f"ERROR ({len(entry['errors'])})"
    done, expected = med(entry, "completed"), med(entry, "expected")
    flags = []
    if entry["last"].get("disturbed"):
        flags.append("broker went away")
    if (worst(entry, "tries") or 1) > 1:
        flags.append(f"{int(total(entry, 'tries') - len(entry['metrics']['tries']['values']))} re-run")
    if (worst(entry, "timed_out") or 0) > 0:
        flags.append("timed out")
    if (worst(entry, "worker_died") or 0) > 0:
        flags.append("worker died")
    text = f"{num(done)}/{num(expected)}"
    return text + (f" ({', '.join(flags)})" if flags else "")


def _throughput(summary: dict) -> list[str]:
    rows = []
    for entry in summary.get("throughput", {}).values():
        base = _get(summary, "throughput", BASELINE, entry["pool"])
        cpu = [med(entry, k) for k in ("worker_cpu_ms", "broker_cpu_ms", "publisher_cpu_ms")]
        rows.append([_label(entry), num(med(entry, "tasks_per_s")), spread(entry, "tasks_per_s"),
                     num(ratio(med(entry, "tasks_per_s"), med(base, "tasks_per_s")), 2, "x"),
                     num(med(entry, "worker_tasks_per_s")), *(num(c, 2) for c in cpu),
                     num(total_cpu(entry), 2), num(med(entry, "publish_s"), 1),
                     *(f"{num(med(entry, f'hold_{k}_p50_ms'), 3)} / {num(med(entry, f'hold_{k}_p99_ms'), 3)}"
                       for k in ("failed", "ok")),
                     num(med(entry, "max_pause_s"), 2), _done(entry)])
    return _table(["variant", "tasks/s", "spread", "x countdown", "worker-side tasks/s", "worker CPU ms/task",
                   "broker CPU ms/task", "publisher CPU ms/task", "total CPU ms/task", "publish s",
                   "hold after a failed attempt p50 / p99 ms", "hold after a success p50 / p99 ms", "max pause s",
                   "done"], rows)


def _accuracy(summary: dict, key: str = "accuracy") -> list[str]:
    rows = []
    for entry in summary.get(key, {}).values():
        base = _get(summary, key, BASELINE, entry["pool"])
        for d in ("1s", "5s"):
            early, measured = total(entry, f"{d}_early"), total(entry, f"{d}_measured")
            rows.append([_label(entry), d, num(med(entry, f"{d}_p50_ms"), 1), num(med(entry, f"{d}_p99_ms"), 1),
                         spread(entry, f"{d}_p99_ms", 1), num(worst(entry, f"{d}_max_ms"), 1),
                         num(med(entry, f"{d}_min_ms"), 1), f"{num(early)} / {num(measured)}",
                         num(total(entry, f"{d}_over_100ms")),
                         num(ratio(med(entry, f"{d}_p99_ms"), med(base, f"{d}_p99_ms")), 2, "x"),
                         num(med(entry, "first_attempts_done_s"), 1), _done(entry)])
    return _table(["variant", "delay", "p50 ms", "p99 ms", "p99 spread", "max ms", "min ms", "early / measured",
                   "> 100 ms late", "p99 x countdown", "first attempts all started after s", "done"], rows)


def _memory(summary: dict) -> list[str]:
    rows, where = [], []
    for entry in summary.get("memory", {}).values():
        rows.append([_label(entry), f"{num(med(entry, 'first_attempts_run'))}/{num(med(entry, 'expected'))}",
                     (f"{num(med(entry, 'rss_idle_mb'), 1)} / {num(med(entry, 'rss_warm_mb'), 1)} / "
                      f"{num(med(entry, 'rss_pending_mb'), 1)}"),
                     num(med(entry, "rss_delta_mb"), 1), num(med(entry, "main_delta_mb"), 1),
                     num(med(entry, "children_delta_mb"), 1), num(med(entry, "rss_delta_idle_mb"), 1),
                     num(med(entry, "children_warmup_mb"), 1), num(med(entry, "unacked")),
                     num(med(entry, "ready_work_queue")), num(med(entry, "in_delay_queues"))])
        queues = entry["last"].get("queues") or {}
        listed = ", ".join(f"`{q}` {s['ready']:,} ready / {s['unacked']:,} unacked" for q, s in sorted(queues.items()))
        if entry["errors"]:
            listed = f"ERROR: {entry['errors'][0][:300]}"
        where.append(f"- {_label(entry)}: {listed or 'no messages'}")
    return _table(["variant", "first attempts run", "RSS idle / warm / pending MB", "pending - warm MB",
                   "of which main process", "of which pool children", "pending - fresh idle MB",
                   "children growth in warm-up MB", "unacked", "ready in work queue", "in delay queues"],
                  rows) + ["", "Where the messages were:", *where]


def _success(summary: dict) -> list[str]:
    rows = []

    def versus(entry, other):
        base = _get(summary, "success", other, entry["pool"]) if other else None
        slower = ratio(med(base, "tasks_per_s"), med(entry, "tasks_per_s"))
        return "-" if slower is None else f"{100 * (slower - 1):+.1f}% vs {other}"

    for entry in summary.get("success", {}).values():
        variant = entry["variant"]
        rows.append([_label(entry), QUEUE_KIND[variant], num(med(entry, "tasks_per_s")), spread(entry, "tasks_per_s"),
                     versus(entry, PLAIN_FOR.get(variant)) if variant in PLAIN_FOR else "baseline",
                     versus(entry, ACKS_LATE_FOR.get(variant)) if variant in ACKS_LATE_FOR else "-",
                     num(med(entry, "worker_cpu_ms"), 3), num(med(entry, "broker_cpu_ms"), 3),
                     num(med(entry, "max_pause_s"), 2), _done(entry)])
    return _table(["variant", "queue", "tasks/s", "spread", "time per task vs plain Task",
                   "vs plain Task with acks_late (diagnostic)", "worker CPU ms/task", "broker CPU ms/task",
                   "max pause s", "done"], rows)


def _timeout(summary: dict) -> list[str]:
    rows, notes = [], []
    for entry in summary.get("timeout", {}).values():
        last = entry["last"]
        if entry["errors"]:
            rows.append([_label(entry), "ERROR", "", "", "", ""])
            continue
        rows.append([_label(entry), num(med(entry, "retry_delay_s"), 0, " s"),
                     "yes" if last.get("channel_closed") else "no",
                     "yes" if last.get("worker_exited") else "no",
                     "yes" if last.get("attempt2_ran") else "no", num(med(entry, "lateness_ms"), 1)])
        if last.get("channel_error"):
            notes.append(f"- {_label(entry)}: `{last['channel_error']}`")
        wanted = f"{{ok,{int(med(entry, 'consumer_timeout_ms') or 0)}}}"
        if last.get("consumer_timeout_seen") and last["consumer_timeout_seen"] != wanted:
            notes.append(f"- {_label(entry)}: INVALID, consumer_timeout was {last['consumer_timeout_seen']} "
                         f"while the workers started (changed by another process?)")
    return _table(["variant", "retry after", "channel closed (PRECONDITION_FAILED)", "worker exited",
                   "attempt 2 ran", "attempt 2 late ms"], rows) + ([""] + notes if notes else [])


SECTIONS = {
    "throughput": (_throughput, (
        "tasks that fail once and succeed 1 s later (success-only: succeed at once); worker already running; "
        "tasks/s from the first publish to the last success. *worker-side*: from the first task start instead. "
        "CPU per task: worker with children, and the broker (`beam.smp`). *max pause*: longest gap between two "
        "task starts.")),
    "accuracy": (_accuracy, (
        "tasks alternately retried after 1 s and 5 s, published in one burst; lateness = start of attempt 2 "
        "minus (time of the retry request + delay), per delay; percentiles per run, median over repeats; early "
        "and > 100 ms counts summed over repeats. *first attempts all started after*: a retry due before then "
        "finds the worker still busy with first attempts (in the work queue ahead of it for rare and native "
        "delay, in the pool for countdown).")),
    "paced": (lambda summary: _accuracy(summary, "paced"), (
        "tasks as in scenario 2, published at {paced_rate:g} tasks/s so the worker keeps up: what is left is "
        "the lateness of the delay mechanism itself, without waiting behind a backlog.")),
    "memory": (_memory, (
        "tasks that fail once with a 1 h delay. *idle*: worker just started; *warm*: after a warm-up of "
        "{warmup:,} fail-once tasks with a 1 s delay (the same code path, run until the pool children's RSS "
        "stops growing: Celery's retry path leaves cyclic garbage that only a full GC frees, see the README); "
        "*pending*: all first attempts ran (or nothing new for 20 s). RSS of the worker with its children; "
        "queues from `rabbitmqctl list_queues`.")),
    "success": (_success, (
        "tasks that succeed at once, published before the worker starts; tasks/s from the first start to the "
        "last success. Each RareTask variant is compared with the plain Task on the same kind of queue.")),
    "timeout": (_timeout, (
        "RabbitMQ 3.10 has only a global `consumer_timeout`; it was set to a few seconds while the workers "
        "opened their channels (a channel keeps the value it was opened with) and restored at once. The broker "
        "checks every 60 s (fixed in 3.10), so the retry delay is longer than that.")),
}


def markdown(result: dict) -> str:
    m, code, summary, sizes = result["machine"], result["code"], result["summary"], result["sizes"]
    changed = code["rare_celery_uncommitted"]
    lines = [
        "# rare_celery benchmark",
        "",
        (f"- **Date**: {result['date']} ({result['mode']} run, {result['duration_s']:.0f} s, "
         f"repeats: {result['repeats']}, scenario 4: {result.get('success_repeats', result['repeats'])}; "
         "scenarios 2b, 3 and 5 run once)"),
        f"- **Command**: `{result['command']}`",
        f"- **Machine**: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['os']}",
        f"- **Versions**: RabbitMQ {m['rabbitmq']}, Celery {m['celery']}, kombu {m['kombu']}, "
        f"Python {m['python']}; rare_celery at {code['commit']}"
        + (f" with uncommitted changes ({len(changed)} files, sources sha256 {code['rare_celery_sha256']})"
           if changed else ""),
        ("- **Workers**: `celery -A bench.apps worker -Q bench -P prefork -c 2 -l warning` (rows marked solo: "
         f"`-P solo`, stopped after {sizes['solo_timeout']:g} s), Celery defaults otherwise; broker, worker and "
         "publisher share the machine; before each run the runner waited (up to 30 s) for other processes "
         "to use less than 0.25 cores."),
        "",
        "## Targets for `rare` (issue 6)",
        "",
    ]
    for t in result["targets"]:
        mark = {True: "met", False: "**MISSED**", None: "not measured"}[t["met"]]
        lines.append(f"- {t['target']} - `{t['variant']}`: {mark} ({t['text']})")
    lines += ["", "Why the misses happen, with profiles: [bench/README.md, Findings](../README.md#findings)."]
    if result.get("retry_goals"):
        lines += ["", "## Goals for the retry path (issue 28)", ""]
        for t in result["retry_goals"]:
            mark = {True: "met", False: "**MISSED**", None: "not measured"}[t["met"]]
            lines.append(f"- {t['target']} - `{t['variant']}`: {mark} ({t['text']})")
    for key, scenario in SCENARIOS.items():
        if key not in summary:
            continue
        build, text = SECTIONS[key]
        size = sizes.get(key)
        text = text.replace("{warmup:,}", f"{sizes['memory_warmup']:,}")
        text = text.replace("{paced_rate:g}", f"{sizes['paced_rate']:g}")
        size = sizes.get("accuracy") if key == "paced" else size
        lines += ["", f"## {scenario.number}. {scenario.title}", "",
                  (f"{size:,} " if isinstance(size, int) else "") + text, "", *build(summary)]
        others = [v for e in summary[key].values() for v in e["metrics"].get("other_cores", {}).get("values", [])]
        if others:
            lines += ["", (f"Other processes on the machine used {statistics.median(others):.2f} cores on average "
                           f"during these runs (worst run {max(others):.2f} of {m['nproc']}).")]
    errors = [f"- {r['scenario']} {r['variant']} {r['pool']}: {r['error'].splitlines()[0][:300]}"
              for r in result["runs"] if "error" in r]
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"
