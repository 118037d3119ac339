"""``py-spy record`` on a worker and its pool children, summarised per process role.

Used by ``run.py --profile``: one extra, uncounted run per (scenario, variant, pool) is sampled and
the summary (inclusive and self time of the busiest functions, for the pool children and for the
worker's main process) is written next to the results.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
# frames every sample of a role shares (interpreter start-up, click, bootsteps, the pool's fork)
_NOISE = ("click/", "runpy", "celery/__main__", "celery/bin/", "bootsteps.py", "billiard/process.py",
          "billiard/context.py", "billiard/popen_fork.py", "worker/worker.py", "Pool.__init__",
          "_create_worker_process", "TaskPool.on_start", "BasePool.start", "Worker.__call__",
          "Worker.workloop", "consumer/consumer.py", "Hub.create_loop", "asynloop")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


class Profiler:
    def __init__(self, out: Path, rate: int = 100) -> None:
        self.out, self.rate = out, rate
        self.raw = out.with_suffix(".raw")
        self.proc: subprocess.Popen | None = None

    def start(self, worker) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(worker.proc.pid), "--subprocesses", "--nonblocking", "-r", str(self.rate),
             "-f", "raw", "-o", str(self.raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.raw.exists():
            self.out.write_text(summarise(self.raw.read_text()))
            self.raw.unlink()


# where the time goes, by frame (inclusive share of the role's samples); buckets may overlap
BUCKETS = {
    "pool child": (
        ("Celery: Retry bookkeeping (billiard ExceptionInfo, task_retry)", "TraceInfo.handle_retry "),
        ("rare_celery: the same steps in RetryInfo (no ExceptionInfo)", "RetryInfo.handle_retry "),
        ("Celery: result back to the main process (pickle + pipe)", "_SimpleQueue.put "),
        ("Celery: next job from the main process (read + unpickle)", "Worker._make_protected_receive"),
        ("Celery: Task.retry (countdown: build + publish the copy)", "Task.retry (celery/app/task.py)"),
        ("rare_celery: RareTask.__call__", "RareTask.__call__ "),
        ("rare_celery: publish the copy (publish.send, confirm included)", "send (rare_celery/publish.py)"),
        ("rare_celery: of which basic_publish_confirm (write, then read the confirm)", "Channel.basic_publish_confirm"),
        ("rare_celery: rebuild the message", "rebuild (rare_celery/message.py)"),
        ("rare_celery: error headers (traceback text)", "error (rare_celery/headers.py)"),
        ("traceback formatting (any caller)", "format_exception (traceback.py)"),
        ("the task body", "make_app.<locals>."),
    ),
    "main process": (
        ("Celery: results from the pool (read + unpickle)", "ResultHandler._recv_message"),
        ("Celery: jobs to the pool (pickle + write)", "_write_job"),
        ("broker: reading deliveries", "Connection.drain_events"),
        ("acks", "Message.ack "),
        ("rare_celery: worker bootstep hooks", "rare_celery/worker.py"),
        ("idle in epoll", "_epoll.poll"),
    ),
}


def summarise(raw: str, top: int = 60) -> str:
    """py-spy's raw (collapsed) stacks -> per-role tables of inclusive and self sample shares."""
    inclusive = {"pool child": collections.Counter(), "main process": collections.Counter()}
    own = {role: collections.Counter() for role in inclusive}
    total = collections.Counter()
    buckets = {role: collections.Counter() for role in inclusive}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        role = "pool child" if sum(f.startswith("process ") for f in frames) > 1 else "main process"
        frames = [_LINE.sub(")", f) for f in frames if not f.startswith("process ")] or ["<idle>"]
        total[role] += n
        for frame in set(frames):
            inclusive[role][frame] += n
        for label, needle in BUCKETS[role]:
            if any(needle in frame + " " for frame in frames):
                buckets[role][label] += n
        own[role][frames[-1]] += n
    out = []
    for role, counts in inclusive.items():
        if not total[role]:
            continue
        out.append(f"== {role}: {total[role]} samples, where the time goes")
        for label, _needle in BUCKETS[role]:
            out.append(f"{100 * buckets[role][label] / total[role]:5.1f}%  {label}")
        out.append(f"== {role}: inclusive (frames common to all samples left out)")
        shown = 0
        for frame, n in counts.most_common():
            if any(noise in frame for noise in _NOISE):
                continue
            out.append(f"{100 * n / total[role]:5.1f}%  {frame}")
            shown += 1
            if shown >= top:
                break
        out.append(f"== {role}: self")
        out.extend(f"{100 * n / total[role]:5.1f}%  {frame}" for frame, n in own[role].most_common(25))
        out.append("")
    return "\n".join(out)
