# The two commands the README promises: `make run` and `make test`, from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check lint bench clean services

$(STAMP): setup.cfg pyproject.toml examples/plugins/redis-streams/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,test]'
	$(BIN)/pip install --quiet -e examples/plugins/redis-streams
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/event-bridge run -c examples/bridge.toml

test: $(STAMP) services
	$(BIN)/python -m pytest

# What the tests need beyond the venv. Kafka (tansu) and S3/SQS (moto) are started by the
# tests themselves; PostgreSQL, RabbitMQ and Redis run on these machines already.
services:
	@command -v systemd-analyze >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check bridge sources tests bench examples/plugins
	$(BIN)/ruff format --check bridge sources tests bench examples/plugins
	$(BIN)/mypy bridge sources

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
	$(BIN)/python bench/project_start.py

clean:
	rm -rf $(VENV) build *.egg-info
