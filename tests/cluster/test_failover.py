"""Failover broker URLs (one address per cluster node) in rare_celery's own publishing, without stopping a
node: the address of a stopped node is a port nothing listens on."""

from __future__ import annotations

import socket

from kombu import Connection

from rare_celery import context, publish
from rare_celery.exceptions import PublishRefused
from tests.cluster.conftest import PORTS


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_main_process_publishes_again_after_a_renewal_that_failed_over_to_a_stopped_node(cvhost):
    """A nacked publish makes kombu renew the connection (py-amqp files MessageNacked under connection
    errors) and switch to the next address; when that one is down, Connection.ensure gives up with the
    connection collected and the producer not revived. The worker main process's producer (put-backs,
    lost attempts, early arrivals, bad-message copies) then failed every later publish with
    "AttributeError: 'NoneType' object has no attribute 'client'" until the worker restarted: seen in
    the cluster run as messages kept unacked for ever after the node stop."""
    from celery import Celery

    up = f"amqp://guest:guest@127.0.0.1:{PORTS['a']}/{cvhost.name}"
    down = f"amqp://guest:guest@127.0.0.1:{closed_port()}/{cvhost.name}"
    with Connection(up) as conn:
        channel = conn.channel()
        channel.queue_declare("refuses", durable=True, auto_delete=False,
                              arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        channel.queue_declare("takes", durable=True, auto_delete=False)
    app = Celery("failover", broker=f"{up};{down}", set_as_current=False)
    app.conf.broker_transport_options = {"confirm_publish": True}
    props = {"content_type": "text/plain", "content_encoding": "utf-8"}
    ctx = context.start(app)  # this process plays the worker's main process
    outcomes = []
    try:
        for queue in ("takes", "refuses", "takes", "takes"):
            try:
                publish.send_patiently(app, publish.Copy(b"x", {}, props, "", queue, None), budget=0, timeout=5)
                outcomes.append("confirmed")
            except PublishRefused as exc:
                outcomes.append(str(exc))
    finally:
        context.stop(app)
        if ctx.producer is not None:
            ctx.producer.connection.release()
    assert outcomes[0] == "confirmed" and outcomes[2:] == ["confirmed", "confirmed"], outcomes
    assert "refused" in outcomes[1] or "failed" in outcomes[1], outcomes
    with Connection(up) as conn:
        assert conn.channel().queue_declare("takes", passive=True).message_count == 3
