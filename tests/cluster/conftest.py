"""Fixtures for tests against the three-node RabbitMQ cluster of scripts/cluster (``RARE_CLUSTER_VERSION``:
4.3, the default, rabbit43-a/b/c on 127.0.0.1:5693-5695; 3.10, rabbit-a/b/c on 127.0.0.1:5673-5675): the
cluster, a vhost on it, the test app tests/apps/cluster.py.

Skipped, with the reason, when none of the three nodes listens (the default ``pytest`` and ``make test``
runs), or on Celery < 5.5 (quorum queues); with ``RARE_REQUIRE_CLUSTER=1`` (``make test-cluster``) those
are failures instead. A test run holds a lock file beside the nodes' state while it uses the cluster:
the test stops and starts nodes, so two runs must not share it at once.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from rare_celery.topology import is_delay_queue
from tests.support import QUORUM_OK, ROOT, app_module, restore_env

SCRIPT = ROOT / "scripts" / "cluster"
VERSION = os.environ.get("RARE_CLUSTER_VERSION", "4.3")  # as scripts/cluster reads it
if VERSION == "3.10":
    STATE = Path(os.environ.get("RARE_CLUSTER_ROOT", "/var/lib/rare-celery/cluster"))
    PREFIX, BASE_PORT = "rabbit-", 5673
else:
    STATE = Path(os.environ.get("RARE_RABBITMQ43_ROOT", "/var/lib/rare-celery/rabbitmq43") + "/var/lib/rare-celery-cluster")
    PREFIX, BASE_PORT = "rabbit43-", 5693
NODES = ("a", "b", "c")
PORTS = {"a": BASE_PORT, "b": BASE_PORT + 1, "c": BASE_PORT + 2}
LOCK_WAIT = 1200  # seconds another run may hold the cluster before this one gives up
REPORT: list[str] = []  # report lines, printed at the end of the run (pytest_terminal_summary)


def node_name(node: str) -> str:
    return f"{PREFIX}{node}@localhost"


def node_of(erlang_name: str) -> str | None:
    """``rabbit43-b@localhost`` (or a pid ``<rabbit43-b@localhost.1.2.3>``) -> ``b``."""
    for node in NODES:
        if node_name(node) in erlang_name:
            return node
    return None


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def script(*args: str, timeout: float = 300) -> str:
    """``scripts/cluster ARGS``; its output, or RuntimeError with it."""
    out = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode:
        raise RuntimeError(f"scripts/cluster {' '.join(args)} exited {out.returncode}: "
                           f"{(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


# rabbitmqctl eval: move a quorum queue's leader to another running member (RabbitMQ 3.10 has no CLI for it)
_MOVE_LEADER = (
    '{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"%(vhost)s">>, queue, <<"%(queue)s">>)), '
    '{_, Leader} = amqqueue:get_pid(Q), '
    '[To | _] = [N || N <- rabbit_quorum_queue:get_replicas(Q), N =/= Leader, lists:member(N, [%(live)s])], '
    'rabbit_quorum_queue:transfer_leadership(Q, To).')


# rabbitmqctl eval: what a quorum queue's leader holds (rabbit_fifo:overview/1), the header of its first
# message (its expiry), the timers the leader's process has set, and the time now: why it keeps due messages
_FIFO_STATE = (
    '{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"%(vhost)s">>, queue, <<"%(queue)s">>)), '
    'L = amqqueue:get_pid(Q), '
    'Get = fun(F) -> case ra:local_query(L, F) of {ok, {_, X}, _} -> X; Other -> Other end end, '
    'St = lists:flatten(io_lib:format("~0p", [sys:get_status(L)])), '
    'T = case string:find(St, "Time-outs") of nomatch -> none; R -> string:slice(R, 0, 300) end, '
    '{L, Get(fun rabbit_fifo:overview/1), Get(fun(S) -> rabbit_fifo:query_peek(1, S) end), T, '
    'erlang:system_time(millisecond)}.')


class Cluster:
    """The three nodes, as the tests use them: rabbitmqctl on a running node, one node stopped and
    started again, failover URLs that start at a running node."""

    def __init__(self) -> None:
        self.down: set[str] = set()

    def up(self) -> list[str]:
        return [n for n in NODES if n not in self.down]

    def ctl(self, *args: str, node: str | None = None, timeout: float = 120) -> str:
        """``rabbitmqctl -q ARGS`` on ``node`` (default: the first running one)."""
        return script("ctl", node or self.up()[0], "-q", *args, timeout=timeout)

    def url(self, vhost: str, first: int = 0) -> str:
        """The failover URL of all three nodes, the running ones first, rotated by ``first``."""
        live = self.up()
        live = live[first % len(live):] + live[: first % len(live)]
        return ";".join(f"amqp://guest:guest@127.0.0.1:{PORTS[n]}/{vhost}" for n in live + sorted(self.down))

    def stop_node(self, node: str) -> float:
        """Stop ``node`` (waits until its process is gone); how long that took."""
        start = time.monotonic()
        self.down.add(node)
        script("stop-node", node)
        return time.monotonic() - start

    def start_node(self, node: str) -> float:
        start = time.monotonic()
        script("start-node", node)
        self.down.discard(node)
        return time.monotonic() - start

    def placement(self, vhost: str) -> dict[str, str]:
        """Queue -> the node that holds it: a quorum queue's leader, a classic queue's home node."""
        out = self.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "type", "leader", "pid")
        found = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                name, kind, leader, pid = parts
                found[name] = node_of(leader if kind == "quorum" else pid) or "?"
        return found

    def overdue(self, vhost: str) -> dict[str, tuple[int, int]]:
        """Quorum queue -> (ready, held) when a stalled run left due messages in it: ``ready`` counts the
        messages of a delay queue (``rare.wait.*``; in a stalled run every one of them is past its TTL,
        which is at most a few seconds here) that the queue has not expired; ``held`` those of any quorum
        queue that are neither ready nor unacked, due messages its at-least-once dead-letter worker has
        not forwarded yet (a passive declare or a consumer never sees them). list_queues figures lag up
        to 5 s. See docs/operations.md, "Due retries held by the broker"."""
        out = self.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "type", "messages",
                       "messages_ready", "messages_unacknowledged")
        found = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 5 and parts[1] == "quorum" and all(p.isdigit() for p in parts[2:]):
                total, ready, unacked = map(int, parts[2:])
                held = max(total - ready - unacked, 0)
                ready = ready if is_delay_queue(parts[0]) else 0
                if ready or held:
                    found[parts[0]] = (ready, held)
        return found

    def move_leader(self, vhost: str, queue: str) -> str:
        """Move a quorum queue's leader to another running member (what docs/operations.md tells an
        operator to do when its dead-letter worker holds due messages): the new leader starts a new
        worker, which forwards them. The answer, ``{migrated,'rabbit-c@localhost'}`` when it moved."""
        live = ",".join(f"'{node_name(n)}'" for n in self.up())
        return self.ctl("eval", _MOVE_LEADER % {"vhost": vhost, "queue": queue, "live": live}).strip()

    def fifo_state(self, vhost: str, queue: str) -> str:
        """What the leader of quorum queue ``queue`` holds, its first message's header, its timers and
        the time (``_FIFO_STATE``), as rabbitmqctl prints it; the error, if that fails."""
        try:
            return " ".join(self.ctl("eval", _FIFO_STATE % {"vhost": vhost, "queue": queue}).split())[:3000]
        except RuntimeError as exc:
            return f"(not read: {exc})"[:1000]

    def leader(self, vhost: str, queue: str) -> str:
        node = self.placement(vhost).get(queue)
        assert node in NODES, f"no leader found for {queue} in {vhost}"
        return node


class ClusterVhost:
    """A fresh vhost on the cluster, shaped like tests.support.Vhost (``name``, ``url``, ``queue_stats``,
    ``delete``) so that tests.support.Workload can use it; its URL starts at a running node."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.name = f"rare-cluster-{uuid.uuid4().hex[:8]}"
        cluster.ctl("add_vhost", self.name, node="a")
        cluster.ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*", node="a")

    @property
    def url(self) -> str:
        return self.cluster.url(self.name)

    def queue_stats(self) -> dict[str, dict[str, int]]:
        out = self.cluster.ctl("list_queues", "-p", self.name, "--no-table-headers", "name", "messages_ready",
                               "messages_unacknowledged", "consumers")
        stats = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[1].isdigit():
                stats[parts[0]] = {"ready": int(parts[1]), "unacked": int(parts[2]), "consumers": int(parts[3])}
        return stats

    def delete(self) -> None:
        self.cluster.ctl("delete_vhost", self.name)


