"""Test support: a vhost per test run, real celery worker subprocesses, broker look-ups, polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
HOST = os.environ.get("RARE_TEST_HOST", "127.0.0.1:5672")


def rabbitmqctl(*args: str) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


class Vhost:
    """A fresh vhost for one test session, deleted (with everything in it) at the end."""

    def __init__(self) -> None:
        self.name = f"rare-test-{uuid.uuid4().hex[:8]}"
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        self.url = f"amqp://guest:guest@{HOST}/{self.name}"

    def delete(self) -> None:
        rabbitmqctl("delete_vhost", self.name)

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """name -> {ready, unacked, consumers}, read from the broker (includes unacked counts)."""
        out = rabbitmqctl("list_queues", "-p", self.name, "--no-table-headers", "name", "messages_ready",
                          "messages_unacknowledged", "consumers")
        stats = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[1].isdigit():
                stats[parts[0]] = {"ready": int(parts[1]), "unacked": int(parts[2]), "consumers": int(parts[3])}
        return stats


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Worker:
    """``celery -A <app> worker`` in a subprocess, with its log in a file."""

    def __init__(self, app: str, queues: list[str], env: dict, workdir: Path, pool: str = "prefork",
                 concurrency: int = 2, name: str | None = None, extra: list[str] | None = None) -> None:
        self.log = workdir / f"worker-{name or app.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:6]}.log"
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", ",".join(queues), "-P", pool,
               "-c", str(concurrency), "--without-mingle", "--without-gossip", "-l", "info",
               "-n", f"{name or 'w'}-{uuid.uuid4().hex[:6]}@%h", *(extra or [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> Worker:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            return " ready." in self.text()
        wait_for(ready, timeout, 0.1, "the worker to be ready")
        return self

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


class Events:
    """The JSON-lines record the test apps write (task runs and signals), read back by tests."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def of(self, task_id: str, kind: str | None = None) -> list[dict]:
        return [e for e in self.all() if e.get("id") == task_id and (kind is None or e["kind"] == kind)]


def drain(url: str, queue: str) -> list:
    """Take every message out of ``queue`` (acked): for tests that own the queue."""
    out = []
    with Connection(url) as conn:
        channel = conn.channel()
        while True:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                return out
            out.append(message)


def message_count(url: str, queue: str) -> int:
    with Connection(url) as conn:
        return conn.channel().queue_declare(queue, passive=True).message_count


class BugQueues:
    """Reads bug queues for tests: every message taken out is kept here by task id, so a test
    looking for its own message never loses another test's."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: dict[tuple[str, str], list] = {}

    def find(self, queue: str, task_id: str, timeout: float = 15):
        def look():
            for message in drain(self.url, queue):
                key = (queue, (message.headers or {}).get("id") or message.properties.get("correlation_id") or "")
                self.seen.setdefault(key, []).append(message)
            return self.seen.get((queue, task_id))
        found = wait_for(look, timeout, 0.2, f"task {task_id} in {queue}")
        assert len(found) == 1, f"{task_id} is in {queue} {len(found)} times"
        return found[0]


def atomic_filesystem_backend():
    """Celery's file-system result backend, writing each result atomically (temp file + rename), so a
    test reading a result never sees half a file. Use as ``tests.support:AtomicFS+file:///dir``."""
    from celery.backends.filesystem import FilesystemBackend

    class AtomicFS(FilesystemBackend):
        def set(self, key, value):
            path = self._filename(key)
            tmp = path + b".tmp-%d" % os.getpid()
            with self.open(tmp, "wb") as f:
                f.write(value if isinstance(value, bytes) else value.encode())
            os.replace(tmp, path)

    return AtomicFS


AtomicFS = atomic_filesystem_backend()
