# Every target passes variables through to a Python entry point; the work is done there.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,runtime,triton,serve,dev
PYTEST_ARGS ?=

.PHONY: install test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/pytest $(PYTEST_ARGS)