def _unavailable(reason: str):
    if os.environ.get("RARE_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"RARE_REQUIRE_CLUSTER=1, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    """The running cluster, all three nodes up, held for this run alone (a lock file)."""
    if not QUORUM_OK:
        _unavailable("the cluster tests use quorum queues, which Celery < 5.5 cannot consume")
    if not any(listening(p) for p in PORTS.values()):
        _unavailable(f"the three-node RabbitMQ {VERSION} cluster is not running (nothing on 127.0.0.1:"
                     f"{PORTS['a']}-{PORTS['c']}): "
                     "`scripts/cluster start`, or `make test-cluster`")
    if os.geteuid() != 0:
        _unavailable("scripts/cluster needs root (rabbitmqctl and rabbitmq-server switch to the rabbitmq user)")
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / "test.lock").open("w") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test run held the cluster for {LOCK_WAIT}s ({STATE / 'test.lock'})")
                time.sleep(1)
        if not all(listening(p) for p in PORTS.values()):  # a node left stopped: start it again (idempotent)
            script("start")
        yield Cluster()


@pytest.fixture(scope="module")
def cvhost(cluster):
    v = ClusterVhost(cluster)
    yield v
    for node in sorted(cluster.down):  # never leave a node stopped (a failed test may have)
        cluster.start_node(node)
    v.delete()


@pytest.fixture(scope="module")
def cdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cenv(cluster, cvhost, cdir):
    return {"RARE_CLUSTER_BROKER": cluster.url(cvhost.name), "RARE_CLUSTER_DIR": str(cdir)}


@pytest.fixture(scope="module")
def capp(cenv):
    """The test process's copy of tests.apps.cluster (to publish), pointed at this module's vhost."""
    module, saved = app_module("tests.apps.cluster", cenv)
    assert module.BROKER == cenv["RARE_CLUSTER_BROKER"]
    yield module
    restore_env(saved)


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("cluster report")
        for line in REPORT:
            terminalreporter.write_line(line)
