# The two commands: `make run` serves everything locally, `make test` runs lint + the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint format venv schema clean bench bench-quick

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

test: lint tools
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (bench/README.md): figures against the targets, ratios measured in one run.
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) bench/run_all.py --quick $(BENCH_ARGS)

# --- deployment (docs/deploy.md) ---
S_VERSION := 3.1.10
FES_VERSION := 2.0.1
S         := .tools/node_modules/.bin/s
S_STAMP   := .tools/.s-$(S_VERSION)-fes-$(FES_VERSION)

.PHONY: tools layer deploy

# The Serverless Devs CLI, pinned, in git-ignored .tools/ (tests/test_deploy.py renders s.yaml with it), and
# @microsoft/fetch-event-source, the SSE client library whose retries tests/test_idempotency.py replays.
tools: $(S_STAMP)

$(S_STAMP):
	npm install --prefix .tools --no-audit --no-fund --save-exact @serverless-devs/s@$(S_VERSION) \
		@microsoft/fetch-event-source@$(FES_VERSION)
	touch $@

# The two FC layer zips in build/layers/ (code: the aichat package; deps: requirements.txt for Python 3.10).
layer: $(STAMP)
	$(PY) dev/build_layers.py

# Publish the layers (a new version only when a zip's bytes changed), then deploy both functions on them.
deploy: $(STAMP) tools
	$(PY) dev/build_layers.py --publish
	set -a && . build/layers/arns.env && set +a && $(S) deploy -y -a "$${AICHAT_DEPLOY_ACCESS:-default}"

# Regenerate the operator-facing DDL from the migrations (a test checks they agree).
schema: $(STAMP)
	PYTHONPATH=layers/common/python $(PY) -m aichat.manage ddl mysql > template/schema.mysql.sql
	PYTHONPATH=layers/common/python $(PY) -m aichat.manage ddl sqlite > template/schema.sqlite.sql

clean:
	rm -rf $(VENV) build .tools
