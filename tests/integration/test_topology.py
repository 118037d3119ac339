"""The broker objects rare_celery declares, on the real broker: every due message routed once, and
every queue of rare_celery's own with an explicit type, whatever the vhost's default queue type."""

from __future__ import annotations

import contextlib

import pytest
from celery import Celery
from kombu import Connection, Queue

from rare_celery.declare import broker_type, declare_worker_topology, learn_types
from rare_celery.publish import send, to_delay
from rare_celery.topology import CLASSIC, QUORUM, UNROUTED_QUEUE, bug_queue, lazy_first
from tests.support import HOST, QUORUM_OK, Vhost, Worker, broker_cycle_lines, rabbitmqctl, wait_for

PROPS = {"content_type": "application/json", "content_encoding": "utf-8"}


@pytest.fixture(scope="module")
def quorum_vhost():
    """A vhost whose default queue type is quorum (``rabbitmqctl add_vhost --default-queue-type``)."""
    v = Vhost()
    v.delete()
    rabbitmqctl("add_vhost", v.name, "--default-queue-type", "quorum")
    rabbitmqctl("set_permissions", "-p", v.name, "guest", ".*", ".*", ".*")
    yield v
    v.delete()


def types(vhost) -> dict[str, str]:
    out = rabbitmqctl("list_queues", "-p", vhost.name, "--no-table-headers", "name", "type")
    return dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)


