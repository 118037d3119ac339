"""What an app's rare tasks are, where they run and where they end: read from the app, no broker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from .exceptions import ConfigurationError
from .hops import MAX_HOPS
from .policy import Policy
from .topology import RETURN_EXCHANGE, bug_queue_name, delay_kind


@dataclass(frozen=True)
class RareTaskInfo:
    """One RareTask of an app: its work queue (Celery's routing respected), queue kind and bug queue."""

    name: str
    queue: str
    kind: str
    bug_queue: str
    task: Any

    @property
    def policy(self) -> Policy:
        return cast(Policy, self.task.rare_policy)

    @property
    def max_hops(self) -> int:
        return cast(int, getattr(self.task, "max_hops", MAX_HOPS))

    def policies(self) -> list[tuple[str, Policy]]:
        """``(label, policy)``: one per payload handler (``name[key]``), else the task's own."""
        handlers = getattr(self.task, "handlers", None) or {}
        if getattr(self.task, "dispatch_on", None) and handlers:
            return [(f"{self.name}[{key}]", h.policy) for key, h in sorted(handlers.items())]
        return [(self.name, self.policy)]


def is_rare(task: Any) -> bool:
    """Whether ``task`` is a RareTask that retries through delay queues: it has a rare policy (Celery's
    built-ins made from a RareTask ``task_cls`` have none, and keep Celery's behaviour)."""
    return getattr(task, "rare_policy", None) is not None


def target_queue(app: Any, name: str, task: Any) -> Any:
    """The kombu Queue a message of task ``name`` goes to: the task's ``queue``, or Celery's routing
    (``task_routes``). The one place rare_celery asks Celery's router."""
    wanted = {"queue": task.queue} if getattr(task, "queue", None) else {}
    return app.amqp.router.route(wanted, name, task_type=task)["queue"]


def rare_tasks(app: Any) -> list[RareTaskInfo]:
    """Every RareTask of ``app``, by name, with the queue Celery's router gives it."""
    out = []
    for task in sorted(app.tasks.values(), key=lambda t: t.name):
        if not is_rare(task):
            continue
        try:
            queue = target_queue(app, task.name, task).name
        except Exception:  # noqa: BLE001 - a route Celery cannot resolve fails at publish, not here
            queue = getattr(task, "queue", None) or app.conf.task_default_queue
        kind = delay_kind(app, queue)
        out.append(RareTaskInfo(task.name, queue, kind, task.bug_queue or bug_queue_name(queue), task))
    return out


def resolve_task_name(app: Any, target: Any) -> str:
    """A fallback or hop target as a task name: a name, a task, or a task class registered in ``app``;
    ``ValueError`` when it is none of them."""
    if isinstance(target, str):
        return target
    if isinstance(target, type):
        found: list[str] = [t.name for t in app.tasks.values() if type(t) is target]  # type: ignore[attr-defined]
        if found:
            return found[0]
    name: str | None = getattr(target, "name", None)
    if not name:
        raise ValueError(f"cannot hop to {target!r}: not a task name and not registered in {app.main!r}")
    return name


def task_name(app: Any, target: object) -> str:
    """A fallback as the name the worker hops to, for display (``repr`` when it names no task)."""
    try:
        return resolve_task_name(app, target)
    except ValueError:
        return repr(target)


def work_queue_of(task: Any, delivery_info: Any) -> str:
    """The queue a delivery's exchange and routing key lead to, when the worker did not say."""
    info = delivery_info or {}
    exchange, key = info.get("exchange"), info.get("routing_key")
    if exchange in ("", RETURN_EXCHANGE.name) and key:
        return cast(str, key)
    for q in task.app.amqp.queues.values():
        if q.exchange is not None and q.exchange.name == exchange and q.routing_key == key:
            return cast(str, q.name)
    return cast(str, getattr(task, "queue", None) or task.app.conf.task_default_queue)


def breakers(app: Any) -> dict[str, Any]:
    """Breaker name -> its settings (:class:`rare_celery.breaker.Settings`), for the RareTasks of ``app``
    that name one; tasks that share a breaker must set it up the same way (else ConfigurationError)."""
    out: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for info in rare_tasks(app):
        settings = getattr(info.task, "rare_breaker", None)
        if settings is None:
            continue
        name = info.task.breaker
        if name in out and out[name] != settings:
            raise ConfigurationError(
                f"rare_celery: tasks {owners[name]} and {info.name} share breaker {name!r} with different "
                f"settings ({out[name]} and {settings}); set breaker_failures, breaker_within, breaker_open, "
                f"breaker_max_open, service_rate and service_concurrency the same on both")
        out.setdefault(name, settings)
        owners.setdefault(name, info.name)
    return out
