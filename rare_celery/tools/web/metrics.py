"""Prometheus metrics: queue depths read at scrape time, and counters of rare_celery's decisions.

The counters count the ``rare-*`` Celery events (:mod:`rare_celery.events`) that this process
receives, through an event receiver of its own (``app.events.Receiver``, routing key ``rare.#``):
workers send them when ``worker_send_task_events`` is on (``-E``), from every pool process of every
worker, so one console counts what all of them decided. They start at 0 when the console starts,
as Prometheus counters do after a restart (``rate()`` and ``increase()`` handle that). Events sent
while the console was not running are not counted.

Event fields are untrusted input (anyone who may publish to the ``celeryev`` exchange can send
one): label values are clipped, reasons outside the known ones become ``other`` (but a hop's, which the
app names), and each counter
keeps at most :data:`MAX_SERIES` label sets (further ones are counted under ``other``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ... import events, reasons
from ...policy import MIN_DELAY
from ...topology import CLASSIC, MAX_DELAY_MS, QUORUM, grid_floor
from ..breakers import PHASE_VALUES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from .console import Console

log = logging.getLogger(__name__)

MAX_SERIES = 1000
MAX_USERS = 50  # work queues listed for one delay queue learned from events
LABEL_WIDTH = 200
REASONS = reasons.ALL
OVERVIEW_CACHE = 2.0  # seconds a scrape reuses the queue depths of the previous one

COUNTERS = {  # event type -> (metric name, help, label names, fields the labels come from)
    events.RETRY: ("rare_retries_scheduled", "Retries scheduled (a failed attempt sent to a delay queue)",
                   ("task", "queue"), ("name", "queue")),
    events.BUGS: ("rare_routed_to_bugs", "Messages routed to a bug queue, by reason",
                  ("task", "reason", "queue"), ("name", "reason", "queue")),
    events.HOP: ("rare_hops", "Hops to a fallback or Hop target", ("source", "target", "reason"),
                 ("name", "target", "reason")),
    events.EXPIRED: ("rare_expired", "Messages whose shelf life ran out", ("task",), ("name",)),
    events.WAIT: ("rare_waits", "Early arrivals sent round again for the rest of their delay (not attempts)",
                  ("task", "queue"), ("name", "queue")),
    events.PUT_BACK: ("rare_put_backs", ("Deliveries put back in their queue without a next place (the ending "
                                         "could not be published)"), ("task", "queue"), ("name", "queue")),
    events.LOST: ("rare_lost_attempts", ("Attempts lost with their pool process or worker, or ended by a hard "
                                         "time limit: a worker that keeps dying shows here"),
                  ("task", "reason", "queue"), ("name", "reason", "queue")),
    events.BREAKER_OPEN: ("rare_breaker_trips", "Circuit breakers opened (a trip, a failed probe, a pause, a Retry-After)",
                          ("breaker",), ("breaker",)),
    events.BREAKER_PROBE: ("rare_breaker_probes", "Probes of an open circuit breaker started", ("breaker",),
                           ("breaker",)),
    events.BREAKER_CLOSE: ("rare_breaker_closes", "Circuit breakers closed by a probe that worked", ("breaker",),
                           ("breaker",)),
}


def _label(value: object) -> str:
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text[:LABEL_WIDTH]


class Counters:
    """Event counts by type and label values; fed by :class:`EventCounter`, read by the collector."""

    def __init__(self, kinds: Callable[[str], tuple[str, ...]] | None = None) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, Counter[Any]] = {kind: Counter() for kind in COUNTERS}
        self.received = 0
        self.connected = False
        self.delays: dict[tuple[str, int], set[str]] = {}  # delay queues seen in rare-retry events
        # the kinds of delay queue a work queue's retries may wait in: the app's answer, or (no app) both,
        # and the overview lists the ones that exist
        self.kinds = kinds or (lambda queue: (CLASSIC, QUORUM))

    def add(self, event: dict[str, Any]) -> None:
        kind: Any = event.get("type")  # an event's field
        spec = COUNTERS.get(kind)
        if spec is None:
            return
        values = []
        for name, source in zip(spec[2], spec[3]):
            value = _label(event.get(source))
            if name == "reason" and kind != events.HOP and value not in REASONS:
                value = "other"  # a hop's reason is the app's own (`Hop(..., reason="card expired")`): kept
            values.append(value)
        key = tuple(values)
        with self.lock:
            self.received += 1
            counter = self.counts[kind]
            if key not in counter and len(counter) >= MAX_SERIES:
                key = tuple("other" for _ in key)
            counter[key] += 1
            if kind in (events.RETRY, events.WAIT):
                self._saw_delay(event)

    def _saw_delay(self, event: dict[str, Any]) -> None:
        """The delay queue a retry or a wait (a delayed start, an early arrival, a breaker's hold) went to:
        its TTL (``waits``), or for a retry from a worker that does not send it, the grid value of its delay."""
        waits, delay, queue = event.get("waits"), event.get("delay"), event.get("queue")
        if not isinstance(queue, str):
            return
        if isinstance(waits, (int, float)) and not isinstance(waits, bool) and 0 < waits < MAX_DELAY_MS:
            ms = min(round(waits * 1000), MAX_DELAY_MS)
        elif event.get("type") == events.RETRY and isinstance(delay, (int, float)) and not isinstance(delay, bool):
            ms = min(int(max(delay, MIN_DELAY) * 1000), MAX_DELAY_MS)
        else:
            return
        if ms < 1:
            return
        for kind in self.kinds(queue):
            key = (kind, grid_floor(ms))
            if key not in self.delays and len(self.delays) >= MAX_SERIES:
                continue
            users = self.delays.setdefault(key, set())
            if len(users) < MAX_USERS:  # event fields are anyone's: a bounded list of work queues per delay queue
                users.add(queue[:LABEL_WIDTH])

    def snapshot(self) -> dict[str, Counter[Any]]:
        with self.lock:
            return {kind: Counter(c) for kind, c in self.counts.items()}


class EventCounter:
    """A thread that receives the ``rare-*`` events of the broker's vhost and counts them; it
    reconnects after a broker restart."""

    def __init__(self, app: Any, counters: Counters, connect: Callable[[], Any] | None = None) -> None:
        self.app, self.counters = app, counters
        self.connect = connect or app.connection_for_read
        self.receiver = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rare-web-events", daemon=True)

    def start(self) -> EventCounter:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)

    def wait_connected(self, timeout: float) -> bool:
        ends = time.monotonic() + timeout
        while not self.counters.connected and time.monotonic() < ends:
            time.sleep(0.05)
        return self.counters.connected

    def _consuming(self) -> None:
        self.counters.connected = True

    def _run(self) -> None:
        pause = 1.0
        while not self._stop.is_set():
            conn = self.connect()
            try:
                receiver = self.app.events.Receiver(conn, handlers={"*": self.counters.add}, routing_key="rare.#")
                receiver.on_iteration = self._consuming  # called once the queue is declared and consumed
                self.receiver = receiver
                if self._stop.is_set():
                    break
                for _ in receiver.consume(limit=None, timeout=None, safety_interval=1, wakeup=False):
                    pause = 1.0
            except Exception as exc:  # noqa: BLE001 - the broker went away: count again when it is back
                if not self._stop.is_set():
                    log.warning("rare-celery web: event receiver: %s; reconnecting in %.0f s", exc, pause)
            finally:
                self.counters.connected = False
                with contextlib.suppress(Exception):
                    conn.release()
            self._stop.wait(pause)
            pause = min(pause * 2, 30.0)


def breaker_gauges(rows: list[dict[str, Any]]) -> list[Any]:
    """The state of each circuit breaker (rows of :func:`rare_celery.tools.breakers.report`); one whose
    state could not be read has no samples at this scrape."""
    from prometheus_client.core import GaugeMetricFamily

    state = GaugeMetricFamily("rare_breaker_state", "A circuit breaker's state: 0 closed, 1 open, 2 probing",
                              labels=["breaker"])
    periods = GaugeMetricFamily("rare_breaker_open_periods", "Times a circuit breaker opened (its generation)",
                                labels=["breaker"])
    probe_at = GaugeMetricFamily("rare_breaker_probe_at_seconds",
                                 "When an open circuit breaker lets one attempt probe the service (epoch s)",
                                 labels=["breaker"])
    in_flight = GaugeMetricFamily("rare_service_in_flight", "A service's attempts running now, of its "
                                  "service_concurrency", labels=["breaker"])
    in_window = GaugeMetricFamily("rare_service_rate_window", "A service's attempts started in the last window "
                                  "of its service_rate", labels=["breaker"])
    waiting = GaugeMetricFamily("rare_service_waiting", "A service's attempts waiting in its line for its limits",
                                labels=["breaker"])
    held = GaugeMetricFamily("rare_breaker_held", "1 while a service is held on purpose (an operator's pause, "
                             "a Retry-After), until its probe_at time; 0 otherwise", labels=["breaker"])
    for r in rows:
        if r["state"] not in PHASE_VALUES:
            continue
        name = _label(r["breaker"])
        state.add_metric([name], PHASE_VALUES[r["state"]])
        periods.add_metric([name], r["gen"])
        held.add_metric([name], 1 if r.get("why") else 0)
        if r.get("in_flight") is not None:
            in_flight.add_metric([name], r["in_flight"])
        if r.get("in_window") is not None:
            in_window.add_metric([name], r["in_window"])
        if r.get("waiting") is not None:
            waiting.add_metric([name], r["waiting"])
        if r["state"] == "open" and r["until"] is not None:
            probe_at.add_metric([name], r["until"])
    return [state, periods, probe_at, held, in_flight, in_window, waiting]


def registry(console: Console, counters: Counters) -> CollectorRegistry:
    """A prometheus_client registry with the console's collector."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(console, counters))
    return reg


class Collector:
    """Gauges from passive declares (cached :data:`OVERVIEW_CACHE` s), counters from the events."""

    def __init__(self, console: Console, counters: Counters) -> None:
        self.console, self.counters = console, counters
        self._cached: tuple[float, dict[str, Any] | None] | None = None
        self._lock = threading.Lock()

    def _report(self) -> dict[str, Any] | None:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < OVERVIEW_CACHE:
                return self._cached[1]
            report: dict[str, Any] | None
            try:
                report = self.console.overview()
            except Exception as exc:  # noqa: BLE001 - the scrape still answers: broker_up 0
                log.warning("rare-celery metrics: cannot read the queues: %s", exc)
                report = None
            self._cached = (time.monotonic(), report)
            return report

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        report = self._report()
        up = GaugeMetricFamily("rare_broker_up", "1 if the console could read the queues at this scrape")
        up.add_metric([], 1 if report is not None else 0)
        yield up
        receiving = GaugeMetricFamily("rare_events_receiver_up", "1 if the console is receiving Celery events")
        receiving.add_metric([], 1 if self.counters.connected else 0)
        yield receiving
        if report is not None:
            ready = GaugeMetricFamily("rare_work_queue_ready", "Messages ready in a rare work queue", labels=["queue"])
            consumers = GaugeMetricFamily("rare_work_queue_consumers", "Consumers of a rare work queue",
                                          labels=["queue"])
            exists = GaugeMetricFamily("rare_queue_exists", "1 if the queue exists", labels=["queue", "role"])
            bugs_ = GaugeMetricFamily("rare_bug_queue_messages", "Messages in a bug queue",
                                      labels=["queue", "work_queue"])
            waiting = GaugeMetricFamily("rare_delay_queue_messages", "Messages waiting in a delay queue",
                                        labels=["queue", "delay", "delay_seconds"])
            unrouted = GaugeMetricFamily("rare_unrouted_messages",
                                         "Due messages whose work queue was gone, in rare.unrouted")
            for w in report["work_queues"]:
                exists.add_metric([w["queue"], "work"], 1 if w["exists"] else 0)
                if w["exists"]:
                    ready.add_metric([w["queue"]], w["ready"])
                    consumers.add_metric([w["queue"]], w["consumers"])
                for b in w["bug_queues"]:
                    exists.add_metric([b["queue"], "bugs"], 1 if b["exists"] else 0)
                    bugs_.add_metric([b["queue"], w["queue"]], b["messages"] or 0)
            for d in report["delay_queues"]:
                exists.add_metric([d["queue"], "delay"], 1 if d["exists"] else 0)
                if d["exists"]:
                    waiting.add_metric([d["queue"], d["delay"], str(d["delay_ms"] / 1000)], d["messages"])
            unrouted.add_metric([], report["unrouted"]["messages"] or 0)
            yield from (ready, consumers, bugs_, waiting, unrouted, exists)
            if "breakers" in report:
                yield from breaker_gauges(report["breakers"])
        counts = self.counters.snapshot()
        for kind, (name, text, labels, _) in COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=list(labels))
            for values, n in sorted(counts[kind].items()):
                family.add_metric(list(values), n)
            yield family
        total = CounterMetricFamily("rare_events_received", "rare-* events received by this process")
        total.add_metric([], self.counters.received)
        yield total
