# The two commands: `make run` serves everything locally, `make test` runs lint + the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint format venv schema clean bench bench-quick lock

LOCKS := layers/deps/chat.lock layers/deps/login.lock

$(STAMP): requirements.txt requirements-dev.txt $(LOCKS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	# The functions' locked dependencies first (hash-checked: the versions the layers ship), then the tools.
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes $(addprefix -r ,$(LOCKS))
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

# The FC layer zips in build/layers/: the aichat package, and each function's locked deps for Python 3.11.
layer: $(STAMP)
	$(PY) dev/build_layers.py

# Publish the layers (a new version only when a zip's bytes changed), then deploy both functions on them.
deploy: $(STAMP) tools
	$(PY) dev/build_layers.py --publish
	set -a && . build/layers/arns.env && set +a && $(S) deploy -y -a "$${AICHAT_DEPLOY_ACCESS:-default}"

# Re-resolve each function's dependencies (layers/deps/*.in) into its hash lock; review the diff, then commit.
lock: $(STAMP)
	cd layers/deps && for f in chat login; do \
		../../$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
			--no-emit-index-url --no-emit-find-links --output-file $$f.lock $$f.in; done

# Regenerate the operator-facing DDL from the migrations (a test checks they agree).
schema: $(STAMP)
	PYTHONPATH=layers/common/python $(PY) -m aichat.manage ddl mysql > template/schema.mysql.sql
	PYTHONPATH=layers/common/python $(PY) -m aichat.manage ddl sqlite > template/schema.sqlite.sql

clean:
	rm -rf $(VENV) build .tools
