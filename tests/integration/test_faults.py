"""Nothing lost: crashes, restarts, refused publishes, bad input and configuration mistakes, on the real
broker with real ``celery worker`` processes running tests/apps/faults.py (results: docs/faults.md).

The module has its own vhost and a fleet of two workers (``-c 1`` each) consuming the classic and the
quorum queues of the faults app; tests that kill workers replace them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import celery
import pytest
from kombu import Connection, Queue

from rare_celery.topology import (
    CLASSIC,
    DELAY_EXCHANGE,
    QUORUM,
    RETURN_EXCHANGE,
    bug_queue,
    delay_queue,
    is_delay_queue,
    queue_kind,
)
from tests.support import (
    CELERY,
    HOST,
    KINDS,
    QUORUM_OK,
    ROOT,
    Records,
    Vhost,
    Worker,
    Workload,
    app_module,
    close_connections,
    drain,
    rabbitmqctl,
    ready_counts,
    restart_broker_app,
    restore_env,
    wait_for,
)

# -- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker():
    v = Vhost()
    yield v
    v.delete()


@pytest.fixture(scope="module")
def fdir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def fenv(broker, fdir):
    return {"RARE_FAULTS_BROKER": broker.url, "RARE_FAULTS_DIR": str(fdir)}


@pytest.fixture(scope="module")
def faults(fenv):
    """The test process's copy of tests.apps.faults (to publish), pointed at this module's vhost."""
    module, saved = app_module("tests.apps.faults", fenv)
    assert module.app.conf.broker_url == fenv["RARE_FAULTS_BROKER"]
    yield module
    restore_env(saved)


class Fleet:
    """The module's workers: each consumes every faults queue; a test may kill them and start new ones."""

    def __init__(self, env: dict, workdir: Path, size: int = 2) -> None:
        self.env, self.workdir, self.size = env, workdir, size
        from tests.apps.faults import queues_of

        self.queues = [q for kind in KINDS for q in queues_of(kind)]
        self.workers: list[Worker] = []
        self.fill()

    def fill(self) -> None:
        """Start workers until there are ``size`` running."""
        self.workers = [w for w in self.workers if w.proc.poll() is None]
        new = [Worker("tests.apps.faults", self.queues, self.env, self.workdir, name=f"fleet{len(self.workers) + i}",
                      concurrency=1) for i in range(self.size - len(self.workers))]
        for w in new:
            w.wait_ready()
        self.workers += new

    def of(self, pid: int) -> Worker:
        """The worker that pool process (or main process) ``pid`` belongs to."""
        group = os.getpgid(pid)
        return next(w for w in self.workers if w.proc.pid == group)

    def kill(self, worker: Worker) -> None:
        """SIGKILL every process of ``worker`` (main process and pool) at once."""
        try:
            os.killpg(worker.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # killed already
            pass
        worker.proc.wait(10)

    def text(self) -> str:
        return "\n".join(w.text() for w in self.workers)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


@pytest.fixture(scope="module")
def module_fleet(faults, fenv, fdir):
    f = Fleet(fenv, fdir)
    yield f
    f.stop()


@pytest.fixture
def fleet(module_fleet):
    """The module's fleet, with any worker a failed test left killed replaced."""
    module_fleet.fill()
    return module_fleet


@pytest.fixture(scope="module")
def records(fdir):
    return Records(fdir)


@pytest.fixture(scope="module")
def fbugs(broker):
    from tests.support import BugQueues

    return BugQueues(broker.url)


def work_queue(kind: str) -> str:
    return "faults" if kind == "classic" else "faults.q"


def release(fdir: Path, tag: str) -> None:
    (fdir / f"release-{tag}").touch()


def attempts(records, task_id: str, kind: str = "run") -> list[int]:
    return [r["att"] for r in records.of(task_id, kind)]


# -- 1. workers killed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_whole_worker_killed_mid_task_the_message_runs_again_on_a_new_worker(faults, fleet, records, broker,
                                                                               fdir, kind):
    tag = uuid.uuid4().hex
    result = faults.TASKS[kind]["hold"].delay(tag)
    held = wait_for(lambda: records.of(result.id, "hold"), 20, what="the task to start")[0]
    holder = fleet.of(held["pid"])
    # the other worker first, so that only a new worker can run it (alive, it could take the redelivered
    # message, put it back confirmed and die before its ack: two copies, a duplicate the test is not about)
    for worker in fleet.workers:
        if worker is not holder:
            fleet.kill(worker)
    fleet.kill(holder)  # SIGKILL to its whole process group: main process and pool
    assert wait_for(lambda: ready_counts(broker.url, [work_queue(kind)])[work_queue(kind)] == 1, 10, 0.2,
                    "the unacked message to be back in its work queue")
    release(fdir, tag)
    fleet.fill()
    assert result.get(timeout=20) == "held"
    # the broker delivers it again: its worker died (a worker that stops warm gives back what it never
    # started), so attempt 1 counts as failed and attempt 2 runs on the new worker
    assert attempts(records, result.id) == [1, 2]
    assert [r["redelivered"] for r in records.of(result.id, "run")] == [False, False]
    assert len(records.of(result.id, "ok")) == 1
    assert held["pid"] not in {r["pid"] for r in records.of(result.id, "ok")}


