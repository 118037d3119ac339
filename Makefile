# Two commands: `make demo` and `make test` (what CI runs, with test-rabbitmq43, test-rabbitmq4, test-quorum-vhost,
# test-cluster and soak).
# Each makes its own virtual environment.
PYTHON ?= python3
TOOLS := .venv-tools
DEMO := .venv-demo

# mypy (make lint, make test) reads the types click, Flask, prometheus_client and opentelemetry-api ship; Celery, kombu, billiard,
# amqp, vine and waitress ship none (pyproject.toml, [tool.mypy]).
TYPED := click flask prometheus_client opentelemetry-api

$(TOOLS)/bin/tox:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip tox ruff mypy $(TYPED)

# a tools venv made before mypy was part of make test
$(TOOLS)/bin/mypy: $(TOOLS)/bin/tox
	$(TOOLS)/bin/pip install --quiet --upgrade mypy $(TYPED)

$(DEMO)/bin/rare-celery: setup.cfg
	$(PYTHON) -m venv $(DEMO)
	$(DEMO)/bin/pip install --quiet --upgrade pip
	$(DEMO)/bin/pip install --quiet -e .
	touch $@

.PHONY: test test-rabbitmq4 test-rabbitmq43 test-quorum-vhost lint demo bench
test: $(TOOLS)/bin/tox $(TOOLS)/bin/mypy
	$(TOOLS)/bin/ruff check rare_celery tests example_project bench
	$(TOOLS)/bin/mypy rare_celery
	$(TOOLS)/bin/tox -e celery54,celery57

# RabbitMQ 4.0 (Debian 13's rabbitmq-server in a debootstrap root, 127.0.0.1:5690), newest Celery: in CI the
# tests of the topology, queue types and consumer timeouts, which changed between 3.10 and 4.3 (the whole suite
# runs on both), to keep CI near 40 minutes; RABBITMQ4_TESTS=tests for the whole suite. scripts/rabbitmq4 builds
# the root once (about a minute) and starts the node.
RABBITMQ4_TESTS ?= tests/integration/test_core.py tests/integration/test_topology.py \
	tests/integration/test_locks.py tests/integration/test_quorum.py
test-rabbitmq4: $(TOOLS)/bin/tox
	scripts/rabbitmq4 start
	PATH="$$(scripts/rabbitmq4 bin):$$PATH" RARE_TEST_HOST=127.0.0.1:5690 $(TOOLS)/bin/tox -e celery57 -- \
		$(RABBITMQ4_TESTS)

# The suite on RabbitMQ 4.3 (Debian sid's rabbitmq-server in a debootstrap root, 127.0.0.1:5691), newest
# Celery: the newest line, which CI runs beside 3.10. All of it but the tests no broker version changes (unit
# tests, the browser, the demo, Django, Flower and OpenTelemetry, the tools on a silent network, the web
# console's pages, the fuzzing of message contents, the operator CLI and Celery's own retry behaviours
# (test_drop_in.py)), which make test runs on 3.10, to keep CI near 40 minutes; RABBITMQ43_TESTS=tests for all of it.
RABBITMQ43_TESTS ?= tests/integration --ignore=tests/integration/test_web_browser.py \
	--ignore=tests/integration/test_demo.py --ignore=tests/integration/test_django.py \
	--ignore=tests/integration/test_hostile.py --ignore=tests/integration/test_observers.py \
	--ignore=tests/integration/test_web.py --ignore=tests/integration/test_fuzz.py \
	--ignore=tests/integration/test_cli.py --ignore=tests/integration/test_drop_in.py
test-rabbitmq43: $(TOOLS)/bin/tox
	scripts/rabbitmq4 start 4.3
	PATH="$$(scripts/rabbitmq4 bin 4.3):$$PATH" RARE_TEST_HOST=127.0.0.1:5691 $(TOOLS)/bin/tox -e celery57 -- \
		$(RABBITMQ43_TESTS)

# The soak (issue 29, tests/soak): a mixed workload through three workers while a seeded nemesis kills pool
# processes and workers, restarts the broker, cuts and stalls connections and holds back confirms; then an
# account of every message. On the RabbitMQ 4.3 node (the one it restarts; never the default node).
# CI runs the default, 3 minutes; SOAK_ARGS="--minutes 60 --seed 7" for a long one (docs/faults.md).
SOAK_ARGS ?= --minutes 3 --seed 1 --faults-every 10
.PHONY: soak
soak: $(TOOLS)/bin/tox
	scripts/rabbitmq4 start 4.3
	PATH="$$(scripts/rabbitmq4 bin 4.3):$$PATH" RARE_TEST_HOST=127.0.0.1:5691 $(TOOLS)/bin/tox -e celery57-soak -- \
		$(SOAK_ARGS)

# The core tests, unchanged, on a vhost whose default queue type is quorum (as Amazon MQ 4.2 makes them).
test-quorum-vhost: $(TOOLS)/bin/tox
	RARE_TEST_DEFAULT_QUEUE_TYPE=quorum $(TOOLS)/bin/tox -e celery57 -- tests/integration/test_core.py \
		tests/integration/test_chains.py

lint: $(TOOLS)/bin/tox $(TOOLS)/bin/mypy
	$(TOOLS)/bin/ruff check rare_celery tests example_project bench
	$(TOOLS)/bin/mypy rare_celery

demo: $(DEMO)/bin/rare-celery
	$(DEMO)/bin/python -m example_project.demo

bench: $(DEMO)/bin/rare-celery
	$(DEMO)/bin/pip install --quiet psutil
	$(DEMO)/bin/python bench/run.py

# Celery's own integration tests (t/integration test_tasks, test_canvas, test_inspect of the sdist of the
# Celery in .venv) with a plain Task and with RareTask; a report, see scripts/celery-suite --help.
# Its venv and the sdist live outside the checkout. SUITE_ARGS="--only rare -k test_retry" for a subset.
SUITE_CACHE ?= /var/tmp/rare-celery-suite
CELERY_VERSION ?= $(shell .venv/bin/python -c 'import celery; print(celery.__version__)' 2>/dev/null || echo 5.7.0)
SUITE_VENV ?= $(SUITE_CACHE)/venv-celery-$(CELERY_VERSION)
SUITE_ARGS ?=

$(SUITE_VENV)/.ready:
	$(PYTHON) -m venv $(SUITE_VENV)
	$(SUITE_VENV)/bin/pip install --quiet --upgrade pip
	$(SUITE_VENV)/bin/pip install --quiet celery==$(CELERY_VERSION) redis pydantic pytest pytest-timeout \
		pytest-rerunfailures
	touch $@

.PHONY: test-celery-suite
test-celery-suite: $(SUITE_VENV)/.ready
	RARE_CELERY_SUITE_CACHE=$(SUITE_CACHE) $(SUITE_VENV)/bin/python scripts/celery-suite $(SUITE_ARGS)

# Three RabbitMQ nodes clustered beside the default one (scripts/cluster): 4.3 from the sid root of scripts/rabbitmq4
# (127.0.0.1:5693-5695, built when missing), or RARE_CLUSTER_VERSION=3.10 for the host's 3.10 (127.0.0.1:5673-5675).
.PHONY: cluster cluster-stop test-cluster
cluster:
	scripts/cluster start

cluster-stop:
	scripts/cluster stop

# The cluster tests on the newest Celery; the cluster stays up afterwards (make cluster-stop stops it).
test-cluster: $(TOOLS)/bin/tox cluster
	RARE_REQUIRE_CLUSTER=1 $(TOOLS)/bin/tox -e celery57 -- tests/cluster
