"""The soak's nemesis: faults at random moments, drawn from a seed, each written to the run log.

========================  ===========================================================  =====================
kind                      what it does                                                 may explain a repeat
========================  ===========================================================  =====================
``kill_pool``             SIGKILL one pool process of a prefork worker                 of that worker
``kill_worker``           SIGKILL a whole worker (its process group), start it again   of that worker
``warm_stop``             SIGTERM a worker, wait until it exits, start it again        no
``restart_broker``        ``rabbitmqctl stop_app`` / ``start_app`` on the soak's node    of every worker
``cut``                   close a worker's connections (both sides see a reset)        of that worker
``stall``                 a worker's connections go silent 2-8 s, then close           of that worker
``hold_confirm``          the next publisher confirm a worker gets comes 1-6 s late     no
``service_down``          the breaker's fake service fails for 3-15 s                  no
``requeue``               ``rare-celery requeue-bugs QUEUE --reason bug --yes``          of the ids it moved
========================  ===========================================================  =====================

A worker that exits by itself (a poison message kills a solo worker) is logged as ``died`` and started again;
it explains the repeats of that worker as a kill does.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.soak.fleet import Fleet, Slot
from tests.support import ROOT, restart_broker_app

WEIGHTS = {"kill_pool": 3, "kill_worker": 2, "warm_stop": 2, "restart_broker": 1, "cut": 3, "stall": 2,
           "hold_confirm": 3, "service_down": 2, "requeue": 1}
# what may repeat work; a broker restart and a requeue take seconds: logged at their start, and their end is
# the next entry of the kind ENDS names (the checker takes the whole span)
DEATHS = frozenset({"kill_pool", "kill_worker", "restart_broker", "cut", "stall", "died", "requeue"})
ENDS = {"restart_broker": "broker_back", "requeue": "requeued"}


class Nemesis:
    def __init__(self, fleet: Fleet, rng: random.Random, every: float, log: Any, workdir: Path, broker_url: str,
                 bug_queues: list[str], restart_broker: bool) -> None:
        self.fleet, self.rng, self.every, self.log = fleet, rng, every, log
        self.workdir, self.broker_url, self.bug_queues = workdir, broker_url, bug_queues
        self.weights = {k: w for k, w in WEIGHTS.items() if restart_broker or k != "restart_broker"}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._up_at = 0.0  # when the fake service comes back (monotonic)

    def start(self) -> Nemesis:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(120)
        self.service_up()

    def _run(self) -> None:
        next_at = time.monotonic() + self.rng.expovariate(1 / self.every)
        while not self.stopped.wait(0.1):
            self._service_check()
            if time.monotonic() >= next_at:
                kind = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
                getattr(self, kind)(self.rng.choice(self.fleet.slots))
                next_at = time.monotonic() + self.rng.expovariate(1 / self.every)

    # -- the faults --------------------------------------------------------------------------------

    def kill_pool(self, slot: Slot) -> None:
        with slot.lock:
            children = self.fleet.pool_children(slot) if slot.pool == "prefork" else []
            if not children:
                return self.kill_worker_locked(slot)
            pid = self.rng.choice(sorted(children))
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                return None
            self.log("kill_pool", slot.worker.node, f"pid {pid}")
        return None

    def kill_worker(self, slot: Slot) -> None:
        with slot.lock:
            self.kill_worker_locked(slot)

    def kill_worker_locked(self, slot: Slot) -> None:
        self.log("kill_worker", slot.worker.node, "SIGKILL")
        self.fleet.kill_worker(slot)
        time.sleep(self.rng.uniform(0.5, 3))
        self.fleet.start(slot)

    def warm_stop(self, slot: Slot) -> None:
        with slot.lock:
            node = slot.worker.node
            self.log("warm_stop", node, "SIGTERM")
            took = self.fleet.warm_stop(slot)
            self.log("warm_stopped", node, took)
            self.fleet.start(slot)

    def restart_broker(self, slot: Slot) -> None:
        self.log("restart_broker", "*", "stop_app")
        took = restart_broker_app()
        self.log("broker_back", "*", f"after {took:.1f} s")

    def cut(self, slot: Slot) -> None:
        self.log("cut", slot.worker.node, f"{slot.proxy.cut()} connections")

    def stall(self, slot: Slot) -> None:
        seconds = round(self.rng.uniform(2, 8), 1)
        self.log("stall", slot.worker.node, f"{slot.proxy.stall(seconds)} connections for {seconds} s")

    def hold_confirm(self, slot: Slot) -> None:
        seconds = round(self.rng.uniform(1, 6), 1)
        slot.proxy.hold(seconds)
        self.log("hold_confirm", slot.worker.node, f"{seconds} s")

    def service_down(self, slot: Slot) -> None:
        seconds = round(self.rng.uniform(3, 15), 1)
        (self.workdir / "service-down").touch()
        self._up_at = time.monotonic() + seconds
        self.log("service_down", "service", f"for {seconds} s")

    def _service_check(self) -> None:
        if self._up_at and time.monotonic() >= self._up_at:
            self.service_up()

    def service_up(self) -> None:
        if self._up_at:
            self._up_at = 0.0
            (self.workdir / "service-down").unlink(missing_ok=True)
            self.log("service_up", "service", "")

    def requeue(self, slot: Slot) -> None:
        queue = self.rng.choice(self.bug_queues)
        cmd = [sys.executable, "-m", "rare_celery.tools.cli", "--broker", self.broker_url, "requeue-bugs", queue,
               "--reason", "bug", "--yes"]
        self.log("requeue", "bugs", queue)
        ran = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.log("requeued", "bugs", " ".join((ran.stdout + ran.stderr).split())[-300:])
