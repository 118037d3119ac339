"""rare_celery.tools.moves: the pace of a requeue (a fake clock: what is tested is the spacing, not the speed)."""

from __future__ import annotations

import pytest

from rare_celery.tools import moves


@pytest.mark.parametrize(("text", "per_second"), [("50/s", 50.0), ("100/m", 100 / 60), (" 1000 / h ", 1000 / 3600),
                                                   ("0.5/s", 0.5)])
def test_a_rate_reads_per_second_and_back(text, per_second):
    assert moves.Pace.parse(text) == pytest.approx(per_second)
    assert moves.Pace.parse(moves.rate_text(per_second)) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["", "50", "50/d", "-5/s", "0/s", "fast", "0.5/h", "1e3/s"])
def test_a_rate_that_is_not_one_says_so(text):
    with pytest.raises(ValueError, match="like 50/s|slower than"):
        moves.Pace.parse(text)


class Clock:
    def __init__(self) -> None:
        self.now, self.heartbeats = 0.0, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def heartbeat_check(self) -> None:
        self.heartbeats += 1


def test_moves_are_evened_out_at_the_rate_and_a_slow_one_earns_no_burst(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(moves.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(moves.time, "sleep", clock.sleep)
    pace = moves.Pace(4.0)
    times = []
    for _ in range(8):
        pace()  # after each move
        times.append(clock.now)
    assert times == pytest.approx([0.25 * n for n in range(1, 9)])  # 4 a second, evenly
    clock.now += 10  # one move took 10 s (a slow broker)
    pace()
    start = clock.now
    pace()
    assert clock.now - start == pytest.approx(0.25)  # the next waits its gap: no catching up at once


def test_a_slow_pace_keeps_the_connection_alive(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(moves.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(moves.time, "sleep", clock.sleep)
    pace = moves.Pace(1 / 60, clock)  # one a minute: longer than the broker's heartbeat interval
    pace()
    assert clock.now == pytest.approx(60) and clock.heartbeats >= 10
