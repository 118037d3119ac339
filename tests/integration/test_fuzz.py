"""Issue 24: generated messages, random and adversarial (headers, bodies, properties), fed to the tools'
decoder and to a real worker's screening. Bounded and seeded: the same cases every run.

* the decoder (:func:`rare_celery.tools.records.read` and what the CLI and the console make of a record):
  :data:`DECODER_CASES` cases from hypothesis, never an exception, always JSON;
* the tools on the real broker: :data:`BROKER_CASES` generated messages in a bug queue: ``inspect-bugs``
  lists every one, in order, and ``purge-bugs --all`` deletes every one;
* the worker: the same generator's :data:`BROKER_CASES` messages naming the registered RareTask, published
  to its rare work queue served by a real ``celery worker``: the worker stays up and every message ends
  exactly once, run or in the bug queue with a reason.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import amqp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection

from rare_celery import headers as hdr
from rare_celery.tools import records
from rare_celery.tools.cli import row
from rare_celery.tools.web.app import pretty, shown
from tests.integration.test_cli import cli
from tests.support import Worker, wait_for

SEED = 24
DECODER_CASES = 1000
BROKER_CASES = 600
records.allow_deep_headers()  # as the tools do (set here: hypothesis keeps the limit it finds)
REASONS = {"exhausted", "expired", "bug", "no_handler", "hop_limit", "worker_lost", "time_limit", "unregistered",
           "rejected", "unroutable"}


# -- the decoder, with hypothesis ---------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=40),
                    st.binary(max_size=40), st.sampled_from(["\u202e", "\x1b[2J", "<script>", "", "x" * 3000]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=20)
keys = st.one_of(st.sampled_from(["id", "task", "compression", hdr.HOPS, hdr.REASON, hdr.ATTEMPTS, hdr.FAILED_AT,
                                  hdr.FIRST_AT, hdr.TASK, hdr.QUEUE, hdr.ERROR, hdr.EXCEPTION, hdr.TRACEBACK]),
                 st.text(max_size=20))
header_tables = st.one_of(st.none(), st.dictionaries(keys, values, max_size=8), st.just([1, 2]), st.just("x"))
bodies = st.one_of(st.binary(max_size=200), values.map(lambda v: json.dumps(v, default=repr).encode()),
                   st.tuples(values, values).map(lambda t: json.dumps([t[0], t[1], {}], default=repr).encode()),
                   st.just(b"[" * 5000 + b"]" * 5000), st.just(b'[[1], {"a": ' + b"[" * 200 + b"]" * 200 + b"}, {}]"))
properties = st.fixed_dictionaries({}, optional={
    "content_type": st.one_of(st.sampled_from(["application/json", "application/x-python-serialize", "text/plain"]),
                              st.text(max_size=20)),
    "content_encoding": st.sampled_from(["utf-8", "binary", "latin-1", "nonsense"]),
    "correlation_id": st.text(max_size=40), "message_id": st.text(max_size=40)})


def deepened(headers, depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return {**(headers if isinstance(headers, dict) else {}), "x-deep": value}


@settings(max_examples=DECODER_CASES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=bodies, props=properties, headers=header_tables, depth=st.sampled_from([0, 0, 0, 40, 2000]))
def test_the_tools_decoder_reads_any_message(body, props, headers, depth):
    if depth:
        headers = deepened(headers, depth)
    r = records.read("q.bugs", 0, body, props, headers)
    json.dumps(r.as_json(), default=str)  # what inspect-bugs --json prints
    row(r)  # what inspect-bugs prints
    records.fingerprint(body, props, headers)
    shown(pretty(r.args)) + shown(pretty(r.kwargs))  # the console's message page
    for value in records.shown_headers(headers).values():
        shown(pretty(value))
    assert r.body_error is None or r.args is None


# -- the generator of whole messages (seeded), for the broker tests ----------------------------------------

# (no NaN or infinity: RabbitMQ refuses a header table with one, INTERNAL_ERROR, so no worker meets it)
JUNK = [None, True, -1, 0, 1e300, -1e-300, 2**62, "x", "", [], {}, [[[1]]], {"a": {"b": [1]}},
        b"\xff\x00bytes", "\u202e\x1b[2J", "9" * 5000, "2000-01-01T00:00:00", "2999-01-01T00:00:00+00:00"]
CELERY_KEYS = ["retries", "timelimit", "shadow", "group", "group_index", "root_id", "parent_id", "argsrepr",
               "kwargsrepr", "origin", "ignore_result", "expires", "lang", "stamped_headers", "stamps",
               "replaced_task_nesting", "priority"]
RARE_KEYS = [hdr.ATTEMPT, hdr.FIRST_AT, hdr.DEADLINE, hdr.QUEUE, hdr.DELIVERIES, hdr.RETURNED, hdr.REQUEUED,
             hdr.HOPS, hdr.EXCEPTION, hdr.ERROR, hdr.TRACEBACK, hdr.REASON, hdr.ATTEMPTS, hdr.FAILED_AT, hdr.TASK]


def nested(rng: random.Random, depth: int):
    value: object = rng.choice(JUNK[:14])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def junk(rng: random.Random):
    return nested(rng, rng.choice([0, 0, 0, 1, 3, 33, 40]))


def generated(n: int, rng: random.Random, task: str = "fuzz.work") -> amqp.Message:
    """Case ``n``: a message naming ``task``, with a marker ``x-fuzz: n`` and whatever else the dice say."""
    task_id = f"fuzz-{n}-{rng.getrandbits(32):08x}"
    headers = {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
               "parent_id": None, "argsrepr": repr([n]), "kwargsrepr": "{}", "origin": "fuzz", "ignore_result": False}
    hostile = rng.random() < 0.6  # else only the body and the properties vary
    roll = rng.random() if hostile else 1.0
    if roll < 0.08:
        del headers["id"]
    elif roll < 0.12:
        headers["id"] = rng.choice([7, "", ["x"], {"a": 1}, None])
    for _ in range(rng.choice([0, 0, 1, 2, 3]) if hostile else 0):
        headers[rng.choice(CELERY_KEYS)] = junk(rng)
    for _ in range(rng.choice([0, 0, 1, 2, 3]) if hostile else 0):
        key = rng.choice(RARE_KEYS)
        value = junk(rng)
        if key in (hdr.DUE,) or (key == hdr.DEADLINE and isinstance(value, float) and math.isfinite(value)):
            continue  # a real future time would make it wait: not an ending within the test
        headers[key] = value
    for _ in range(rng.choice([0, 1, 2])):
        headers[rng.choice(["x-extra", "ünïcode", "x" * 200, "x-rare-unknown"])] = junk(rng)
    headers["x-fuzz"] = n
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    roll = rng.random()
    content_type, encoding = "application/json", "utf-8"
    if roll < 0.70:
        body = json.dumps([[n], {}, embed]).encode()
    elif roll < 0.76:
        body = b'[[1], {}, {"callbacks": nul'
    elif roll < 0.80:
        body = json.dumps({"hello": n}).encode()
    elif roll < 0.84:
        body, content_type, encoding = bytes(rng.getrandbits(8) for _ in range(64)), "application/octet-stream", "binary"
    elif roll < 0.88:
        body, content_type, encoding = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94.", \
            "application/x-python-serialize", "binary"
    elif roll < 0.92:
        body = json.dumps([[n], {"pad": "p" * 50_000}, embed]).encode()
    elif roll < 0.96:
        body = json.dumps([[n], {"deep": nested(rng, 300)}, embed], default=repr).encode()
    else:
        body, content_type = json.dumps([[n], {}, embed]).encode(), rng.choice(["", "text/plain", "application/yaml"])
    props = {"content_type": content_type, "content_encoding": encoding, "delivery_mode": rng.choice([1, 2]),
             "correlation_id": rng.choice([task_id, "", "\u202e" * 3]), "priority": rng.choice([0, 5, 255])}
    if rng.random() < 0.2:
        props["reply_to"] = rng.choice(["nowhere", "x" * 200])
    return amqp.Message(body, application_headers=headers, **props)


def publish_all(url: str, queue: str, messages: list[amqp.Message]) -> None:
    records.allow_deep_headers()  # to encode the deep ones
    with Connection(url) as conn:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False, passive=queue == "fuzz")
        for m in messages:
            channel.basic_publish_confirm(m, exchange="", routing_key=queue)
        channel.close()


def cases(count: int = BROKER_CASES) -> list[amqp.Message]:
    rng = random.Random(SEED)
    return [generated(n, rng) for n in range(count)]


# -- the tools, on the real broker ------------------------------------------------------------------------

def test_the_tools_list_and_purge_every_generated_message(vhost, env):
    queue = f"fuzz.t.{int(time.time())}.bugs"
    publish_all(vhost.url, queue, cases())
    ran = cli("--broker", vhost.url, "inspect-bugs", queue, "--json")
    assert ran.code == 0, ran.err[-2000:]
    listed = ran.json_lines()
    assert [r["position"] for r in listed] == list(range(BROKER_CASES))
    ran = cli("--broker", vhost.url, "purge-bugs", queue, "--all", "--yes")
    assert ran.code == 0 and f"deleted {BROKER_CASES} messages" in ran.out, ran.err[-2000:]


# -- the worker's screening, with a real worker --------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_worker(env, workdir):
    worker = Worker("tests.apps.fuzz", ["fuzz"], env, workdir, name="fuzz", concurrency=2).wait_ready()
    yield worker
    worker.stop()


def runs(workdir: Path) -> list[dict]:
    out = []
    for path in workdir.glob("fuzz-runs-*.jsonl"):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def test_every_generated_message_ends_once_and_the_worker_stays_up(vhost, env, workdir, fuzz_worker):
    messages = cases()
    started = time.monotonic()
    publish_all(vhost.url, "fuzz", messages)
    bugged: list = []

    def drain_bugs():
        with Connection(vhost.url) as conn:
            channel = conn.channel()
            channel.auto_decode = False
            bugged.extend(iter(lambda: channel.basic_get("fuzz.bugs", no_ack=True), None))

    def ended():
        assert fuzz_worker.proc.poll() is None, f"the worker died:\n{fuzz_worker.text()[-3000:]}"
        drain_bugs()
        return len(runs(workdir)) + len(bugged) >= BROKER_CASES
    wait_for(ended, 45, 0.5, "every generated message to end")
    time.sleep(1)  # a second ending of any of them would show now
    drain_bugs()
    ran = [r["n"] for r in runs(workdir)]
    in_bugs = [(m.headers or {}).get("x-fuzz") for m in bugged]
    assert all((m.headers or {}).get(hdr.REASON) in REASONS for m in bugged), \
        {(m.headers or {}).get(hdr.REASON) for m in bugged}
    ends = sorted(x for x in ran + in_bugs if isinstance(x, int))
    assert len(ran) + len(in_bugs) == len(ends) == BROKER_CASES and ends == list(range(BROKER_CASES)), (
        f"ran {len(ran)}, in the bug queue {len(in_bugs)}; missing "
        f"{sorted(set(range(BROKER_CASES)) - set(ends))[:20]}, twice {[n for n in set(ends) if ends.count(n) > 1][:20]}")
    assert fuzz_worker.proc.poll() is None
    print(f"fuzz: {BROKER_CASES} messages, {len(ran)} ran, {len(in_bugs)} in the bug queue, "
          f"{time.monotonic() - started:.1f} s", file=sys.stderr)
