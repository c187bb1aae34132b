# dialproxy: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
DEMO_PORT ?= 8081

.PHONY: screenshots lock run test lint typecheck bench bench-instructions bench-hostile bench-reload validate install redis wrk browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --no-deps 'aidial-client==0.18.0'  # (see pyproject.toml)
	touch $(STAMP)

install: $(STAMP)

# The pinned versions of everything the tests, lint and typecheck use (after an upgrade).
lock: $(STAMP)
	{ echo "# Versions the suite, lint and typecheck were last run with (make install applies them as"; \
	  echo "# pip constraints). Refresh: make lock."; \
	  $(BIN)/pip freeze | grep -v "^-e \|^dialproxy\|^aidial-client\|^# Editable"; } > constraints.txt

# Serves aidial.config.json, with the demo model backend it points at.
run: $(STAMP)
	$(BIN)/dialproxy run-demo --config aidial.config.json --host $(HOST) --port $(PORT) --demo-port $(DEMO_PORT)

# The Redis tests and the bench's Redis mode need a real redis-server: install it when the
# machine has none.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing it with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { echo "redis-server is required for the tests and the bench"; exit 1; }

# The bench's load generator: wrk (C), so that the load takes a tenth of a core, not the half
# a Python client takes from the 2 cores the proxy is measured on. Installed when missing;
# without it (no apt-get), the bench falls back to bench/pyload.py.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "wrk not found: installing it with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) >/dev/null \
	  || echo "wrk could not be installed: the bench uses its Python load generator"; }

# The console's browser tests (tests/test_console_browser.py) drive Debian's chromium with
# Playwright: install it when the machine has none (never a browser Playwright downloads).
browser:
	@test -x /usr/bin/chromium || { \
	  echo "/usr/bin/chromium not found: installing Debian's chromium with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; }
	@test -x /usr/bin/chromium || { echo "Debian's chromium (/usr/bin/chromium) is required for the console tests"; exit 1; }

# The README's screenshots of the console, taken again by its browser tests.
screenshots: $(STAMP) browser
	DIALPROXY_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/test_console_browser.py

test: $(STAMP) redis browser
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The examples read upstream keys from the environment: dummy values stand in for them.
EXAMPLE_ENV := OPENAI_API_KEY=dummy AZURE_OPENAI_KEY_EAST=dummy AZURE_OPENAI_KEY_WEST=dummy \
	UPSTREAM_KEY_1=dummy UPSTREAM_KEY_2=dummy UPSTREAM_KEY_3=dummy UPSTREAM_KEY_4=dummy

validate: $(STAMP)
	$(BIN)/dialproxy validate --strict aidial.config.json
	@for f in config/openai.json config/azure.json config/local-vllm.json config/dial-sample.json; do \
	  env $(EXAMPLE_ENV) $(BIN)/dialproxy validate --strict $$f || exit 1; done
	env $(EXAMPLE_ENV) $(BIN)/dialproxy validate --strict config/split/models.json config/split/keys.json

# The pass-through floor on uvloop, the proxy with memory and with Redis counters (a
# redis-server of its own); `.venv/bin/python -m bench --no-redis` skips the latter.
bench: $(STAMP) redis wrk
	$(BIN)/python -m bench

# Instructions per request under valgrind's callgrind: steady where CPU time is noisy.
bench-instructions: $(STAMP)
	$(BIN)/python -m bench.instructions

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# What hostile clients cost: a gzip bomb's proxy CPU, p99 latency beside 500 slowloris connections.
bench-hostile: $(STAMP)
	$(BIN)/python -m bench.hostile

# What reloading a 10,000-key config costs: CPU of one build, throughput while it is rewritten.
bench-reload: $(STAMP)
	$(BIN)/python -m bench.reload