@pytest.mark.parametrize("kind", KINDS)
def test_a_message_that_kills_its_whole_worker_ends_as_worker_lost_after_max_attempts(faults, fenv, fdir, kind):
    """Issue 23, item 5. Under ``-P solo`` the task runs in the worker's main process: a poison message
    kills the whole worker, and the broker delivers it again to the next one. A redelivery means a
    worker that died (a worker stopping warm gives back what it never started), so each death is a
    failed attempt: max_attempts (3) deaths, then the bug queue as worker_lost. Before, each death was
    "put back" uncounted: 6 deaths and unroutable."""
    if kind == "quorum" and not QUORUM_OK:
        pytest.skip("quorum work queues need Celery 5.5+")
    own = Vhost()  # its own vhost: this message kills the workers that take it
    env = {**fenv, "RARE_FAULTS_BROKER": own.url}
    deaths, worker = 0, None
    try:
        with Connection(own.url, transport_options={"confirm_publish": True}) as conn:
            result = faults.TASKS[kind]["poison"].apply_async((99,), connection=conn)
        deadline = time.monotonic() + 120
        found: list = []
        while time.monotonic() < deadline and not found and deaths <= 2 * faults.MAX_ATTEMPTS["poison"]:
            worker = Worker("tests.apps.faults", faults.queues_of(kind), env, fdir, name=f"solo-{kind}-{deaths}",
                            pool="solo", concurrency=1)
            while time.monotonic() < deadline and worker.proc.poll() is None and not found:
                found = in_bugs(own.url, work_queue(kind) + ".bugs", result.id)
                time.sleep(0.2)
            if worker.proc.poll() is not None:
                deaths += 1
            worker.stop()
        assert found, f"not in the bug queue after {deaths} deaths"
        assert found[0].headers["x-rare-reason"] == "worker_lost"
        assert found[0].headers["x-rare-attempts"] == faults.MAX_ATTEMPTS["poison"]
        assert deaths == faults.MAX_ATTEMPTS["poison"]
    finally:
        if worker is not None:
            worker.stop()
        own.delete()


@pytest.mark.parametrize("kind", KINDS)
def test_a_delayed_start_held_by_a_worker_that_dies_waits_on_and_runs_once_on_time(faults, fenv, fdir, kind):
    """A solo worker busy with a task holds a delayed start it prefetched and has not looked at yet; the
    worker is killed. The broker delivers both again: the held task counts a failed attempt (it ran), the
    delayed start does not (it was not due: no attempt starts before its time) and runs as attempt 1, not
    before its countdown. Before (found by the soak): counted as a failed attempt, retried in 0.5 s as
    attempt 2, seconds early."""
    if kind == "quorum" and not QUORUM_OK:
        pytest.skip("quorum work queues need Celery 5.5+")
    own = Vhost()  # its own vhost: the only worker is the one killed, then the one after it
    env = {**fenv, "RARE_FAULTS_BROKER": own.url}
    records = Records(fdir)
    solo = after = None
    try:
        solo = Worker("tests.apps.faults", faults.queues_of(kind), env, fdir, name=f"holder-{kind}", pool="solo",
                      concurrency=1).wait_ready()
        with Connection(own.url, transport_options={"confirm_publish": True}) as conn:
            tag = uuid.uuid4().hex
            held = faults.TASKS[kind]["hold"].apply_async((tag,), connection=conn)
            wait_for(lambda: records.of(held.id, "hold"), 20, what="the solo worker to be busy")
            sent = time.time()
            later = faults.TASKS[kind]["work"].apply_async(("ok", 0), countdown=8, connection=conn)
        queue = work_queue(kind)
        wait_for(lambda: own.queue_stats().get(queue, {}).get("unacked") == 2, 20, 0.2,
                 "the delayed start to be prefetched by the busy worker")
        os.killpg(solo.proc.pid, signal.SIGKILL)
        solo.proc.wait(10)
        release(fdir, tag)
        after = Worker("tests.apps.faults", faults.queues_of(kind), env, fdir, name=f"after-{kind}",
                       concurrency=1).wait_ready()
        wait_for(lambda: records.of(later.id, "ok"), 30, 0.2, "the delayed start to run")
        runs = records.of(later.id, "run")
        assert [r["att"] for r in runs] == [1], runs
        assert runs[0]["t"] >= sent + 8, f"ran {sent + 8 - runs[0]['t']:.2f} s early"
        assert attempts(records, held.id) == [1, 2]  # the held task had run: its attempt counts
    finally:
        for worker in (solo, after):
            if worker is not None:
                worker.stop()
        own.delete()


@pytest.mark.skipif(not QUORUM_OK, reason="quorum work queues need Celery 5.5+")
def test_killed_pool_process_loses_nothing_on_a_quorum_queue(faults, fleet, records):
    """The classic-queue version is tests/integration/test_core.py."""
    result = faults.TASKS["quorum"]["poison"].delay(1)
    assert result.get(timeout=30) == "survived"
    assert attempts(records, result.id) == [1, 2]


@pytest.mark.skipif(not QUORUM_OK, reason="quorum work queues need Celery 5.5+")
def test_poison_message_on_a_quorum_queue_ends_as_worker_lost(faults, fleet, records, fbugs):
    """No x-delivery-limit on the work queue: the redelivered flag counts the attempts (classic: test_core.py)."""
    result = faults.TASKS["quorum"]["poison"].delay(99)
    message = fbugs.find("faults.q.bugs", result.id, timeout=40)
    assert message.headers["x-rare-reason"] == "worker_lost"
    assert message.headers["x-rare-attempts"] == faults.MAX_ATTEMPTS["poison"]
    assert attempts(records, result.id) == [1, 2, 3]  # each attempt ran once, then no more
    with pytest.raises(Exception, match="never acked"):
        result.get(timeout=10)


