# The two commands: `make run` serves everything locally, `make test` runs lint + the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint format venv schema clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) dev/run.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Regenerate the operator-facing DDL from the migrations (a test checks they agree).
schema: $(STAMP)
	PYTHONPATH=layers/common/python $(PY) -m aichat.manage ddl mysql > template/schema.mysql.sql
	PYTHONPATH=layers/common/python $(PY) -m aichat.manage ddl sqlite > template/schema.sqlite.sql

clean:
	rm -rf $(VENV) build .tools
