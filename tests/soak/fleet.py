"""The soak's workers: ``celery worker`` subprocesses, each behind a :class:`~tests.proxy.FaultProxy` of its own
(so a network fault hits one worker), started again when they exit."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.proxy import FaultProxy
from tests.support import HOST, Worker

POOLS = (("prefork", 2), ("prefork", 2), ("solo", 1))  # slot -> pool, concurrency


@dataclass
class Slot:
    index: int
    pool: str
    concurrency: int
    proxy: FaultProxy
    worker: Worker | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while a fault or a restart acts on it


class Fleet:
    def __init__(self, faults: Any, queues: list[str], broker_url: str, workdir: Path, log: Any) -> None:
        self.faults, self.queues, self.workdir, self.log = faults, queues, workdir, log
        host, port = HOST.rsplit(":", 1)
        self.broker_url = broker_url
        self.slots = [Slot(i, pool, c, FaultProxy(host, int(port))) for i, (pool, c) in enumerate(POOLS)]
        self.nodes: dict[str, int] = {}  # every worker node name ever started -> its slot

    def env(self, slot: Slot) -> dict:
        return {"RARE_FAULTS_BROKER": self.broker_url.replace(HOST, f"127.0.0.1:{slot.proxy.port}"),
                "RARE_FAULTS_DIR": str(self.workdir)}

    def start(self, slot: Slot) -> None:
        slot.worker = Worker("tests.apps.faults", self.queues, self.env(slot), self.workdir,
                             pool=slot.pool, concurrency=slot.concurrency, name=f"soak{slot.index}")
        self.nodes[slot.worker.node] = slot.index

    def start_all(self, timeout: float = 90) -> None:
        for slot in self.slots:
            self.start(slot)
        for slot in self.slots:
            self.wait_ready(slot, timeout)

    @staticmethod
    def wait_ready(slot: Slot, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if slot.worker.proc.poll() is not None:
                return  # exited while starting: the supervisor starts it again
            if " ready." in slot.worker.text():
                return
            time.sleep(0.2)

    def supervise(self) -> None:
        """Start again every worker that exited and that no fault is acting on."""
        for slot in self.slots:
            if slot.worker.proc.poll() is None or not slot.lock.acquire(blocking=False):
                continue
            try:
                if slot.worker.proc.poll() is not None:
                    self.log("died", slot.worker.node, f"exit {slot.worker.proc.returncode}")
                    self.start(slot)
            finally:
                slot.lock.release()

    # -- what the nemesis does to a slot (the caller holds slot.lock) ---------------------------------------

    def pool_children(self, slot: Slot) -> list[int]:
        pid = slot.worker.proc.pid
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
        return out

    def kill_worker(self, slot: Slot) -> None:
        if slot.worker.proc.poll() is None:
            os.killpg(slot.worker.proc.pid, signal.SIGKILL)
            slot.worker.proc.wait(10)

    def warm_stop(self, slot: Slot, timeout: float = 60) -> str:
        """SIGTERM and wait: what it took ("exit N after S s", or "SIGKILL after S s" if it would not stop)."""
        start = time.monotonic()
        if slot.worker.proc.poll() is not None:
            return "already stopped"
        os.killpg(slot.worker.proc.pid, signal.SIGTERM)
        try:
            slot.worker.proc.wait(timeout)
            return f"exit {slot.worker.proc.returncode} after {time.monotonic() - start:.1f} s"
        except subprocess.TimeoutExpired:
            self.kill_worker(slot)
            return f"did not stop in {timeout:g} s: SIGKILL"

    def stop_all(self) -> None:
        for slot in self.slots:
            with slot.lock:
                if slot.worker is not None:
                    slot.worker.stop(30)
            slot.proxy.stop()