# -- 3. connection lost between the delay publish and the ack -----------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_connection_lost_between_delay_publish_and_ack_runs_once(faults, fleet, records, broker,
                                                                             fdir, kind):
    tag = uuid.uuid4().hex
    result = faults.TASKS[kind]["pause"].delay(tag)
    # the worker's main process holds the retry after its delay copy's confirm, before the ack (a test hook)
    paused = wait_for(lambda: records.of(result.id, "paused"), 20, what="the retry to be published")[0]
    worker = fleet.of(paused["pid"])
    assert paused["pid"] == worker.proc.pid  # the main process published it (issue 28), not the pool process
    assert close_connections(broker.name, worker.proc.pid, "fault test: connection lost before the ack") >= 1
    closed = time.time() - paused["t"]
    # attempt 2 is due 5 s after its copy's confirm. Closed later, the held worker's consumer may have taken
    # it, and its redelivery counts as an attempt of unknown fate (attempts [1, 3]): correct, not this test's
    assert closed < 5, f"the connections were closed {closed:.1f} s after the pause: too slow a machine"
    # the delay copy (attempt 2) was confirmed: it runs whatever becomes of the ack (on the other worker)
    wait_for(lambda: records.of(result.id, "ok"), 20, what="attempt 2 to run")
    release(fdir, result.id)
    # the ack of attempt 1 went to a closed channel: the broker gives attempt 1 back (redelivered). Its copy's
    # ending (the retry) was confirmed and recorded before the ack: the copy is acked, not run (issue 23: before,
    # it was put back and either its task id's SUCCESS or a second run ended it)
    assert result.get(timeout=20) == "paused"
    wait_for(lambda: "came back after its retry was published" in worker_lines(fleet, result.id), 20,
             what="the redelivered attempt 1 to be acked unrun")
    assert attempts(records, result.id) == [1, 2] and len(records.of(result.id, "ok")) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_result_backend_a_lost_ack_runs_nothing_twice(faults, fleet, records, broker, fenv, fdir, kind):
    """The same, for a worker with no result backend to record endings in: the worker's main process
    keeps the copies it saw end (a retry's confirmed copy, a success), and the message that comes back
    to it because its ack was lost is acked unrun. Before, the redelivered attempt 1 of ``pause``
    counted as a failed attempt (attempt 2 ran twice), and ``calm`` ran twice. One worker: the message
    comes back to the worker that kept its end (another worker would count it, at least once)."""
    for w in list(fleet.workers):  # the fleet's workers have a backend: this test's one worker has none
        fleet.kill(w)
    worker = Worker("tests.apps.faults", fleet.queues, {**fenv, "RARE_FAULTS_CONFIG": "no_backend"}, fdir,
                    name="nobackend", concurrency=1)

    def ack_lost(result) -> None:
        """Held after its end was kept, before its ack: the worker's connections closed, then released."""
        paused = wait_for(lambda: records.of(result.id, "paused"), 20, what=f"{result.id} to be held")[0]
        assert close_connections(broker.name, worker.proc.pid, "fault test: connection lost before the ack") >= 1
        assert time.time() - paused["t"] < 5, "too slow a machine: attempt 2 of pause was due before the close"
        release(fdir, result.id)
        wait_for(lambda: "came back after" in worker_lines(worker, result.id), 30,
                 what=f"the redelivered {result.id} to be acked unrun")

    try:
        worker.wait_ready()
        retried = faults.TASKS[kind]["pause"].delay(uuid.uuid4().hex)
        ack_lost(retried)
        wait_for(lambda: records.of(retried.id, "ok"), 30, what="attempt 2 of pause to run")
        succeeded = faults.TASKS[kind]["calm"].delay(uuid.uuid4().hex)
        ack_lost(succeeded)  # acked unrun: nothing of either is left to run
        assert attempts(records, retried.id) == [1, 2] and len(records.of(retried.id, "ok")) == 1
        assert attempts(records, succeeded.id) == [1]
    finally:
        worker.stop()


@pytest.mark.skipif(CELERY < (5, 7), reason="Celery 5.4's prefork pool forgets the attempts running when the "
                    "connection is lost (celery/celery#8541): the worker never sees them end, and the copy goes on")
@pytest.mark.parametrize(("kind", "then"), [*((k, "ok") for k in KINDS), ("classic", "fail")])
def test_a_copy_put_back_while_its_attempt_still_runs_here_runs_nothing_twice(faults, fleet, records, broker, fenv,
                                                                               fdir, kind, then):
    """The worker's connection is lost while an attempt runs (the attempt goes on): the broker gives its
    message back (redelivered) and the worker, which still runs it, puts it back as a copy. That copy must
    not run beside the attempt: it waits in the worker's main process, unacked, and once the attempt has
    ended (a success, or a retry whose copy the broker confirmed) it is acked unrun. Two pool processes
    and no result backend: before, the idle pool process ran the copy at once (attempt 1 twice)."""
    for w in list(fleet.workers):  # one worker, so that the message comes back to it
        fleet.kill(w)
    worker = Worker("tests.apps.faults", fleet.queues, {**fenv, "RARE_FAULTS_CONFIG": "no_backend"}, fdir,
                    name="held", concurrency=2)
    try:
        worker.wait_ready()
        result = faults.TASKS[kind]["hold"].delay(tag := uuid.uuid4().hex, then)
        wait_for(lambda: records.of(result.id, "hold"), 20, what="attempt 1 to start")
        connected = worker.text().count("Connected to amqp://")
        assert close_connections(broker.name, worker.proc.pid, "fault test: connection lost under an attempt") >= 1
        wait_for(lambda: worker.text().count("Connected to amqp://") > connected, 30, what="the worker to reconnect")
        wait_for(lambda: "put back in" in worker_lines(worker, result.id), 30, what="the redelivery put back")
        wait_for(lambda: ready_counts(broker.url, [work_queue(kind)])[work_queue(kind)] == 0, 20, what="the copy in the worker's hands")
        release(fdir, tag)
        wait_for(lambda: "came back after" in worker_lines(worker, result.id), 30, what="the copy acked unrun")
        if then == "fail":
            wait_for(lambda: records.of(result.id, "ok"), 30, what="attempt 2 to run")
        assert attempts(records, result.id) == ([1] if then == "ok" else [1, 2])
        assert len(records.of(result.id, "ok")) == 1
    finally:
        worker.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_a_retry_after_the_broker_closed_the_pool_process_connection_runs_once(faults, fleet, records, broker, kind):
    """The broker closes the idle connections retries are published on (a broker restart, an operator,
    missed heartbeats): the worker's main process's own (issue 28: it publishes the retries pool processes
    hand it) and its pool processes' (they publish the other endings). The next failures' retries go out on
    new connections, and each attempt 1 runs once. Before (found by the soak): the retry was written into
    the dead connection, its fate unknown; the message was kept and attempt 1 ran again."""
    warm = [faults.TASKS[kind]["work"].delay("flaky", 1) for _ in range(4)]
    assert [r.get(timeout=30) for r in warm] == [["flaky", 2]] * 4
    pids = {r["pid"] for w in warm for r in records.of(w.id, "run") if r["att"] == 1}
    pids |= {fleet.of(pid).proc.pid for pid in pids}  # and their workers' main processes (the consumer's too)
    assert sum(close_connections(broker.name, pid, "fault test: an idle connection closed") for pid in pids) >= 1
    results = [faults.TASKS[kind]["work"].delay("flaky", 1) for _ in range(4)]
    assert [r.get(timeout=30) for r in results] == [["flaky", 2]] * 4
    assert [attempts(records, r.id) for r in results] == [[1, 2]] * 4


