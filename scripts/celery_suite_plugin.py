"""pytest plugin for scripts/celery-suite: runs Celery's own integration suite with rare_celery.

Loaded with ``-p celery_suite_plugin`` after ``-p celery.contrib.pytest`` (a later plugin's fixture
wins), in both runs of the suite:

* ``RARE_SUITE_REDIS_DB=N``: the Redis connection of Celery's test helpers (``get_redis_connection``
  in t/integration/tasks.py, which always uses db 0) goes to db N, the run's own db, like the
  result backend (TEST_BACKEND);
* ``RARE_SUITE_BACKOFF=SECONDS`` (the rare run only): the app's ``task_cls`` is :class:`SuiteRareTask`,
  a ``rare_celery.RareTask`` whose back-off is SECONDS; nothing else changes.
"""

from __future__ import annotations

import os
import sys

import pytest

from rare_celery import RareTask

BACKOFF = os.environ.get("RARE_SUITE_BACKOFF")
REDIS_DB = os.environ.get("RARE_SUITE_REDIS_DB")


class SuiteRareTask(RareTask):
    """RareTask with a short back-off, as the base class of every task of the test apps."""

    backoff = float(BACKOFF) if BACKOFF else RareTask.backoff


def pytest_configure(config):
    if not REDIS_DB:
        return
    from t.integration import tasks

    original = tasks.get_redis_connection

    def get_redis_connection():
        redis = original()
        redis.connection_pool.connection_kwargs["db"] = int(REDIS_DB)
        return redis

    tasks.get_redis_connection = get_redis_connection
    conftest = sys.modules.get("t.integration.conftest")  # imported already: it has its own name for it
    if conftest is not None:
        conftest.get_redis_connection = get_redis_connection


if BACKOFF:
    @pytest.fixture(scope="session")
    def celery_parameters():
        return {"task_cls": f"{__name__}:SuiteRareTask"}
