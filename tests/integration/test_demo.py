"""The example project's demo, run as a user runs it (a shorter profile), its summary asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rare_celery.topology import is_delay_queue
from tests.support import ROOT, Vhost, drain


def run_demo(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RARE_BROKER_URL": url, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "example_project.demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=150, check=False)


@pytest.fixture
def own_vhost():
    """Delay queues are shared by a whole vhost: the demo gets one of its own to be counted alone."""
    vhost = Vhost()
    yield vhost
    vhost.delete()


def test_the_demo_accounts_for_every_task(own_vhost):
    vhost = own_vhost
    done = run_demo(vhost.url, "--profile", "ci", "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["published"] == 11 and summary["unaccounted"] == 0 and summary["as_expected"]
    assert (summary["succeeded"], summary["fell_back"], summary["in_bug_queue"]) == (9, 4, 2)
    assert summary["translate_max_in_flight"] <= 4  # never more requests in flight than tasks
    assert "rare-celery -A example_project inspect-bugs" in done.stdout
    assert "exhausted" in done.stdout and "bug" in done.stdout  # the inspect-bugs table

    stats = vhost.queue_stats()
    waiting = {q: s["ready"] + s["unacked"] for q, s in stats.items() if is_delay_queue(q)}
    assert waiting and not any(waiting.values()), waiting  # nothing left waiting in a delay queue
    bugs = {q: s["ready"] for q, s in stats.items() if q.endswith(".bugs") and s["ready"]}
    assert bugs == {"notify.push.bugs": 1, "translate.bugs": 1}
    reasons = sorted(m.headers["x-rare-reason"] for q in bugs for m in drain(vhost.url, q))
    assert reasons == ["bug", "exhausted"]


def test_the_demo_without_a_broker_says_how_to_start_one():
    done = run_demo("amqp://guest:s3cret@127.0.0.1:1//")
    assert done.returncode == 2
    assert "rabbitmq-server" in done.stderr and "docker run" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1