def worker_lines(fleet, task_id: str) -> str:
    return "\n".join(line for line in fleet.text().splitlines() if task_id in line)


# -- 4. publish refused -------------------------------------------------------------------------------------

class Policy:
    """A vhost policy that makes matching queues refuse publishes (max-length 0, reject-publish)."""

    def __init__(self, vhost, pattern: str) -> None:
        self.vhost, self.name = vhost, f"refuse-{uuid.uuid4().hex[:6]}"
        rabbitmqctl("set_policy", "-p", vhost.name, "--apply-to", "queues", "--priority", "10", self.name,
                    pattern, '{"max-length": 0, "overflow": "reject-publish"}')

    def clear(self) -> None:
        """Remove the policy (once: a second call does nothing)."""
        if self.name is not None:
            rabbitmqctl("clear_policy", "-p", self.vhost.name, self.name)
            self.name = None


def fill(broker, queue: Queue) -> None:
    """Make ``queue`` full. A classic queue refuses every publish at max-length 0; a quorum queue
    (RabbitMQ 3.10) takes one message past its limit and refuses the next ones, so it gets that one here
    (a delay queue through ``rare.delay``, like a retry, dead-lettered to ``faults.filler`` when it expires)."""
    with Connection(broker.url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        Queue("faults.filler").bind(channel).declare()
        queue.bind(channel).declare()
        RETURN_EXCHANGE.bind(channel).declare()
        channel.queue_bind("faults.filler", RETURN_EXCHANGE.name, "faults.filler")  # its way back
        if queue_kind(queue) == QUORUM:
            delayed = queue.exchange is not None and queue.exchange.name == DELAY_EXCHANGE.name
            conn.Producer(channel).publish(
                {"filler": True}, exchange=DELAY_EXCHANGE.name if delayed else "",
                routing_key="faults.filler" if delayed else queue.name,
                headers={"BCC": [queue.routing_key]} if delayed else {})


def waiting(vhost, queue: str) -> int:
    stats = vhost.queue_stats().get(queue, {})
    return stats.get("ready", 0) + stats.get("unacked", 0)


def refusals(fleet, task_id: str) -> list[str]:
    return [line for line in fleet.text().splitlines() if task_id in line and "kept in its queue" in line]


def reported_twice(fleet, result):
    """Poll: the worker has logged the refusal twice (the message went back to its queue and came again).
    Fails at once if Celery stored FAILURE instead: then the message was acked, and it is nowhere."""
    if result.state == "FAILURE":
        raise AssertionError(f"{result.id} was acked and dropped while the broker refused the publish: "
                             f"FAILURE {result.result!r}")
    return len(refusals(fleet, result.id)) >= 2


@pytest.mark.parametrize("kind", KINDS)
def test_refused_delay_publish_keeps_the_message_until_the_broker_takes_it(faults, fleet, records, broker, kind):
    target = delay_queue(3000, QUORUM if kind == "quorum" else CLASSIC)
    policy = Policy(broker, "^" + re.escape(target.name) + "$")
    try:
        fill(broker, target)
        result = faults.TASKS[kind]["patient"].delay(1)
        wait_for(lambda: reported_twice(fleet, result), 20, 0.2, "the worker to report the refusal twice")
        # not acked, not lost: still in its work queue, unless the broker took the retry meanwhile (the quorum
        # delay queue accepts again once its filler's 3 s are up, and quorum queue numbers lag up to 5 s)
        wait_for(lambda: waiting(broker, work_queue(kind)) == 1 or records.of(result.id, "ok"), 30, 0.5,
                 "the message to be back in its work queue")
        assert attempts(records, result.id).count(1) == 1  # the failed attempt is not run again while it waits
    finally:
        policy.clear()
    assert result.get(timeout=45) == ["patient", 2]  # the next try may be 16 s after the policy is cleared (1, 2, 4, 8, 16 s)
    assert attempts(records, result.id) == [1, 2]
    line = refusals(fleet, result.id)[0]
    assert "ERROR" in line and f"refused (nacked) the message for delay queue '{target.name}'" in line, line


@pytest.mark.skipif(not QUORUM_OK, reason="quorum work queues need Celery 5.5+")
def test_a_retry_refused_by_a_full_quorum_delay_queue_goes_through_once_its_limit_is_removed(faults, fenv, fdir):
    """A quorum queue over its length limit (reject-publish) tells each channel publishing to it to stop,
    and the broker then refuses that channel's publishes itself until the queue says go, which RabbitMQ
    3.10 never says once the limit's policy is gone. The delay queue is full (its filler leaves after
    3 s), attempt 1's retry is refused, and the policy is removed at once, while the filler is still
    there. The next try goes out on a new connection and is taken. Found by CI: on the same channel every
    try was refused until the patience ran out (4 minutes), then the message went back to its queue. (On a
    machine so slow that the filler leaves before the policy is removed, the queue says go and the old
    channel would pass too.)"""
    own = Vhost()  # one worker: its main process publishes every retry
    env = {**fenv, "RARE_FAULTS_BROKER": own.url}
    records, worker = Records(fdir), None
    target = delay_queue(3000, QUORUM)
    policy = Policy(own, "^" + re.escape(target.name) + "$")
    try:
        worker = Worker("tests.apps.faults", faults.queues_of("quorum"), env, fdir, name="blocked-quorum",
                        concurrency=1).wait_ready()
        fill(own, target)
        with Connection(own.url, transport_options={"confirm_publish": True}) as conn:
            result = faults.TASKS["quorum"]["patient"].apply_async((1,), connection=conn)
        wait_for(lambda: result.id in worker.text() and "kept in its queue" in worker.text(), 20, 0.05,
                 "the retry to be refused")
        policy.clear()
        wait_for(lambda: records.of(result.id, "ok"), 30, 0.2, "attempt 2 to run")  # the next try is 1 s later
        assert [r["att"] for r in records.of(result.id, "run")] == [1, 2]
    finally:
        policy.clear()
        if worker is not None:
            worker.stop()
        own.delete()


@pytest.mark.parametrize("kind", KINDS)
def test_refused_bug_queue_publish_keeps_the_message_until_the_broker_takes_it(faults, fleet, records, broker,
                                                                              fbugs, kind):
    bugs = work_queue(kind) + ".bugs"
    policy = Policy(broker, "^" + re.escape(bugs) + "$")
    try:
        fill(broker, bug_queue(bugs))
        result = faults.TASKS[kind]["work"].delay("bug")
        wait_for(lambda: reported_twice(fleet, result), 20, 0.2, "the worker to report the refusal twice")
        wait_for(lambda: waiting(broker, work_queue(kind)) == 1, 30, 0.5, "the message to be back in its work queue")
    finally:
        policy.clear()
    message = fbugs.find(bugs, result.id, timeout=20)
    assert message.headers["x-rare-reason"] == "bug"
    assert attempts(records, result.id) == [1]  # a Bug is not run again
    line = refusals(fleet, result.id)[0]
    assert "ERROR" in line and f"refused (nacked) the message for queue '{bugs}'" in line, line


@pytest.mark.parametrize("kind", KINDS)
def test_delay_and_bug_queues_deleted_under_a_running_worker_are_declared_again(faults, fleet, records, broker,
                                                                                fbugs, kind):
    tasks = faults.TASKS[kind]
    warm = [tasks["work"].delay("flaky", 1) for _ in range(4)] + [tasks["work"].delay("bug")]
    for result in warm:  # both workers' pool processes have declared (and cached) the queues now
        result.get(timeout=20, propagate=False)
    delayed = delay_queue(500, QUORUM if kind == "quorum" else CLASSIC).name
    bugs = work_queue(kind) + ".bugs"
    fbugs.find(bugs, warm[-1].id)
    for queue in (delayed, bugs):
        rabbitmqctl("delete_queue", "-p", broker.name, queue)
    again = [tasks["work"].delay("flaky", 1) for _ in range(4)]
    buggy = [tasks["work"].delay("bug") for _ in range(2)]
    assert [r.get(timeout=20) for r in again] == [["flaky", 2]] * 4
    for result in buggy:
        assert fbugs.find(bugs, result.id).headers["x-rare-reason"] == "bug"
    assert f"delay queue '{delayed}' (back to '{work_queue(kind)}') was missing; declaring it again" in fleet.text()


# -- 5. bad input on a rare queue ------------------------------------------------------------------------------

def nested(depth: int, leaf=1):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


EVIL = "__import__('os').system('touch /tmp/rare-faults-evaluated')"

BAD_HEADERS = {
    "100 KB x-rare-queue": {"x-rare-queue": "q" * 100_000},
    "x-rare-deadline is a string": {"x-rare-deadline": "tomorrow"},
    "x-rare-deadline is code": {"x-rare-deadline": EVIL},
    "x-rare-attempt is a nested list": {"x-rare-attempt": nested(100)},
    "x-rare-due is a 50 KB list": {"x-rare-due": list(range(5000))},
    "x-rare-deadline after the year 3000": {"x-rare-deadline": 1e300},
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
@pytest.mark.parametrize("kind", KINDS)
def test_nonsense_rare_headers_end_in_the_bug_queue_bounded(faults, fleet, records, fbugs, kind, case):
    result = faults.TASKS[kind]["work"].apply_async(("ok",), headers=BAD_HEADERS[case])
    with pytest.raises(ValueError, match="header x-rare-"):
        result.get(timeout=15)
    assert records.of(result.id) == []  # never run
    message = fbugs.find(work_queue(kind) + ".bugs", result.id)
    h = message.headers
    assert h["x-rare-reason"] == "rejected"
    assert h["x-rare-queue"] == work_queue(kind)  # the queue it really came from, not the header's claim
    assert len(h["x-rare-error"]) <= 1000 and "x-rare-" in h["x-rare-error"]
    assert len(json.dumps(h, default=str)) < 10_000  # the nonsense value is not copied along
    assert json.loads(message.body)[0] == ["ok"]  # the work itself is kept for whoever fixes it
    assert not os.path.exists("/tmp/rare-faults-evaluated")  # header values are data, never code
    assert all(w.proc.poll() is None for w in fleet.workers)


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_hop_history_is_ignored_not_trusted(faults, fleet, records, fbugs, kind):
    """x-rare-hops is informative: junk entries there (5,000 of them) are dropped and the task runs;
    a header nested deeper than 32 levels (here 100) is rejected before it reaches a pool process."""
    result = faults.TASKS[kind]["work"].apply_async(("ok",), headers={"x-rare-hops": [
        {"task": "t", "n": i} for i in range(5_000)]})
    assert result.get(timeout=15) == ["ok", 1]
    deep = faults.TASKS[kind]["work"].apply_async(("ok",), headers={"x-rare-hops": nested(100)})
    message = fbugs.find(work_queue(kind) + ".bugs", deep.id)
    assert message.headers["x-rare-reason"] == "rejected"
    assert message.headers["x-rare-hops"] == "<dropped by rare_celery: nested deeper than 32>"
    assert records.of(deep.id) == []


@pytest.mark.parametrize("depth", [600, 2000])
def test_deeply_nested_header_does_not_crash_the_worker(faults, fenv, fdir, depth):
    own = Vhost()  # its own vhost and worker: this message kills the workers that take it
    worker = Worker("tests.apps.faults", faults.queues_of("classic"), {**fenv, "RARE_FAULTS_BROKER": own.url},
                    fdir, name=f"deep{depth}", concurrency=1)
    try:
        worker.wait_ready()
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 3 * depth + 1000))  # to encode it here
        task_id = str(uuid.uuid4())
        with Connection(own.url, transport_options={"confirm_publish": True}) as conn:
            faults.TASKS["classic"]["work"].apply_async(("ok",), task_id=task_id, headers={"x-junk": nested(depth)},
                                                        connection=conn)
        bugs: list = []

        def outcome():
            if worker.proc.poll() is not None:
                last = [line for line in worker.text().splitlines() if "CRITICAL" in line][-1:]
                raise AssertionError(f"the worker died (exit {worker.proc.returncode}): {last}")
            bugs.extend(drain(own.url, "faults.bugs"))
            return [m for m in bugs if (m.headers or {}).get("id") == task_id]
        found = wait_for(outcome, 8, 0.2, "the message in the bug queue")
        assert found[0].headers["x-rare-reason"] == "rejected"
    finally:
        worker.stop()
        own.delete()


