"""The broker objects rare_celery uses, as kombu entities, and the names derived from others.

* ``rare.delay`` (direct exchange): every delay queue is bound to it by its *delay key*, ``amq.`` + its
  name (``amq.rare.wait.5s``). A delayed message is published to it with the *work queue* as routing
  key and the delay key in ``BCC``, so it lands in the delay queue only (RabbitMQ strips ``BCC`` on
  delivery).
* ``rare.wait.<duration>`` (for example ``rare.wait.5s``): a durable classic queue with
  ``x-message-ttl = <duration>`` and ``rare.return`` as dead-letter exchange. When a message's
  time is up RabbitMQ dead-letters it there with all its original routing keys: the work queue's name
  and the delay key. Delay queues are shared by all work queues of a vhost. Quorum work queues (and
  every work queue when the app sets ``rare_queue_type = "quorum"``) use
  ``rare.wait.quorum.<duration>`` (quorum, ``x-overflow=reject-publish``, at-least-once dead-lettering).
* ``rare.return`` (direct exchange, alternate exchange ``rare.unrouted``): every rare work queue is
  bound to it by its own name, so a due message goes back to the queue it came from. A work queue
  that no longer exists (deleted, renamed, migrated) has no binding: its due messages go to the
  alternate exchange and wait in the queue ``rare.unrouted`` instead of being dropped. The delay key
  matches no binding there, and no queue can be named after it (clients cannot declare ``amq.*``
  queues): every due message is routed once, and RabbitMQ's dead-letter cycle detection never has a
  second copy to drop.
* ``<work queue>.bugs`` (or the task's ``bug_queue``): where messages end that will never succeed.

Each delay queue holds one TTL, so no message waits behind a later one. A delay goes to the
queue of the largest *grid value* not above it: whole numbers of ms, seconds, minutes, hours or
days with two significant digits (250 ms, 1200 ms, 5 s, 90 s, 15 m, 4 h, 72 h, 3 d, ...). A delay that is not
on the grid (jitter, an explicit countdown) comes back early and the worker sends the remainder
round again, so a message is never run early and at most ``GRID_SIZE`` delay queues per queue kind
ever exist in a vhost, however many messages, delays or jitter there are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from kombu import Exchange, Queue

MAX_DELAY_MS = 315_360_000_000  # RabbitMQ's largest TTL: 10 years
MAX_NAME = 255  # AMQP short string: the longest queue or exchange name, in bytes
CLASSIC, QUORUM = "classic", "quorum"
QUEUE_TYPE_SETTING = "rare_queue_type"  # app setting: "quorum" makes every queue rare_celery owns quorum
DELAY_EXCHANGE = Exchange("rare.delay", type="direct", durable=True)
UNROUTED_EXCHANGE = Exchange("rare.unrouted", type="fanout", durable=True)
UNROUTED = "rare.unrouted"
RETURN_EXCHANGE = Exchange("rare.return", type="direct", durable=True,
                           arguments={"alternate-exchange": UNROUTED_EXCHANGE.name})
BUG_SUFFIX = ".bugs"
NOT_A_BUG_QUEUE = ("is not a bug queue (a name ending in .bugs, rare.unrouted, or with -A a bug_queue of the app's "
                   "tasks): reading a work queue hands its messages back redelivered, and a worker takes a "
                   "redelivered message for one whose worker died (a failed attempt)")
_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))
# Grid values: whole numbers of ms, s, minutes, hours or days with two significant digits
# (1..99, 100, 110, ... 990, 1000, 1100, ...), up to 10 years. Counted in tests/unit/test_topology.py.
GRID_SIZE = 1740


class _Made(Queue):  # type: ignore[misc]  # kombu ships no types
    """A queue declaration made by one of this module's factories (:func:`_once`): it crosses to another
    process (a copy from a pool process to the worker's main process) as that factory's call, found
    there in its cache, not as kombu's attribute-by-attribute copy rebuilt for every copy."""

    rare_made: tuple[Callable[..., Queue], tuple[Any, ...]] | None = None

    def __reduce__(self) -> Any:
        return self.rare_made or super().__reduce__()


class DelayQueue(_Made):
    """A queue that never delivers to a worker: a delay queue, a service's line (see :func:`for_broker`).
    A class, not an attribute set on a Queue: it survives pickling (a copy crossing from a pool process
    to the worker's main process)."""

    rare_delay = True


class ReadQueue(_Made):
    """A queue people read and put back: a bug queue, ``rare.unrouted``, a breaker's state (see :func:`for_broker`)."""

    rare_read_by_people = True


_Factory = TypeVar("_Factory", bound=Callable[..., Queue])


def _once(factory: _Factory) -> _Factory:
    """``factory``'s declarations made once per arguments (positional only) and shared: a retry's delay
    queue is not a new kombu entity each time. kombu never changes an entity in place (``bind`` binds a
    copy), and neither does rare_celery."""
    @functools.lru_cache(maxsize=4096)
    @functools.wraps(factory)
    def shared(*args: Any) -> Queue:
        queue = factory(*args)
        queue.rare_made = (shared, args)
        return queue
    return cast(_Factory, shared)


def grid_floor(delay_ms: int) -> int:
    """The largest grid value not above ``delay_ms`` (>= 1): 4 h stays 4 h, 1234 ms becomes 1200 ms."""
    best = 0
    for _, unit in _UNITS:
        count = delay_ms // unit
        if count:
            step = 10 ** max(len(str(count)) - 2, 0)
            best = max(best, count // step * step * unit)
    return best


def grid_values() -> list[int]:
    """Every grid value (ms), ascending: the TTLs a delay queue can have (``GRID_SIZE`` of them)."""
    return sorted({m * 10**e * unit for _, unit in _UNITS for e in range(12) for m in range(1, 100)
                   if (m >= 10 or e == 0) and m * 10**e * unit <= MAX_DELAY_MS})


def duration_label(ms: int) -> str:
    """``5000`` -> ``5s``; ``5400000`` -> ``90m``; ``1500`` -> ``1500ms``: the largest exact unit."""
    for unit, size in _UNITS:
        if ms % size == 0:
            return f"{ms // size}{unit}"
    raise AssertionError("unreachable: every whole number of ms has a unit")


@_once
def delay_queue(delay_ms: int, kind: str = CLASSIC, /) -> Queue:
    """The TTL queue for one grid value; ``delay_ms`` must already be on the grid. Every queue
    rare_celery declares says its type (a vhost's default queue type never decides it)."""
    prefix = "rare.wait" if kind == CLASSIC else "rare.wait.quorum"
    name = f"{prefix}.{duration_label(delay_ms)}"
    args = {**_typed(CLASSIC), "x-message-ttl": delay_ms, "x-dead-letter-exchange": RETURN_EXCHANGE.name}
    if kind == QUORUM:
        args.update({
            "x-queue-type": "quorum",
            "x-overflow": "reject-publish",
            "x-dead-letter-strategy": "at-least-once",
        })
    return DelayQueue(name, exchange=DELAY_EXCHANGE, routing_key=delay_key(name), durable=True, queue_arguments=args)


def delay_key(delay_queue_name: str) -> str:
    """The key a delay queue is bound to ``rare.delay`` by, and reached through (``BCC``): a name no
    queue can have, so dead-lettering's re-use of it routes nothing."""
    return "amq." + delay_queue_name


def bug_queue_name(work_queue: str) -> str:
    """The default bug queue of a work queue: ``<work queue>.bugs``."""
    return work_queue + BUG_SUFFIX


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a queue name (not a string, empty, longer than 255 bytes), or ``None``."""
    if not isinstance(name, str) or not name:
        return f"a queue name must be a non-empty string, got {name!r:.80}"
    if len(name.encode()) > MAX_NAME:
        return f"queue name {name[:40]!r}... is {len(name.encode())} bytes long; AMQP allows {MAX_NAME}"
    return None


def is_delay_queue(name: str) -> bool:
    return name.startswith("rare.wait.")


def looks_like_bug_queue(name: str) -> bool:
    """Whether ``name`` is one of the queues rare_celery ends messages in by default: ``<queue>.bugs`` or
    ``rare.unrouted`` (a task's own ``bug_queue`` is known only from its app)."""
    return name.endswith(BUG_SUFFIX) or name == UNROUTED


@_once
def bug_queue(name: str, kind: str = CLASSIC, /) -> Queue:
    """A bug queue, reached through the default exchange. Classic whatever the work queue's kind
    (people read it, and a classic queue keeps its order and bytes when a message is looked at and
    put back; a 3.10 quorum queue reorders it and adds ``x-delivery-count``), unless the app makes
    every queue of its own quorum (``rare_queue_type``: a classic queue lives on one node)."""
    return _read_by_people(Queue(name, exchange=Exchange(""), routing_key=name, durable=True,
                                 queue_arguments=_typed(kind)))


@_once
def unrouted_queue(kind: str = CLASSIC, /) -> Queue:
    """``rare.unrouted``: where due messages wait whose work queue is gone (see :func:`bug_queue` for its kind)."""
    return _read_by_people(Queue(UNROUTED, exchange=UNROUTED_EXCHANGE, routing_key="", durable=True,
                                 queue_arguments=_typed(kind)))


def _read_by_people(queue: Queue) -> Queue:
    return ReadQueue(queue.name, exchange=queue.exchange, routing_key=queue.routing_key, durable=queue.durable,
                     queue_arguments=queue.queue_arguments)


def _typed(kind: str) -> dict[str, Any]:
    """Every queue rare_celery owns says its type: a vhost's or node's default queue type never
    decides it (on RabbitMQ 4.x a quorum queue drops a message read 20 times; see ``for_broker``)."""
    return {"x-queue-type": kind}


LAZY = {"x-queue-mode": "lazy"}  # RabbitMQ 3.10, 3.11: a classic queue's messages on disk, not in RAM


def lazy_first(version: str) -> bool:
    """Whether a classic delay queue is declared lazy first on a broker of ``version``: before 3.12 a
    classic queue keeps its messages in RAM unless lazy (measured on 3.10: ~4.5 KB of broker memory per
    waiting message, ~0.2 KB lazy); from 3.12 every classic queue pages out and ignores the mode."""
    parts = version.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return False
    return (int(parts[0]), int(parts[1])) < (3, 12)


def other_mode(queue: Queue) -> Queue:
    """``queue`` (a classic delay queue) declared with the other ``x-queue-mode``: lazy if it was not,
    default if it was. A delay queue that exists keeps the mode it was made with (RabbitMQ refuses a
    declaration with another one, 406), whoever declares it later (see :func:`rare_celery.declare.once`)."""
    args = dict(queue.queue_arguments or {})
    if args.pop("x-queue-mode", None) is None:
        args.update(LAZY)
    return _like(queue, args)


def _like(queue: Queue, args: dict[str, Any]) -> Queue:
    return type(queue)(queue.name, exchange=queue.exchange, routing_key=queue.routing_key, durable=queue.durable,
                       queue_arguments=args)


def for_broker(queue: Queue, version: str) -> Queue:
    """``queue`` as it must be declared on a broker of ``version``: from RabbitMQ 4.0 a quorum queue
    drops a message after 20 deliveries unless it has no limit (``x-delivery-limit: -1``; on 3.x that
    value would drop it at the first redelivery). Bug queues and ``rare.unrouted`` are read and put
    back by people; delay queues never deliver and keep the default. A classic delay queue is lazy
    on RabbitMQ before 3.12 (:func:`lazy_first`): waiting messages cost the broker disk, not RAM."""
    args = queue.queue_arguments or {}
    if getattr(queue, "rare_delay", False) and args.get("x-queue-type") == CLASSIC and lazy_first(version):
        return _like(queue, {**args, **LAZY})
    if args.get("x-queue-type") != QUORUM or not getattr(queue, "rare_read_by_people", False) \
            or not version[:1].isdigit() or int(version.split(".")[0]) < 4:
        return queue  # work queues are the app's to declare, delay queues never deliver
    return Queue(queue.name, exchange=queue.exchange, routing_key=queue.routing_key, durable=queue.durable,
                 queue_arguments={**args, "x-delivery-limit": -1})


def queue_kind(queue: Queue | None) -> str:
    """``quorum`` when the work queue is declared as one (``x-queue-type``), else ``classic``. The
    worker writes the type the broker reports into its declaration before it consumes (see
    :func:`rare_celery.declare.learn_types`): a vhost's default queue type counts too."""
    args = (queue.queue_arguments or {}) if queue is not None else {}
    return QUORUM if args.get("x-queue-type") == QUORUM else CLASSIC


def delay_kind(app: Any, work_queue: str) -> str:
    """The kind of delay queue a message of ``work_queue`` waits in: quorum for a quorum work queue,
    and for every work queue when the app sets ``rare_queue_type = "quorum"``."""
    if own_kind(app) == QUORUM:
        return QUORUM
    return queue_kind(app.amqp.queues.get(work_queue))


def own_kind(app: Any) -> str:
    """The kind of the bug queues and ``rare.unrouted`` of ``app``: classic, or quorum when the app sets
    ``rare_queue_type = "quorum"`` (the choice for clusters: a classic queue lives on one node, and
    with that node down nothing can be routed to it)."""
    return QUORUM if app.conf.get(QUEUE_TYPE_SETTING) == QUORUM else CLASSIC


UNROUTED_QUEUE = unrouted_queue()  # classic: the name, and the declaration of apps without rare_queue_type


# -- circuit breakers (see rare_celery.breaker) ----------------------------------------------------
# ``rare.breakers`` (topic exchange): notes about breaker ``<name>`` are published with the key
# ``<name>.count`` (an attempt's outcome) or ``<name>.state`` (a change of state). Each worker's
# main process listens on a queue of its own; ``rare.breaker.<name>`` keeps the last state note
# (x-max-length 1) for workers and tools that start later; ``rare.breaker.<name>.probe`` is the
# probe lock: an exclusive queue, held by the connection of the attempt that probes.
BREAKER_EXCHANGE = Exchange("rare.breakers", type="topic", durable=True)
COUNT_KEY, STATE_KEY = "count", "state"


def breaker_key(breaker: str, kind: str) -> str:
    """The routing key of a note about ``breaker``: ``kind`` is :data:`COUNT_KEY` or :data:`STATE_KEY`."""
    return f"{breaker}.{kind}"


def breaker_state_queue(breaker: str, kind: str = CLASSIC) -> Queue:
    """``rare.breaker.<name>``: the last state note of ``breaker`` (the newest one wins a full queue)."""
    args = {**_typed(kind), "x-max-length": 1, "x-overflow": "drop-head"}
    return _read_by_people(Queue(f"rare.breaker.{breaker}", exchange=BREAKER_EXCHANGE,  # read and put back
                                 routing_key=breaker_key(breaker, STATE_KEY), durable=True, queue_arguments=args))


def probe_lock_name(breaker: str) -> str:
    """The exclusive queue whose holder is the probe of ``breaker``."""
    return f"rare.breaker.{breaker}.probe"


def rate_window_queue(service: str, count: int, window: float) -> Queue:
    """``rare.limit.<service>.rate.<count>-per-<window>``: a service's rate as a sliding window. Each attempt
    puts one message in it (confirmed) before it runs; the broker refuses one more than ``count``
    (``reject-publish``) and drops each after ``window`` (``x-message-ttl``): at most ``count`` in
    any window. Its name carries the limit, so a changed limit is a new queue (the old one, empty
    after a window, stays: ``x-expires`` would count a queue only published to as unused, and drop
    a window in use)."""
    ms = max(1, round(window * 1000))
    # each place lasts a little longer than the window (1% and 50 ms): an attempt starts a moment after
    # its place is confirmed, and that moment varies (a pool process the OS does not run for a while);
    # the service must see the limit, not the broker. 0.1% and 20 ms let 21 of 20/s into one second of
    # a busy 2-core CI machine's run.
    args = {"x-queue-type": "classic", "x-max-length": count, "x-overflow": "reject-publish",
            "x-message-ttl": round(ms * 1.01) + 50}
    return Queue(f"rare.limit.{service}.rate.{count}-per-{duration_label(ms)}", durable=True, auto_delete=False,
                 queue_arguments=args)


@_once
def line_queue(service: str, kind: str = CLASSIC, /) -> Queue:
    """``rare.limit.<service>.line`` (``.line.quorum`` for quorum work queues): the attempts a service's
    limits sent to wait, in arrival order. Reached like a delay queue (through ``rare.delay`` by its
    ``BCC`` key, the work queue as the routing key), but with no TTL: an attempt leaves when it is woken
    (:func:`rare_celery.limits_io.wake`: read, published again to its work queue, acked) or, dead-lettered
    to ``rare.return`` like a delay queue's, when its shelf life ends (the copy's own ``expiration``; the
    broker expires messages from the head, so one behind others that wait longer leaves when it reaches
    the head).

    An attempt that was woken but lost its slot to another (two wakes for one free slot, or a new attempt
    that took the slot's hint first) goes back to the head, not the end: its copy has
    :data:`LINE_HEAD_PRIORITY`, and the classic line has two priorities (``x-max-priority`` 1). A quorum
    line has them from RabbitMQ 4.0 (a priority above 4 is the high one); on 3.x it is first in, first
    out, and such an attempt joins the end."""
    name = f"rare.limit.{service}.line" + ("" if kind == CLASSIC else ".quorum")
    args = {**_typed(CLASSIC), "x-dead-letter-exchange": RETURN_EXCHANGE.name, "x-max-priority": 1}
    if kind == QUORUM:
        del args["x-max-priority"]  # refused by a quorum queue; 4.x quorum queues have two priorities anyway
        args.update({"x-queue-type": "quorum", "x-overflow": "reject-publish",
                     "x-dead-letter-strategy": "at-least-once"})
    # lazy on RabbitMQ < 3.12 (see for_broker): a long line costs disk, not RAM
    return DelayQueue(name, exchange=DELAY_EXCHANGE, routing_key=delay_key(name), durable=True, queue_arguments=args)


LINE_HEAD_PRIORITY = 9  # a line copy's priority when it goes back to the head (see line_queue)


def free_slots_queue(service: str, slots: int) -> Queue:
    """``rare.limit.<service>.free.<slots>``: hints of the slots just let go of (a message per slot, its
    number), so that the attempt an ending woke tries that slot first instead of those still held. Only a
    hint: the slots themselves are exclusive queues (:func:`slot_lock_name`); a hint is gone after 2 s.
    The name carries the number of slots, as its ``x-max-length`` does: a changed limit is a new queue."""
    args = {"x-queue-type": "classic", "x-max-length": max(1, slots), "x-overflow": "drop-head",
            "x-message-ttl": 2000}
    return Queue(f"rare.limit.{service}.free.{slots}", durable=True, auto_delete=False, queue_arguments=args)


def pause_queue(service: str) -> Queue:
    """``rare.limit.<service>.pause``: a service with limits that asked for a pause (``RetryAfter``) holds
    one message here for the pause's length (its ``expiration``). Every attempt's gate reads its count
    last, so that an attempt of another worker holds back at once, not when the breaker's note reaches
    its worker (some milliseconds; the note is what holds it after that). Several pauses: several
    messages, the broker expires them from the head (one behind a longer one stays counted, but the
    longer one is the pause then)."""
    args = {"x-queue-type": "classic", "x-max-length": 100, "x-overflow": "drop-head"}
    return Queue(f"rare.limit.{service}.pause", durable=True, auto_delete=False, queue_arguments=args)


def slot_lock_name(service: str, slot: int) -> str:
    """The exclusive queue whose holder runs one of ``service``'s attempts in flight (slot ``slot``)."""
    return f"rare.limit.{service}.slot.{slot}"


def breaker_listener(hostname: str, token: str) -> str:
    """The queue a worker's main process hears breaker notes on (exclusive: gone with its connection)."""
    return f"rare.breakers.{hostname[:200]}.{token}"
