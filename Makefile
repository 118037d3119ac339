# Two commands: `make test` (what CI runs) and `make demo`. Each makes its own virtual environment.
PYTHON ?= python3
TOOLS := .venv-tools

$(TOOLS)/bin/tox:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip tox ruff

.PHONY: test lint
test: $(TOOLS)/bin/tox
	$(TOOLS)/bin/ruff check rare_celery tests
	$(TOOLS)/bin/tox -e celery54,celery57

lint: $(TOOLS)/bin/tox
	$(TOOLS)/bin/ruff check rare_celery tests
