"""Delay routing: the grid of delay values, queue names and arguments, the declare error text."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest
from amqp.exceptions import PreconditionFailed
from kombu import Queue

from rare_celery import declare
from rare_celery import topology as t
from rare_celery.declare import explain
from rare_celery.exceptions import TopologyError


@pytest.mark.parametrize("ms, floor", [
    (1, 1), (99, 99), (100, 100), (1234, 1200), (5000, 5000), (59_999, 59_000), (105_000, 100_000),
    (3_600_000, 3_600_000), (14_400_000, 14_400_000), (259_200_000, 259_200_000), (7_327, 7_300),
    (t.MAX_DELAY_MS, 313_200_000_000),  # 87,000 h
])
def test_grid_floor_is_the_largest_grid_value_not_above(ms, floor):
    assert t.grid_floor(ms) == floor
    assert t.grid_floor(floor) == floor  # grid values are fixed points


def test_round_schedules_take_one_round_through_a_delay_queue():
    hour, day = 3_600_000, 86_400_000
    for ms in [250, 1000, 5000, 30_000, 60_000, 90_000, *(h * hour for h in (1, 2, 4, 8, 16, 32, 64)), 3 * day,
               7 * day, 30 * day]:
        assert t.grid_floor(ms) == ms, ms


def test_the_grid_is_bounded_and_never_above_the_delay():
    values = {t.grid_floor(ms) for ms in range(1, 2_000_000, 7)}
    assert all(v <= 2_000_000 for v in values)
    assert len(values) < t.GRID_SIZE


def test_the_whole_grid_has_grid_size_values():
    grid = t.grid_values()
    assert len(grid) == len(set(grid)) == t.GRID_SIZE
    assert grid[0] == 1 and grid[-1] <= t.MAX_DELAY_MS
    assert all(t.grid_floor(g) == g for g in grid)


@pytest.mark.parametrize("ms, label", [(250, "250ms"), (1000, "1s"), (1500, "1500ms"), (60_000, "1m"),
                                       (5_400_000, "90m"), (14_400_000, "4h"), (86_400_000, "1d"),
                                       (259_200_000, "3d")])
def test_delay_queue_names_read_as_durations(ms, label):
    assert t.delay_queue(ms).name == f"rare.wait.{label}"
    assert t.delay_queue(ms, t.QUORUM).name == f"rare.wait.quorum.{label}"


def test_delay_queue_arguments():
    classic = t.delay_queue(5000)
    assert classic.queue_arguments == {"x-queue-type": "classic", "x-message-ttl": 5000,
                                       "x-dead-letter-exchange": "rare.return"}
    assert classic.exchange.name == "rare.delay" and classic.routing_key == "amq.rare.wait.5s" and classic.durable
    quorum = t.delay_queue(5000, t.QUORUM).queue_arguments
    assert quorum["x-queue-type"] == "quorum" and quorum["x-overflow"] == "reject-publish"
    assert quorum["x-dead-letter-strategy"] == "at-least-once"


def test_explain_names_queue_argument_both_values_and_the_fix():
    exc = PreconditionFailed("Queue.declare: (406) PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for "
                             "queue 'rare.wait.5s' in vhost 'prod': received '5000' but current is '4000'")
    text = explain(exc)
    assert "'rare.wait.5s'" in text and "x-message-ttl='4000'" in text and "x-message-ttl='5000'" in text
    assert "rabbitmqctl delete_queue rare.wait.5s -p prod" in text
    assert "\n" not in text


@pytest.mark.parametrize("version, lazy", [("3.10.8", True), ("3.11.28", True), ("3.12.0", False),
                                           ("3.13.7", False), ("4.0.5", False), ("4.3.0", False), ("", False),
                                           ("garbage", False)])
def test_classic_delay_queues_are_lazy_before_3_12(version, lazy):
    """Before 3.12 a classic queue keeps its messages in RAM unless lazy; later versions page out anyway."""
    declared = t.for_broker(t.delay_queue(5000), version)
    wanted = {"x-queue-type": "classic", "x-message-ttl": 5000, "x-dead-letter-exchange": "rare.return"}
    assert declared.queue_arguments == ({**wanted, "x-queue-mode": "lazy"} if lazy else wanted)
    assert declared.name == "rare.wait.5s" and declared.routing_key == "amq.rare.wait.5s"
    assert declared.exchange.name == "rare.delay" and declared.durable and declared.rare_delay
    assert t.delay_queue(5000).queue_arguments == wanted  # the queue itself is left as it was


def test_only_classic_delay_queues_are_made_lazy():
    for queue in (t.delay_queue(5000, t.QUORUM), t.bug_queue("sms.bugs"), t.unrouted_queue(),
                  t.breaker_state_queue("deepl"), Queue("sms", queue_arguments={"x-queue-type": "classic"})):
        assert "x-queue-mode" not in (t.for_broker(queue, "3.10.8").queue_arguments or {})


def test_other_mode_switches_between_lazy_and_default():
    lazy = t.for_broker(t.delay_queue(5000), "3.10.8")
    default = t.other_mode(lazy)
    assert "x-queue-mode" not in default.queue_arguments and default.rare_delay
    assert t.other_mode(default).queue_arguments == lazy.queue_arguments


def _channels(version, refusal=None):
    main, probe = MagicMock(name="channel"), MagicMock(name="probe")
    main.connection.server_properties = {"version": version}
    main.connection.channel.return_value = probe
    for channel in (main, probe):
        channel.prepare_queue_arguments.side_effect = lambda args, **kw: args
    if refusal:
        probe.queue_declare.side_effect = PreconditionFailed(
            f"Queue.declare: (406) PRECONDITION_FAILED - inequivalent arg '{refusal}' for queue 'rare.wait.5s' in "
            f"vhost 'prod': received the value 'lazy' of type 'longstr' but current is none")
    return main, probe


def _declared_args(channel):
    return [c.kwargs["arguments"] for c in channel.queue_declare.call_args_list]


def test_a_delay_queue_is_declared_lazy_on_a_channel_of_its_own():
    main, probe = _channels("3.10.8")
    declare.declare_queue(main, t.delay_queue(5000))
    assert _declared_args(probe) == [{**t.delay_queue(5000).queue_arguments, "x-queue-mode": "lazy"}]
    assert not main.queue_declare.called and probe.close.called


def test_a_delay_queue_that_exists_in_the_other_mode_is_taken_as_it_is():
    """An existing rare.wait.5s made by an older rare_celery (no mode): declaring it lazy is refused (406,
    measured on 3.10.8), on the probe channel; it is then declared as it is, on the caller's channel."""
    main, probe = _channels("3.10.8", refusal="x-queue-mode")
    declare.declare_queue(main, t.delay_queue(5000))
    assert _declared_args(main) == [t.delay_queue(5000).queue_arguments] and probe.close.called
    main, probe = _channels("3.10.8", refusal="x-queue-mode")
    main.connection.client.declared_entities = set()
    declare.once(main, t.delay_queue(5000))  # the publish path, the same way
    assert _declared_args(main) == [t.delay_queue(5000).queue_arguments]
    main, probe = _channels("3.13.7", refusal="x-queue-mode")  # made lazy, the broker upgraded since
    declare.declare_queue(main, t.delay_queue(5000))
    assert _declared_args(main) == [{**t.delay_queue(5000).queue_arguments, "x-queue-mode": "lazy"}]


