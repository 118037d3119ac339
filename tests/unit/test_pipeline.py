"""The main process's pipeline of handed endings: which answer of the broker settles which copy
(:mod:`rare_celery.pipeline`). The publishing itself is tested on the real broker
(tests/integration/test_confirms.py, test_faults.py, test_endings.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from rare_celery import pipeline
from rare_celery.pipeline import Pipeline, _Sent
from rare_celery.publish import to_delay


class Hub:
    def __init__(self) -> None:
        self.later: list[tuple[float, object, tuple]] = []
        self.soon: list[object] = []

    def call_soon(self, fn, *args):
        self.soon.append(fn)

    def call_later(self, seconds, fn, *args):
        self.later.append((seconds, fn, args))


def waiting(p: Pipeline, n: int) -> list[list[str]]:
    """``n`` copies published (as far as the pipeline knows): each one's outcomes."""
    outcomes: list[list[str]] = []
    for i in range(n):
        said: list[str] = []
        copy = to_delay("work", 1.0, "classic", b"{}", {"x-rare-copy": f"copy-{i}"}, {})
        sent = _Sent(copy, lambda said=said: said.append("done"), lambda why, said=said: said.append(f"failed: {why}"),
                     who=f"task[{i}]", held=lambda: True)
        p._seq += 1
        p._pending[p._seq] = sent
        p._copies[f"copy-{i}"] = p._seq
        outcomes.append(said)
    return outcomes


def test_a_confirm_settles_its_copy_and_a_multiple_one_every_copy_up_to_it():
    p = Pipeline(SimpleNamespace(), Hub())
    out = waiting(p, 4)
    p._acked(2)
    assert out == [[], ["done"], [], []]
    p._acked(3, multiple=True)
    assert out == [["done"], ["done"], ["done"], []]
    p._acked(3)  # again: nothing waits under that number
    assert out[2] == ["done"] and p.waiting == 1


def test_a_nack_is_published_again_later_never_settled_at_once():
    hub = Hub()
    p = Pipeline(SimpleNamespace(), hub)
    out = waiting(p, 1)
    p._nacked(1)
    assert out == [[]] and p.waiting == 0
    assert [s for s, _, _ in hub.later] == [pipeline.FIRST_PAUSE]  # tried again in 1 s, the original kept


def test_a_nack_after_the_patience_fails_its_copy(monkeypatch):
    p = Pipeline(SimpleNamespace(), Hub())
    out = waiting(p, 1)
    p._pending[1].first = time.monotonic() - pipeline.PATIENCE
    p._nacked(1)
    assert len(out[0]) == 1 and out[0][0].startswith("failed: the broker refused (nacked)")


def test_a_returned_copy_is_published_again_once_then_fails():
    hub = Hub()
    p = Pipeline(SimpleNamespace(), hub)
    out = waiting(p, 2)
    p._returned(None, "rare.delay", "work", SimpleNamespace(headers={"x-rare-copy": "copy-1"}))
    p._acked(2)
    assert out == [[], []] and len(hub.soon) == 1  # declared and published again from the loop, not acked
    p._acked(1)
    assert out[0] == ["done"]
    sent = _Sent(to_delay("work", 1.0, "classic", b"{}", {"x-rare-copy": "again"}, {}), lambda: out[1].append("done"),
                 lambda why: out[1].append(f"failed: {why}"), who="task[1]", held=lambda: True, tries=2)  # 2nd try
    p._pending[7], p._copies["again"] = sent, 7
    p._returned(None, "rare.delay", "work", SimpleNamespace(headers={"x-rare-copy": "again"}))
    p._acked(7)
    assert len(out[1]) == 1 and out[1][0].startswith("failed: no queue took the copy")


def test_a_return_of_no_waiting_copy_fails_every_waiting_copy():
    """Its ack would be taken for another copy's: nothing is acked on a confirm that may not be its own."""
    p = Pipeline(SimpleNamespace(), Hub())
    out = waiting(p, 2)
    p._returned(None, "rare.delay", "work", SimpleNamespace(headers={"x-rare-copy": "someone-else"}))
    assert all(len(o) == 1 and o[0].startswith("failed:") for o in out) and p.waiting == 0


