"""What users' own tools see of rare_celery, with real workers: Flower 2's HTTP API (its rows are
``celery.events.state``'s, fed by the workers' events) and OpenTelemetry (opentelemetry-
instrumentation-celery in the workers, the SDK's in-memory exporter in the publisher)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("flower")
pytest.importorskip("opentelemetry.instrumentation.celery")

from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import ROOT, Worker, app_module, restore_env, wait_for

APP = "tests.apps.observe"


@pytest.fixture(scope="module")
def observe(env):
    module, saved = app_module(APP, env)
    yield module
    restore_env(saved)


@pytest.fixture(scope="module")
def flower(observe, env, workdir):
    """Flower 2's HTTP API (unauthenticated, loopback), started before the worker: it hears every event."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = workdir / "flower.log"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", APP, "flower", f"--port={port}",
                             "--address=127.0.0.1"], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **env, "PYTHONPATH": str(ROOT), "FLOWER_UNAUTHENTICATED_API": "true"},
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"

    def up():
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2).read() == b"OK"
        except OSError:
            return False
    wait_for(up, 30, 0.2, "Flower to answer")
    yield api
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def worker(flower, observe, env, workdir):
    w = Worker(APP, ["observe", "observe.mail"], env, workdir, name="observe").wait_ready()
    ping = observe.ping.delay()  # Flower hears the worker: its event receiver is connected
    wait_for(lambda: row(flower, ping.id).get("state") == "SUCCESS", 30, 0.2, "Flower to see a task succeed")
    yield w
    w.stop()


def row(api: str, task_id: str) -> dict:
    try:
        return json.load(urllib.request.urlopen(f"{api}/task/info/{task_id}", timeout=5))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_flower_shows_when_a_delayed_start_and_the_next_attempt_are_due(observe, flower, worker):
    sent = time.time()
    later = observe.email.apply_async(("dana",), countdown=20)
    patient = observe.patient.delay()  # attempt 2 comes 20 s after attempt 1 failed
    waiting = wait_for(lambda: (r := row(flower, later.id)).get("state") == "WAITING" and r, 20, 0.2,
                       "Flower's row of the delayed start to say WAITING")
    assert waiting["name"] == "observe.email"
    assert abs(epoch(waiting["eta"]) - (sent + 20)) < 1.5, waiting  # when it comes back: the countdown's end
    retried = wait_for(lambda: (r := row(flower, patient.id)).get("state") == "RETRY" and r, 20, 0.2,
                       "Flower's row of the retried task to say RETRY")
    assert epoch(retried["eta"]) - retried["retried"] == pytest.approx(20, abs=1), retried


def test_flower_says_where_a_hop_went(observe, flower, worker):
    hopped = observe.sms.delay("erin")
    done = wait_for(lambda: (r := row(flower, hopped.id)).get("state") == "SUCCESS" and r, 30, 0.2,
                    "the hop's target to succeed")
    # the row ends as the target's: its name and its queue, not the first task's
    assert (done["name"], done["routing_key"], done["exception"]) == ("observe.email", "observe.mail", None)
    assert done["result"] == "'mailed erin'"


def spans(workdir: Path) -> list[dict]:
    path = workdir / "spans.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def publisher(observe):
    """The test process publishes traced too, into the SDK's in-memory exporter."""
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observe.app.set_current()  # the instrumentation finds a task by name in the current app
    CeleryInstrumentor().instrument(tracer_provider=provider)
    yield exporter
    CeleryInstrumentor().uninstrument()
    provider.shutdown()


def chain(workdir: Path, task_id: str, first: str, n_runs: int) -> list[dict]:
    """The worker spans of ``task_id``'s trace, from the run span back to ``first`` (a span id), once
    ``n_runs`` run spans have been exported."""
    def found():
        ours = [s for s in spans(workdir) if s["attributes"].get("messaging.message.id") == task_id
                or s["attributes"].get("celery.task_id") == task_id]
        return ours if sum(1 for s in ours if s["name"].startswith("run/")) >= n_runs else None
    return wait_for(found, 30, 0.2, f"{n_runs} run spans of {task_id}")


def path_to(all_spans: list[dict], leaf: dict, root: str) -> list[str]:
    """The names from ``leaf`` up its parents to the span ``root``."""
    by_id, names, at = {s["span"]: s for s in all_spans}, [], leaf
    while at is not None:
        names.append(at["name"])
        if at["parent"] == root:
            return names[::-1]
        at = by_id.get(at["parent"])
    raise AssertionError(f"{names} does not lead to the publish span")


def test_opentelemetry_sees_a_causal_chain_across_retries_waits_and_hops(observe, worker, workdir, publisher):
    flaky = observe.flaky.apply_async((1,))
    later = observe.ping.apply_async(countdown=2)
    hopped = observe.sms.delay("frank")
    sent = {s.attributes["messaging.message.id"]: s for s in publisher.get_finished_spans()
            if s.name.startswith("apply_async/")}
    assert set(sent) >= {flaky.id, later.id, hopped.id}

    def story(result, runs: int) -> tuple[list[str], list[dict]]:
        ours = chain(workdir, result.id, f"{sent[result.id].context.span_id:016x}", runs)
        root = sent[result.id]
        assert {s["trace"] for s in ours} == {f"{root.context.trace_id:032x}"}  # one trace, the publisher's
        last = max((s for s in ours if s["name"].startswith("run/")), key=lambda s: s["start"])
        return path_to(spans(workdir), last, f"{root.context.span_id:016x}"), ours

    names, ours = story(flaky, 2)  # attempt 1 -> its retry's publish -> attempt 2
    assert names == ["run/observe.flaky", "rare.retry/observe.flaky", "run/observe.flaky"]
    [retry] = [s for s in ours if s["name"] == "rare.retry/observe.flaky"]
    assert retry["kind"] == "PRODUCER" and retry["attributes"]["rare.attempt"] == 1
    assert retry["attributes"]["rare.delay"] == 1.0 and retry["attributes"]["rare.reason"] == "ConnectionError"
    assert sorted(s["attributes"].get("rare.attempt") for s in ours if s["name"].startswith("run/")) == [1, 2]

    names, _ = story(later, 1)  # the delayed start, sent round by the worker's main process
    assert names[-1] == "run/observe.ping" and set(names[:-1]) == {"rare.wait/observe.ping"}, names

    names, ours = story(hopped, 2)  # sms gives up -> the hop's publish -> email
    assert names == ["run/observe.sms", "rare.hop/observe.sms", "run/observe.email"]
    [hop] = [s for s in ours if s["name"] == "rare.hop/observe.sms"]
    assert hop["attributes"]["rare.reason"] == "exhausted" and hop["attributes"]["rare.hop_target"] == "observe.email"
