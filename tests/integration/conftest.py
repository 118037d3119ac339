"""Fixtures for tests against the real RabbitMQ: one vhost per run, real worker subprocesses."""

from __future__ import annotations

import importlib
import os

import pytest

from tests.support import Events, Vhost, Worker, broker_cycle_lines


@pytest.fixture(scope="session", autouse=True)
def no_dead_letter_cycles():
    """The whole run routes every due message once: the broker's log gains no dead-letter cycle line
    (RabbitMQ drops a second copy it finds in a cycle; rare_celery must never make one)."""
    before = broker_cycle_lines()
    yield
    after = broker_cycle_lines()
    assert after == before, f"the broker's log gained {after - before} dead-letter cycle line(s) during the run"


@pytest.fixture(scope="session")
def vhost():
    v = Vhost()
    yield v
    v.delete()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("rare")


@pytest.fixture(scope="session")
def env(vhost, workdir):
    values = {"RARE_TEST_BROKER": vhost.url, "RARE_TEST_DIR": str(workdir)}
    os.environ.update(values)
    return values


@pytest.fixture(scope="session")
def core(env):
    """The test process's copy of tests.apps.core (to publish and read results)."""
    return importlib.import_module("tests.apps.core")


@pytest.fixture(scope="session")
def core_worker(core, env, workdir):
    worker = Worker("tests.apps.core", ["core", "core.wait"], env, workdir, name="core").wait_ready()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def events(workdir):
    return Events(workdir / "events.jsonl")


@pytest.fixture(scope="session")
def bugs(vhost):
    from tests.support import BugQueues

    return BugQueues(vhost.url)


# Time per module (setup, call and teardown, module-scoped workers included), printed after each run: what CI's
# 40 minutes are spent on, read from CI's own output when a step is to be cut or moved.
_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _MODULE_SECONDS:
        return
    terminalreporter.section("seconds per module")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {module}")
