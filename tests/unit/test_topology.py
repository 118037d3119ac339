"""Delay routing: the grid of delay values, queue names and arguments, the declare error text."""

from __future__ import annotations

import pytest
from amqp.exceptions import PreconditionFailed

from rare_celery import topology as t
from rare_celery.declare import explain


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
