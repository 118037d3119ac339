"""Hop history (``x-rare-hops``): where a message has been, bounded, and when a hop must stop.

Each entry is ``{"task", "queue", "reason", "attempts", "started", "left"}`` (times in epoch
seconds): the task the work left, the queue it ran on, why it left, how many attempts it made
there and how long it stayed. The list never grows past ``max_hops`` + 1 entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_HOPS = 10
MAX_HOPS_LIMIT = 40  # the largest max_hops a task may set (the history travels in every copy)
_FIELD = 200


def entry(task: str, queue: str, reason: str, attempts: int, started: float, left: float) -> dict[str, Any]:
    return {"task": task[:_FIELD], "queue": queue[:_FIELD], "reason": (reason or "")[:_FIELD],
            "attempts": attempts, "started": started, "left": left}


def read(value: object) -> list[dict[str, Any]]:
    """The history a message carries; anything malformed is dropped, not trusted."""
    if not isinstance(value, (list, tuple)):
        return []
    return [dict(e) for e in value[: MAX_HOPS_LIMIT + 1] if isinstance(e, dict) and isinstance(e.get("task"), str)]


def refusal(history: Sequence[dict[str, Any]], target: str, max_hops: int) -> str | None:
    """Why a hop to ``target`` must not happen, or ``None``. ``history`` ends with the task the work
    leaves now; a target already in it is a loop, and a history longer than ``max_hops`` is too long."""
    if any(e["task"] == target for e in history):
        return "hop loop: " + " -> ".join([*(e["task"] for e in history), target])
    if len(history) > max_hops:
        return f"more than {max_hops} hops: " + " -> ".join(e["task"] for e in history)
    return None