def test_nested_header_without_a_task_id_does_not_stop_the_worker(faults, fenv, fdir):
    """Messages naming a RareTask with no ``id`` header and a header nested past 32 levels go to the bug
    queue, once each; the worker (file result backend: a key-value store, which refuses a task id None)
    stores no failure for them, stays up and runs every message published with them."""
    own = Vhost()
    worker = Worker("tests.apps.faults", faults.queues_of("classic"), {**fenv, "RARE_FAULTS_BROKER": own.url},
                    fdir, name="deep-no-id", concurrency=1)
    try:
        worker.wait_ready()
        rounds, results = 6, []
        with Connection(own.url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            for n in range(rounds):
                producer.publish(json.dumps([["ok"], {}, {}]), routing_key="faults", content_type="application/json",
                                 content_encoding="utf-8",
                                 headers={"task": "faults.classic.work", "x-junk": nested(40), "x-n": n})
                results.append(faults.TASKS["classic"]["work"].apply_async(("ok",), connection=conn))
        bugs: list = []

        def bugged():
            assert worker.proc.poll() is None, f"the worker died: {worker.text()[-2000:]}"
            bugs.extend(drain(own.url, "faults.bugs"))
            return len(bugs) >= rounds
        wait_for(bugged, 15, 0.2, "the messages in the bug queue")
        assert sorted(m.headers["x-n"] for m in bugs) == list(range(rounds))
        assert {m.headers["x-rare-reason"] for m in bugs} == {"rejected"}
        for result in results:
            assert result.get(timeout=15) == ["ok", 1]
        assert worker.proc.poll() is None
    finally:
        worker.stop()
        own.delete()


@pytest.mark.parametrize("kind", KINDS)
def test_headers_near_the_frame_size_are_not_lost_on_retry(faults, fleet, records, fbugs, kind):
    result = faults.TASKS[kind]["work"].apply_async(("flaky", 1), headers={"x-junk": "j" * 130_300})

    def ended():
        if result.state == "FAILURE" and records.of(result.id) and not drain_for(fbugs, work_queue(kind), result.id):
            raise AssertionError(f"acked and dropped: FAILURE {result.result!r}, in no queue")
        return result.state == "SUCCESS" or drain_for(fbugs, work_queue(kind), result.id)
    wait_for(ended, 15, 0.2, "the task to succeed or to land in the bug queue")


def in_bugs(url: str, queue: str, task_id: str) -> list:
    """The messages of ``task_id`` taken from ``queue`` (none while it does not exist yet)."""
    try:
        return [m for m in drain(url, queue) if (m.headers or {}).get("id") == task_id]
    except Exception:  # noqa: BLE001 - NOT_FOUND until a worker declares it
        return []


def drain_for(fbugs, queue: str, task_id: str) -> list:
    try:
        return [fbugs.find(queue + ".bugs", task_id, timeout=0.5)]
    except AssertionError:
        return []


# -- 6. configuration mistakes: one line at start, naming what to change ------------------------------------

def start_worker_expecting_refusal(env: dict, queues: list[str], timeout: float = 60) -> tuple[int, str]:
    """``celery worker`` that must refuse to start: (exit code, its whole output)."""
    cmd = [sys.executable, "-m", "celery", "-A", "tests.apps.faults", "worker", "-Q", ",".join(queues), "-c", "1",
           "--without-mingle", "--without-gossip", "-l", "info"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=timeout, check=False)
    return out.returncode, out.stdout + out.stderr


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


@pytest.fixture
def scratch(fenv):
    """A vhost of its own, for a worker that must not start."""
    v = Vhost()
    yield v, {**fenv, "RARE_FAULTS_BROKER": v.url}
    v.delete()


CONFIG_MISTAKES = {
    "confirm_publish=False": ({"RARE_FAULTS_CONFIG": "confirm_off"},
                              "rare_celery needs publisher confirms: remove confirm_publish=False"),
    "pickle's content type in accept_content": (
        {"RARE_FAULTS_CONFIG": "pickle_type", "C_FORCE_ROOT": "1"},
        "rare_celery accepts JSON only: accept_content names pickle (application/x-python-serialize)"),
    "pickle in accept_content": ({"RARE_FAULTS_CONFIG": "pickle", "C_FORCE_ROOT": "1"},
                                 "rare_celery accepts JSON only: accept_content names pickle (pickle); use 'json'"),
}


@pytest.mark.parametrize("mistake", sorted(CONFIG_MISTAKES))
def test_configuration_mistake_is_one_line_at_start(faults, scratch, mistake):
    _, env = scratch
    extra, expected = CONFIG_MISTAKES[mistake]
    code, text = start_worker_expecting_refusal({**env, **extra}, faults.queues_of("classic"))
    assert code != 0
    assert last_line(text).startswith(expected), text[-2000:]
    assert "Traceback" not in text
    assert "rare_celery: managing" not in text and " ready." not in text  # it never consumed


@pytest.mark.parametrize("kind", KINDS)
def test_work_queue_declared_with_other_arguments_is_one_line_at_start(faults, scratch, kind):
    vhost, env = scratch
    queue = work_queue(kind)
    other = {"x-max-length": 10} if kind == "classic" else None  # quorum: it exists as a classic queue
    with Connection(vhost.url) as conn:
        Queue(queue, queue_arguments=other).bind(conn.channel()).declare()
    code, text = start_worker_expecting_refusal(env, faults.queues_of(kind))
    assert code != 0
    line = last_line(text)
    assert line.startswith(f"rare_celery: queue '{queue}' in vhost '{vhost.name}' exists with "), text[-2000:]
    assert ("x-max-length" if kind == "classic" else "x-queue-type") in line
    assert "queue_arguments in task_queues" in line and f"rabbitmqctl delete_queue {queue}" in line
    assert "Traceback" not in text


@pytest.mark.xfail(strict=True, reason=(
    "rare_celery does not look at policies: a policy with 'expires' on the delay queues (delay queues never "
    "have consumers, so they expire with the retries waiting in them: lost) lets the worker start"))
def test_policy_that_expires_delay_queues_is_refused_at_start(faults, scratch, tmp_path):
    vhost, env = scratch
    rabbitmqctl("set_policy", "-p", vhost.name, "--apply-to", "queues", "short-lived", r"^rare\.", '{"expires": 60000}')
    worker = Worker("tests.apps.faults", faults.queues_of("classic"), env, tmp_path, name="policy", concurrency=1)
    try:
        wait_for(lambda: worker.proc.poll() is not None or " ready." in worker.text(), 30, 0.1,
                 "the worker to start or to refuse")
        assert worker.proc.poll() is not None, "the worker started with a policy that expires delay queues"
        assert "expires" in last_line(worker.text()) and "Traceback" not in worker.text()
    finally:
        worker.stop()


def test_policy_shortening_a_delay_queue_ttl_never_makes_a_retry_early(faults, fleet, records, broker):
    """The queue's name is its TTL (rare.wait.3s), so a declaration can never disagree with it; a policy
    with a shorter message-ttl can. The message then comes back early and the worker sends it round
    again until its x-rare-due: late by a few hops, never early."""
    three = delay_queue(3000).name
    rabbitmqctl("set_policy", "-p", broker.name, "--apply-to", "queues", "short-ttl", f"^{re.escape(three)}$",
                '{"message-ttl": 500}')
    try:
        result = faults.TASKS["classic"]["patient"].delay(1)
        assert result.get(timeout=45) == ["patient", 2]  # the next try may be 16 s after the policy is cleared (1, 2, 4, 8, 16 s)
        policies = dict(line.split("\t")[:2] for line in rabbitmqctl(
            "list_queues", "-p", broker.name, "--no-table-headers", "-q", "name", "policy").splitlines() if "\t" in line)
        assert policies.get(three) == "short-ttl", policies  # the retry waited where the policy applies
    finally:
        rabbitmqctl("clear_policy", "-p", broker.name, "short-ttl")
    first, second = records.of(result.id, "run")
    assert 3.0 <= second["t"] - first["t"] < 4.0


# -- security: no password in logs, no pickle ----------------------------------------------------------------

@pytest.fixture
def secret_user(broker):
    """A broker user with a distinctive password, allowed on the module's vhost."""
    user, password = f"faults-{uuid.uuid4().hex[:6]}", f"Pw-{uuid.uuid4().hex}-secret"
    rabbitmqctl("add_user", user, password)
    rabbitmqctl("set_permissions", "-p", broker.name, user, ".*", ".*", ".*")
    yield user, password
    rabbitmqctl("delete_user", user)


def test_the_broker_password_never_reaches_logs_or_the_cli(faults, broker, fenv, fdir, fbugs, secret_user):
    user, password = secret_user
    url = f"amqp://{user}:{password}@{HOST}/{broker.name}"
    env = {**fenv, "RARE_FAULTS_BROKER": url}
    worker = Worker("tests.apps.faults", faults.queues_of("classic"), env, fdir, name="secret", concurrency=1)
    outputs = []
    try:
        worker.wait_ready()
        with Connection(url) as conn:  # retries, a bug-queue routing and a dropped connection, logged
            flaky = faults.TASKS["classic"]["work"].apply_async(("flaky", 1), connection=conn)
            buggy = faults.TASKS["classic"]["work"].apply_async(("bug",), connection=conn)
        assert flaky.get(timeout=20) == ["flaky", 2]
        fbugs.find("faults.bugs", buggy.id)
        close_connections(broker.name, worker.proc.pid, "fault test: password check")
        wait_for(lambda: worker.text().count("Connected to amqp://") >= 2, 20, what="the worker to reconnect")
        wrong = url.replace(password, password + "-wrong")
        for args in (["-A", "tests.apps.faults", "status"], ["--broker", url, "inspect-bugs", "faults.bugs"],
                     ["--broker", wrong, "inspect-bugs", "faults.bugs"]):
            cli = subprocess.run([sys.executable, "-m", "rare_celery.tools.cli", *args], cwd=ROOT, capture_output=True,
                                 text=True, timeout=60, check=False,
                                 env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
            outputs.append(cli.stdout + cli.stderr)
        refused = Worker("tests.apps.faults", faults.queues_of("classic"), {**env, "RARE_FAULTS_BROKER": wrong},
                         fdir, name="wrongpw", concurrency=1)
        try:
            # Celery gives up at once on ACCESS_REFUSED ("Unrecoverable error"): wait for that, or a retry
            wait_for(lambda: refused.proc.poll() is not None or "Cannot connect to" in refused.text(), 30, 0.2,
                     "the login to be refused")
        finally:
            refused.stop()
        outputs.append(refused.text())
        assert "ACCESS_REFUSED" in refused.text()
    finally:
        worker.stop()
    outputs.append(worker.text())
    assert f"amqp://{user}:**@" in worker.text()  # Celery shows where it connects, masked
    for text in outputs:
        assert password not in text, text[-2000:]


def test_no_pickle_in_rare_celery():
    """JSON only: rare_celery never imports pickle, and never evaluates what a message carries."""
    for path in (ROOT / "rare_celery").glob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|shelve|marshal)\b", source, re.MULTILINE), path
        assert not re.search(r"\b(eval|exec)\(|literal_eval|pickle\.loads|yaml\.load\(", source), path


# -- 2. broker restart, 7. load: conservation ----------------------------------------------------------------

def delayed_now(broker) -> int:
    """Messages waiting in delay queues right now (classic: exact; quorum: up to 5 s old)."""
    return sum(s["ready"] for q, s in broker.queue_stats().items() if is_delay_queue(q))


def at_least_once_bound(fleet) -> int:
    """Duplicates one connection loss can explain: every message a worker holds unacked when its
    connection drops may have done its work already (prefetch: 4 per consumer per pool process), plus
    the publish each pool process may have had waiting for its confirm."""
    return len(fleet.workers) * (len(fleet.queues) * 4 + 1)


def held_unacked_only(load) -> bool:
    """Everything not yet ended is held unacked by consumers: nothing ready (in a work queue or waiting in
    a delay queue)."""
    held = load.held()
    return bool(held) and all(ready == 0 for ready, _, _ in held.values())


def report(tallies, title: str) -> str:
    from tests.support import tally_table

    text = tally_table(tallies.values(), title)
    print("\n" + text)
    return text


ONLY_VERIFIED_ON_55 = pytest.mark.skipif(
    tuple(int(p) for p in celery.__version__.split(".")[:2]) < (5, 5),
    reason="1,000-task runs mixing both queue types: verified on Celery 5.5+ only (5.4 cannot consume quorum queues)")


def due_as_the_broker_stopped(faults, load, records, ids, stopping: float, back: float) -> set[str]:
    """Of ``ids``, the jobs of a classic work queue whose last attempt ran, failed, and was retried into
    a classic delay queue due between a second before the broker began to stop and its return."""
    found = set()
    for job_id in ids:
        job = load.jobs[job_id]
        runs = [r for r in records.of(job_id, "run") if r["task"].endswith(".work")]
        if job.kind != "classic" or not runs:
            continue
        last = max(runs, key=lambda r: r["att"])
        attempt = last["att"]
        failed = job.plan == "always" or (job.plan == "flaky" and attempt <= job.fails)
        if failed and attempt < faults.MAX_ATTEMPTS["work"]:
            due = last["t"] + faults.WORK_BACKOFF[attempt - 1]
            if stopping - 1.0 <= due <= back:
                found.add(job_id)
    return found


@ONLY_VERIFIED_ON_55
def test_broker_restart_while_retries_wait_loses_nothing(faults, fleet, broker, fdir, records):
    """1,000 tasks (500 per queue type where quorum runs) with mixed outcomes; ``rabbitmqctl stop_app`` /
    ``start_app`` while some run, some wait in delay queues and some are queued."""
    load = Workload(faults, broker, fdir, KINDS, seed=2)
    load.publish(1000 // len(KINDS))
    wait_for(lambda: len(load.ended()) >= len(load.jobs) // 4 and delayed_now(broker) >= 10, 60, 0.2,
             "a quarter of the tasks to end while retries wait in delay queues")
    before = {"ended": len(load.ended()), "delayed": delayed_now(broker)}
    stopping = time.time()
    outage = restart_broker_app()
    back = time.time()
    ended = load.wait(timeout=120, stall=40)
    text = fleet.text()
    assert text.count("rare_celery: managing") >= 2 * len(fleet.workers)  # topology declared again on reconnect
    stalled = ""
    if not ended and held_unacked_only(load):
        # A worker whose pool process is idle holds its prefetched messages and runs none of them: seen
        # about once in 20 runs under load, on Celery 5.7, when the connection dropped just as a task
        # ended (docs/faults.md, "A broker restart"). What the package answers for is that they are
        # not lost: a restarted worker gets them back, and they end once.
        stalled = f"; a worker stalled after the restart, holding {load.holding()}, and was restarted"
        fleet.stop()
        fleet.fill()
        ended = load.wait(timeout=60, stall=30)
    lost_by_broker = ""
    if not ended and load.in_flight() == 0:
        missing = load.jobs.keys() - load.ended()
        if missing and missing == due_as_the_broker_stopped(faults, load, records, missing, stopping, back):
            # bug F (docs/faults.md): RabbitMQ's classic delay queue dead-letters at most once, and drops a
            # retry that comes due as it stops. Reported, and left out of the count; any other loss fails
            lost_by_broker = f"; {len(missing)} retry due as the broker stopped, dropped by it (bug F)"
            for job_id in missing:
                del load.jobs[job_id]
            ended = True
    assert ended, f"not every task ended: {len(load.ended())}/{len(load.jobs)}; in queues: {load.holding()}"
    tallies = load.tally()
    report(tallies, f"broker restart ({outage:.1f} s outage; before it: {before['ended']} ended, "
                    f"{before['delayed']} waiting in delay queues{stalled}{lost_by_broker})")
    for t in tallies.values():
        assert t.ok, t.problems[:10]
        assert t.published == t.succeeded + t.bugged
        assert t.duplicated <= at_least_once_bound(fleet), (t.kind, t.duplicated)


@ONLY_VERIFIED_ON_55
def test_load_random_outcomes_through_two_worker_processes(faults, fleet, broker, fdir):
    """Item 7 in CI: 1,000 tasks per queue type, random outcomes (succeed, fail k times then succeed, always
    fail, Bug, fallback), two worker processes; the full 20,000-task run is bench/load.py."""
    assert len(fleet.workers) == 2 and all(w.proc.poll() is None for w in fleet.workers)
    load = Workload(faults, broker, fdir, KINDS, seed=7)
    load.publish(1000)
    assert load.wait(timeout=150, stall=30), f"not every task ended: {len(load.ended())}/{len(load.jobs)}; in queues: {load.holding()}"
    tallies = load.tally()
    report(tallies, "load")
    for t in tallies.values():
        assert t.ok, t.problems[:10]
        assert t.published == t.succeeded + t.bugged
        assert t.duplicated == 0  # no fault injected: exactly once
        assert set(t.bugs) <= {"bug", "exhausted"}
