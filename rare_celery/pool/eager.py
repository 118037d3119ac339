"""Eager runs (``task.apply()``, ``task_always_eager``): the policy without the waits.

Attempts, ``retry_on``, ``Bug``, shelf life (on a clock that jumps over each delay), fallback and
``Hop`` as on a worker; no broker is involved, and the final exception is raised.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from celery.exceptions import Ignore, Reject, Retry

from .. import endings, hops
from .. import headers as hdr
from ..exceptions import Exhausted, Expired, Hop, HopLimit
from ..inventory import resolve_task_name
from ..message import Delivery
from ..policy import HopTo, RetryIn
from ..reasons import EXPIRED
from .attempt import Current, accepts, dispatch


class EagerRetry(Retry):
    """``retry()`` called in an eager run: the eager loop (not the broker) runs the next attempt."""

    def __init__(self, exc: BaseException | None, countdown: float | None, limit: int | None) -> None:
        super().__init__(exc=exc, when=countdown)
        self.countdown, self.limit = countdown, limit


def run(task: Any, args: Any, kwargs: Any) -> Any:
    """Run ``task`` eagerly, attempt after attempt, as its policy says."""
    req = task.request
    policy, fn = dispatch(task, args, kwargs)
    clock = start = time.time()
    state = hdr.Attempt(1, start, policy.deadline(start))
    while True:
        req.rare_current = Current(state, policy)
        countdown = limit = None
        try:
            return fn(*args, **kwargs)
        except Hop as hop:
            new = hop.args or hop.kwargs
            return _hop(task, state, hop.target, hop.reason, hop.args if new else args, hop.kwargs if new else kwargs)
        except EagerRetry as again:
            exc, countdown, limit = again.exc, again.countdown, again.limit
            if isinstance(exc, Hop):
                return _hop(task, state, exc.target, exc.reason, exc.args or args, exc.kwargs or kwargs)
        except (Ignore, Reject):
            raise
        except Exception as error:  # noqa: BLE001 - decided by the policy below
            exc = error
            if isinstance(exc, TypeError) and not accepts(fn, args, kwargs):
                raise TypeError(f"wrong arguments for {task.name}: {exc}") from None
        decision = policy.decide(state, exc=exc, now=clock, countdown=countdown, max_attempts=limit)
        if isinstance(decision, RetryIn):
            clock += decision.delay
            state = replace(state, number=state.number + 1)
            continue
        if isinstance(decision, HopTo):
            return _hop(task, state, decision.target, decision.reason, args, kwargs)
        if exc is None:
            exc = (Expired if decision.reason == EXPIRED else Exhausted)(
                f"{task.name}: {decision.reason} after {state.number} attempts")
        raise exc


def _hop(task: Any, state: hdr.Attempt, target: object, reason: str, args: Any, kwargs: Any) -> Any:
    """A hop in an eager run: the target runs eagerly now, with the hop history the broker's would carry."""
    name = resolve_task_name(task.app, target)
    history = endings.hop_history(Delivery.running(task), state, reason, time.time())
    refused = hops.refusal(history, name, task.max_hops)
    if refused:
        raise HopLimit(f"{task.name} cannot hop to {name}: {refused}")
    result = task.app.tasks[name].apply(args, kwargs, task_id=task.request.id, headers={hdr.HOPS: history})
    return result.get(propagate=True, disable_sync_subtasks=False)
