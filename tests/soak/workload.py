"""What the soak publishes: a mix of plans through tests/apps/faults.py, each with the ends it may reach.

A job is one message published by the soak (one task id). Its plan says which task it starts with and how
it must end: succeeded (a success record of one of ``done_by``), or in a bug queue with one of ``reasons``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from rare_celery import PublishRefused, bulk


@dataclass(frozen=True)
class Plan:
    name: str
    weight: int  # in the mix, out of the sum of all weights (~1,000: a poison plan is 1 in 1,000)
    start: Callable[[dict, random.Random], tuple[Any, tuple, dict]]  # (task, args, apply_async options)
    done_by: frozenset[str]  # task short names whose success ends it well ("" : none)
    reasons: frozenset[str]  # bug-queue reasons it may end with, faults aside


def _plain(task: str, *args: Any) -> Callable:
    return lambda tasks, rng: (tasks[task], args, {})


PLANS = {p.name: p for p in (
    Plan("ok", 200, _plain("work", "ok", 0), frozenset({"work"}), frozenset()),
    Plan("flaky", 150, lambda tasks, rng: (tasks["work"], ("flaky", rng.randint(1, 2)), {}), frozenset({"work"}),
         frozenset()),
    Plan("always", 50, _plain("work", "always", 0), frozenset(), frozenset({"exhausted"})),
    Plan("bug", 80, _plain("work", "bug", 0), frozenset(), frozenset({"bug"})),
    Plan("fallback", 80, _plain("doomed", "fallback"), frozenset({"rescue"}), frozenset()),
    Plan("hop", 80, _plain("hop", "hop"), frozenset({"rescue"}), frozenset()),
    Plan("later", 100, lambda tasks, rng: (tasks["work"], ("ok", 0), {"countdown": round(rng.uniform(0.5, 8), 3)}),
         frozenset({"work"}), frozenset()),
    Plan("expire", 50, _plain("brittle"), frozenset(), frozenset({"expired"})),
    Plan("service", 120, _plain("call"), frozenset({"call"}), frozenset({"exhausted"})),
    Plan("limited", 60, _plain("limited"), frozenset({"limited"}), frozenset()),
    Plan("poison1", 1, _plain("poison", 1), frozenset({"poison"}), frozenset()),
    Plan("poison", 1, _plain("poison", 9), frozenset(), frozenset({"worker_lost"})),
)}


@dataclass
class Job:
    id: str
    kind: str  # classic | quorum
    plan: str
    published: float  # epoch s, when the publish returned
    due: float | None = None  # a delayed start: not to run before this (epoch s)


class Publisher:
    """Publishes jobs at a steady rate, one ``delay()`` each and now and then a ``bulk`` batch; a publish
    that raises leaves its job *unsure* (maybe in the broker, maybe not): the checker counts it only if it
    is seen somewhere."""

    def __init__(self, faults: Any, kinds: list[str], rng: random.Random) -> None:
        self.faults, self.kinds, self.rng = faults, kinds, rng
        self.jobs: dict[str, Job] = {}
        self.unsure: dict[str, Job] = {}
        self.refused = 0  # publishes that raised
        self._plans = list(PLANS.values())

    def _draw(self) -> tuple[Any, tuple, dict, Job]:
        plan = self.rng.choices(self._plans, weights=[p.weight for p in self._plans])[0]
        kind = self.rng.choice(self.kinds)
        task, args, options = plan.start(self.faults.TASKS[kind], self.rng)
        task_id = f"{plan.name}-{len(self.jobs) + len(self.unsure):06d}-{self.rng.getrandbits(32):08x}"
        job = Job(task_id, kind, plan.name, time.time())  # a countdown counts from the call
        if "countdown" in options:
            job.due = job.published + options["countdown"]
        return task, args, {**options, "task_id": task_id}, job

    def one(self) -> None:
        task, args, options, job = self._draw()
        try:
            task.apply_async(args, **options)
        except Exception:  # noqa: BLE001 - the broker restarts, a connection is cut: maybe published
            self.refused += 1
            self.unsure[job.id] = job
            return
        self.jobs[job.id] = job

    def batch(self, n: int) -> None:
        drawn = [self._draw() for _ in range(n)]
        try:
            with bulk(self.faults.app):
                for task, args, options, _ in drawn:
                    task.apply_async(args, **options)
        except PublishRefused as exc:
            self.refused += 1
            unconfirmed = set(exc.task_ids or ())
            for _, _, options, job in drawn:
                target = self.unsure if job.id in unconfirmed or not exc.task_ids else self.jobs
                target[job.id] = job
            return
        except Exception:  # noqa: BLE001 - as in one()
            self.refused += 1
            for *_, job in drawn:
                self.unsure[job.id] = job
            return
        for *_, job in drawn:
            self.jobs[job.id] = job