@pytest.mark.parametrize("kind", [CLASSIC, QUORUM])
def test_a_due_message_is_routed_once_and_the_broker_drops_no_cycle(vhost, kind):
    work = f"topology.once.{kind}"
    cycles = broker_cycle_lines()
    with Connection(vhost.url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.default_channel
        Queue(work, durable=True, queue_arguments={"x-queue-type": kind}).bind(channel).declare()
        copies = [to_delay(work, 0.3, kind, f'{{"n": {n}}}', {}, PROPS) for n in range(5)]
        for copy in copies:
            send(conn.Producer(channel), copy)
        delay = copies[0].target.name
        wait_for(lambda: vhost.queue_stats().get(work, {}).get("ready") == 5, 30, 0.1, "five due messages")
        stats = vhost.queue_stats()
        assert stats[delay]["ready"] + stats[delay]["unacked"] == 0  # nothing went back into the delay queue
        assert stats[UNROUTED_QUEUE.name]["ready"] == 0
        got = []
        while (message := channel.basic_get(work, no_ack=True)) is not None:
            assert message.properties.get("expiration") is None  # it waited with one; it never expires here
            got.append(message.body)
    assert sorted(got) == sorted(c.body for c in copies)  # each exactly once
    assert broker_cycle_lines() == cycles  # and the broker dropped no second copy as a cycle


# rabbitmqctl eval: tell a quorum queue's state its configuration without x-message-ttl (the queue's own
# record keeps it): the state RabbitMQ 3.10 to 4.0 start every new quorum queue in, until the client
# that creates it sets the configuration a moment later (rabbit_quorum_queue:start_cluster)
_FORGET_TTL = (
    '{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"%(vhost)s">>, queue, <<"%(queue)s">>)), '
    'rabbit_quorum_queue:policy_changed('
    'amqqueue:set_arguments(Q, lists:keydelete(<<"x-message-ttl">>, 1, amqqueue:get_arguments(Q)))).')


def test_retries_that_reach_a_quorum_delay_queue_before_it_knows_its_ttl_come_back(vhost):
    """A quorum queue is routable before it knows its TTL (a moment; another client's declare of it
    returns at once, so a second worker retrying into a new delay queue can publish in that moment).
    A message enqueued then got no expiry, and as a quorum queue expires from its head only, it kept
    every later retry behind it for good (509 retries in rare.wait.quorum.500ms in a cluster run).
    A copy for a delay queue carries the queue's TTL as its ``expiration`` too."""
    work = "topology.ttl.work"
    with Connection(vhost.url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.default_channel
        Queue(work, durable=True).bind(channel).declare()
        copies = [to_delay(work, 0.37, QUORUM, f'{{"n": {n}}}', {}, PROPS) for n in range(6)]
        delay = copies[0].target.name
        send(conn.Producer(channel), copies[0])  # the delay queue exists
        try:
            rabbitmqctl("eval", _FORGET_TTL % {"vhost": vhost.name, "queue": delay})
            for copy in copies[1:]:
                send(conn.Producer(channel), copy)
            wait_for(lambda: vhost.queue_stats().get(work, {}).get("ready") == 6, 30, 0.1,
                     f"six due messages through {delay}")
            got = []
            while (message := channel.basic_get(work, no_ack=True)) is not None:
                got.append(message)
        finally:
            channel.queue_delete(delay)  # no later test meets a delay queue in that state
    assert sorted(m.body for m in got) == sorted(c.body for c in copies)
    assert all(m.properties.get("expiration") is None for m in got)  # dead-lettering removed it


def test_rare_queues_stay_classic_on_a_quorum_default_vhost(quorum_vhost):
    url = f"amqp://guest:guest@{HOST}/{quorum_vhost.name}"
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.default_channel
        work = Queue("topology.work", durable=True)  # untyped: the vhost makes it quorum
        work.bind(channel).declare()
        declare_worker_topology(conn, ["topology.work"], ["topology.work.bugs"])
        send(conn.Producer(channel), to_delay("topology.work", 1, CLASSIC, "{}", {}, PROPS))
        assert broker_type(conn, Queue("topology.work", durable=True)) == QUORUM
        assert learn_types(conn, [work]) == ["topology.work"]
        assert work.queue_arguments == {"x-queue-type": QUORUM}  # Celery then consumes it without global QoS
        assert broker_type(conn, bug_queue("topology.work.bugs")) == CLASSIC
    found = types(quorum_vhost)
    assert found["topology.work"] == QUORUM
    assert found["topology.work.bugs"] == CLASSIC
    assert found[UNROUTED_QUEUE.name] == CLASSIC
    assert found["rare.wait.1s"] == CLASSIC


def test_an_untyped_classic_queue_is_found_classic(vhost):
    with Connection(vhost.url) as conn:
        Queue("topology.plain", durable=True).bind(conn.default_channel).declare()
        assert broker_type(conn, Queue("topology.plain", durable=True)) == CLASSIC
        assert broker_type(conn, Queue("topology.plain", durable=True, queue_arguments={"x-max-priority": 5})) is None


def test_quorum_delay_queues_for_a_classic_work_queue(tmp_path):
    """``rare_queue_type = "quorum"`` (the choice for clusters): a classic work queue's retries wait
    in quorum delay queues and come back; its bug queue and ``rare.unrouted`` are quorum too."""
    v = Vhost()
    env = {"RARE_TEST_BROKER": v.url, "RARE_TEST_DIR": str(tmp_path), "RARE_TEST_QUORUM_DELAYS": "1"}
    worker = Worker("tests.apps.core", ["core"], env, tmp_path, name="quorum-delays").wait_ready()
    try:
        client = Celery("client", broker=v.url, backend=f"tests.support:AtomicFS+file://{tmp_path}/results",
                        set_as_current=False)
        result = client.send_task("core.flaky", args=[1], queue="core")
        assert result.get(timeout=30) == ["ok", 2]
        found = types(v)
        assert found["core"] == CLASSIC and found["rare.wait.quorum.1s"] == QUORUM
        assert "rare.wait.1s" not in found
        assert found["core.bugs"] == QUORUM and found[UNROUTED_QUEUE.name] == QUORUM
        bad = client.send_task("core.buggy", args=["+1"], queue="core")
        with pytest.raises(Exception, match="invalid phone number"):
            bad.get(timeout=30)
        wait_for(lambda: v.queue_stats().get("core.bugs", {}).get("ready") == 1, 30, 0.1, "the bug-queue copy")
        with Connection(v.url) as conn:  # read by people 25 times (RabbitMQ 4.x's default limit: 20)
            channel = conn.channel()
            for _ in range(25):
                message = wait_for(lambda: channel.basic_get("core.bugs"), 10, 0.01, "the bug-queue copy again")
                channel.basic_reject(message.delivery_tag, requeue=True)
        assert v.queue_stats()["core.bugs"]["ready"] == 1
    finally:
        worker.stop()
        v.delete()


@pytest.mark.skipif(QUORUM_OK, reason="Celery 5.5+ consumes quorum queues without global QoS")
def test_celery_54_on_a_quorum_work_queue_stops_at_start_with_one_line(quorum_vhost, tmp_path):
    env = {"RARE_TEST_BROKER": f"amqp://guest:guest@{HOST}/{quorum_vhost.name}", "RARE_TEST_DIR": str(tmp_path)}
    worker = Worker("tests.apps.core", ["core"], env, tmp_path, name="quorum-54")
    try:
        code = worker.proc.wait(60)
    finally:
        worker.stop()
    text = worker.text()
    assert code != 0 and "core is a quorum queue (declared so, or the vhost's default queue type)" in text
    assert "Traceback" not in text


def lazy_mode(vhost, name: str) -> bool:
    out = rabbitmqctl("list_queues", "-p", vhost.name, "--no-table-headers", "name", "arguments")
    return any(line.startswith(name + "\t") and "lazy" in line for line in out.splitlines())


@pytest.mark.parametrize("existing", [None, {}, {"x-queue-mode": "lazy"}])
def test_retries_wait_in_a_lazy_queue_before_3_12_and_an_existing_one_is_taken_as_it_is(vhost, existing):
    """Issue 28: a classic delay queue keeps its messages on disk (lazy) on RabbitMQ 3.10/3.11. One that an
    older rare_celery made (no mode), or made lazy before the broker was upgraded, is used as it is: the
    broker would refuse (406) a declaration with the other mode, and a retry must never fail for that."""
    work = f"topology.lazy.{len(str(existing))}"
    with Connection(vhost.url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.default_channel
        version = conn.connection.server_properties["version"]
        Queue(work, durable=True, queue_arguments={"x-queue-type": CLASSIC}).bind(channel).declare()
        copy = to_delay(work, 0.3 + 0.1 * len(str(existing)), CLASSIC, '{"n": 1}', {}, PROPS)
        name = copy.target.name
        with contextlib.suppress(RuntimeError):  # from an earlier run of the test
            rabbitmqctl("delete_queue", "-p", vhost.name, name)
        if existing is not None:  # as an older rare_celery (or another broker version) made it
            args = {**copy.target.queue_arguments, **existing}
            Queue(name, durable=True, queue_arguments=args).bind(channel).declare()
        send(conn.Producer(channel), copy)
        wait_for(lambda: vhost.queue_stats().get(work, {}).get("ready") == 1, 30, 0.1, "the due message")
        assert channel.basic_get(work, no_ack=True).body == copy.body
    lazy = lazy_first(version) if existing is None else bool(existing)
    assert lazy_mode(vhost, name) == lazy
