"""What an app's rare tasks are, where they run and where they end: read from the app, no broker."""

from __future__ import annotations

from dataclasses import dataclass

from .hops import MAX_HOPS
from .policy import Policy
from .topology import bug_queue_name, delay_kind


@dataclass(frozen=True)
class RareTaskInfo:
    """One RareTask of an app: its work queue (Celery's routing respected), queue kind and bug queue."""

    name: str
    queue: str
    kind: str
    bug_queue: str
    task: object

    @property
    def policy(self) -> Policy:
        return self.task.rare_policy

    @property
    def max_hops(self) -> int:
        return getattr(self.task, "max_hops", MAX_HOPS)

    def policies(self) -> list[tuple[str, Policy]]:
        """``(label, policy)``: one per payload handler (``name[key]``), else the task's own."""
        handlers = getattr(self.task, "handlers", None) or {}
        if getattr(self.task, "dispatch_on", None) and handlers:
            return [(f"{self.name}[{key}]", h.policy) for key, h in sorted(handlers.items())]
        return [(self.name, self.policy)]


def rare_tasks(app) -> list[RareTaskInfo]:
    """Every RareTask of ``app``, by name, with the queue Celery's router gives it."""
    from .task import is_rare

    out = []
    for task in sorted(app.tasks.values(), key=lambda t: t.name):
        if not is_rare(task):
            continue
        try:
            options = {"queue": task.queue} if getattr(task, "queue", None) else {}
            queue = app.amqp.router.route(options, task.name, task_type=task)["queue"].name
        except Exception:  # noqa: BLE001 - a route Celery cannot resolve fails at publish, not here
            queue = getattr(task, "queue", None) or app.conf.task_default_queue
        kind = delay_kind(app, queue)
        out.append(RareTaskInfo(task.name, queue, kind, task.bug_queue or bug_queue_name(queue), task))
    return out


def task_name(app, target: object) -> str:
    """A fallback (a task name, task or task class) as the name the worker hops to."""
    from .task import _task_name

    try:
        return _task_name(app, target)
    except ValueError:
        return repr(target)