def test_another_mismatch_of_a_delay_queue_is_still_refused():
    main, _probe = _channels("3.10.8", refusal="x-message-ttl")
    with pytest.raises(TopologyError, match="x-message-ttl"):
        declare.declare_queue(main, t.delay_queue(5000))
    assert not main.queue_declare.called


def test_other_queues_are_declared_on_the_callers_channel():
    main, probe = _channels("3.10.8")
    declare.declare_queue(main, t.bug_queue("sms.bugs"))
    declare.declare_queue(main, t.delay_queue(5000, t.QUORUM))
    assert len(_declared_args(main)) == 2 and not probe.queue_declare.called


def test_a_copy_that_crosses_to_the_main_process_keeps_how_its_queues_are_declared():
    """A retry's copy is pickled from the pool process to the worker's main process (issue 28): its delay
    queue must still be declared lazy on RabbitMQ 3.10 (else the broker refuses the declaration of a queue
    that exists lazy), and a quorum bug queue still gets its delivery limit on 4.x."""
    import pickle

    from rare_celery.publish import to_delay
    from rare_celery.topology import bug_queue, for_broker

    copy = pickle.loads(pickle.dumps(to_delay("work", 5.0, "classic", b"{}", {}, {})))
    assert for_broker(copy.target, "3.10.8").queue_arguments["x-queue-mode"] == "lazy"
    bugs = pickle.loads(pickle.dumps(bug_queue("work.bugs", "quorum")))
    assert for_broker(bugs, "4.3.6").queue_arguments["x-delivery-limit"] == -1


def test_a_declaration_is_made_once_and_crosses_to_another_process_as_its_factorys_call():
    """A retry's delay queue is one kombu entity per grid value, not one per retry; pickled (a copy handed
    from a pool process to the worker's main process) it is rebuilt there from its factory, and equal to
    what kombu's own pickling would make."""
    import pickle

    for make, args in ((t.delay_queue, (5000, t.QUORUM)), (t.line_queue, ("sms", t.CLASSIC)),
                       (t.bug_queue, ("sms.bugs",)), (t.unrouted_queue, (t.QUORUM,))):
        queue = make(*args)
        assert make(*args) is queue
        again = pickle.loads(pickle.dumps(queue))
        assert again is queue  # found in the factory's cache, as it is in another process that made it before
        assert pickle.loads(pickle.dumps(queue, protocol=0)) == queue
        assert type(again) is type(queue) and again.queue_arguments == queue.queue_arguments
    assert t.delay_queue(5000) is not t.delay_queue(5000, t.QUORUM)
    assert t.delay_queue(5000).bind(MagicMock()) is not t.delay_queue(5000)  # binding binds a copy
