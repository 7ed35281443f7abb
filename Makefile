# The two commands the README promises: `make run` and `make test`, from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/event-bridge run -c examples/bridge.toml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check bridge sources tests bench
	$(BIN)/ruff format --check bridge sources tests bench
	$(BIN)/mypy bridge

check: lint test

bench: $(STAMP)
	$(BIN)/python bench/python_runtime.py
	$(BIN)/python bench/timers.py
	$(BIN)/python bench/idle.py

clean:
	rm -rf $(VENV) build *.egg-info
