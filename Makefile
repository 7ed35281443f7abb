# The two commands the README promises: `make run` and `make test`, from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# what running needs (the core only: the example uses a timer); the test toolchain is $(STAMP)
RUNSTAMP := $(VENV)/.run-installed

.PHONY: run test check lint bench clean services install dist docs chaos mutation

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "event-bridge needs Python >= 3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUNSTAMP): setup.cfg pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e .
	touch $(RUNSTAMP)

$(STAMP): setup.cfg pyproject.toml examples/plugins/redis-streams/pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[all,test]'
	$(BIN)/pip install --quiet -e examples/plugins/redis-streams
	touch $(RUNSTAMP) $(STAMP)

run: $(RUNSTAMP)
	@echo "event-bridge is in $(BIN): export PATH=\"$(CURDIR)/$(BIN):\$$PATH\" to use it from this shell"
	$(BIN)/event-bridge run -c examples/bridge.toml

# A venv under /opt/event-bridge, the unit, /etc/event-bridge with a working example.
# PREFIX, SYSCONFDIR, UNITDIR, BINDIR, DESTDIR and EXTRAS are passed on (see the script).
export PREFIX SYSCONFDIR UNITDIR BINDIR DESTDIR EXTRAS
install:
	PYTHON=$(PYTHON) sh scripts/install.sh

# A wheel and an sdist in dist/: `pip install dist/event_bridge-*.whl` works on any machine.
dist: | $(VENV)/bin/python
	$(BIN)/pip install --quiet build
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# The configuration reference, generated from the config models (a test checks it is current).
docs: $(RUNSTAMP)
	$(BIN)/python -m bridge.docgen > docs/configuration.md

test: $(STAMP) services
	$(BIN)/python -m pytest

# What the tests need beyond the venv. Kafka (tansu) and S3/SQS (moto) are started by the
# tests themselves; RabbitMQ and Redis are installed (apt) and started where missing, and
# the tests that need them fail, never skip, when they are not reachable.
services:
	@command -v systemd-analyze >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; }
	@$(PYTHON) tests/services.py
	@# the console's browser tests (Debian's chromium, never a downloaded browser) and promtool
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && command -v promtool >/dev/null; } || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver prometheus >/dev/null; }
	@# isolation = "sandbox" (tests/integration/test_sandbox.py)
	@command -v bwrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; }
	@# the chaos suite's wall-clock jump (tests/chaos/test_clock.py)
	@command -v faketime >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; }

# The whole chaos suite (every seed, the long fault windows, Kafka and SQS) and 2,000
# examples per fuzz test; the figures go to chaos-report.json (docs/reliability.md).
chaos: $(STAMP) services
	CHAOS_FULL=1 FUZZ_EXAMPLES=2000 CHAOS_REPORT=chaos-report.json \
		$(BIN)/python -m pytest -p no:cacheprovider --timeout 900 -s tests/chaos tests/fuzz

# Targeted mutants of the core modules against their tests; prints the survival rate.
mutation: $(STAMP)
	$(BIN)/python scripts/mutation.py

lint: $(STAMP)
	$(BIN)/ruff check bridge sources tests bench examples/plugins
	$(BIN)/ruff format --check bridge sources tests bench examples/plugins
	$(BIN)/mypy bridge sources
	$(BIN)/lint-imports

check: lint test

bench: $(STAMP)
	$(BIN)/python bench/python_runtime.py
	$(BIN)/python bench/timers.py
	$(BIN)/python bench/async_queue.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/idle.py
	$(BIN)/python bench/kafka_throughput.py
	$(BIN)/python bench/s3_latency.py
	$(BIN)/python bench/sqs_throughput.py
	$(BIN)/python bench/filesystem_throughput.py
	$(BIN)/python bench/console.py
	$(BIN)/python bench/logstore.py
	$(BIN)/python bench/isolation.py
	$(BIN)/python bench/project_start.py
	$(BIN)/python bench/postgres.py

clean:
	rm -rf $(VENV) build dist *.egg-info