def test_a_refused_copy_whose_original_went_back_is_not_published_again():
    """The consumer's connection was lost while the broker refused the copy: the original is redelivered
    (its next delivery ends it); publishing the copy too would run the next attempt twice."""
    for held, expected in ((True, 1), (False, 0)):
        hub = Hub()
        p = Pipeline(SimpleNamespace(), hub)
        out = waiting(p, 1)
        p._pending[1].held = lambda held=held: held
        published: list[object] = []
        p._publish = published.append  # type: ignore[method-assign]
        p._nacked(1)
        ((_, again, args),) = hub.later
        again(*args)
        assert len(published) == expected and out == [[]]  # neither done nor failed (no put-back copy either)


class Wire:
    """A pipeline whose connections are lists of the copies written on each (no broker)."""

    def __init__(self, monkeypatch) -> None:
        self.hub = Hub()
        self.p = p = Pipeline(SimpleNamespace(), self.hub)
        self.connections: list[list[str]] = []
        monkeypatch.setattr(p, "_readable", lambda: None)
        monkeypatch.setattr(p, "_drop", lambda: setattr(p, "_channel", None))
        monkeypatch.setattr(pipeline, "prepare", lambda channel, copy: None)
        monkeypatch.setattr(p, "_ready", self._ready)
        monkeypatch.setattr(pipeline, "write", lambda channel, copy: channel.written.append(copy.headers["x-rare-copy"]))

    def _ready(self):
        if self.p._channel is None:
            self.connections.append([])
            self.p._seq = 0  # delivery tags count from 1 on each channel
            self.p._channel = SimpleNamespace(connection=SimpleNamespace(), written=self.connections[-1])
        return self.p._channel

    def send(self, name: str) -> list[str]:
        said: list[str] = []
        self.p.send(to_delay("work", 1.0, "classic", b"{}", {"x-rare-copy": name}, {}), lambda: said.append("done"),
                    lambda why: said.append(f"failed: {why}"), who=name)
        return said


def test_after_a_nack_the_next_copies_go_out_on_a_new_connection_once_the_written_ones_are_settled(monkeypatch):
    """A channel a full quorum queue blocked stays blocked on RabbitMQ 3.10 (the broker refuses its
    publishes itself until the queue says go, which it never says once the limit's policy is removed):
    the try after a nack, and every copy after it, go out on a new connection. Copies already written
    on the old one are settled there first (their confirms come on it)."""
    w = Wire(monkeypatch)
    p, hub, connections, send = w.p, w.hub, w.connections, w.send
    a, b = send("a"), send("b")
    assert connections == [["a", "b"]]
    p._nacked(1)  # a refused: tried again in 1 s; b still waits for its confirm on this connection
    c = send("c")
    ((_, again, args),) = hub.later
    again(*args)  # a's next try
    assert connections == [["a", "b"]] and p.waiting == 3  # c and a wait, unwritten, for b's confirm
    p._acked(2)
    assert b == ["done"] and len(hub.soon) == 1
    hub.soon.pop()()
    assert connections == [["a", "b"], ["c", "a"]]  # on a new connection
    p._acked(1)
    p._acked(2)
    assert (a, c) == (["done"], ["done"]) and p.waiting == 0
    d = send("d")
    assert connections[-1] == ["c", "a", "d"] and d == []  # no nack since: the same connection


def test_copies_held_for_the_renewal_go_out_even_when_a_newer_copy_renewed_first(monkeypatch):
    """Between the last confirm on the old connection and the held copies' turn, a new copy may come
    and open the new connection: the held ones follow it there, not left waiting for a quiet moment."""
    w = Wire(monkeypatch)
    p, hub, connections, send = w.p, w.hub, w.connections, w.send
    send("a"), send("b")
    p._nacked(1)
    send("c")  # held
    send("gone")  # held too; then its original goes back to its queue (the consumer's connection lost)
    p._held[-1].held = lambda: False
    p._acked(2)  # b settled: the held copies' turn is scheduled
    send("d")  # comes first: renews, written on the new connection
    assert connections == [["a", "b"], ["d"]]
    hub.soon.pop()()
    assert connections == [["a", "b"], ["d", "c"]] and p.waiting == 2  # a is still in its 1 s pause; "gone" dropped
