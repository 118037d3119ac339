# Two commands: `make demo` and `make test` (what CI runs). Each makes its own virtual environment.
PYTHON ?= python3
TOOLS := .venv-tools
DEMO := .venv-demo

$(TOOLS)/bin/tox:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip tox ruff

$(DEMO)/bin/rare-celery: setup.cfg
	$(PYTHON) -m venv $(DEMO)
	$(DEMO)/bin/pip install --quiet --upgrade pip
	$(DEMO)/bin/pip install --quiet -e .
	touch $@

.PHONY: test lint demo bench
test: $(TOOLS)/bin/tox
	$(TOOLS)/bin/ruff check rare_celery tests example_project bench
	$(TOOLS)/bin/tox -e celery54,celery57

lint: $(TOOLS)/bin/tox
	$(TOOLS)/bin/ruff check rare_celery tests example_project bench

demo: $(DEMO)/bin/rare-celery
	$(DEMO)/bin/python -m example_project.demo

bench: $(DEMO)/bin/rare-celery
	$(DEMO)/bin/pip install --quiet psutil
	$(DEMO)/bin/python bench/run.py
