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

# Docker images and compose for GPU nodes (docker/README.md). The work is done by docker itself.
DOCKER_TAG ?= latest
DOCKER_COMPOSE ?= docker compose -f docker/compose.yaml

.PHONY: docker-build docker-export docker-up docker-down

docker-build:
	docker build -f docker/triton.Dockerfile --target triton -t nanochat-triton:$(DOCKER_TAG) .
	docker build -f docker/triton.Dockerfile --target export -t nanochat-export:$(DOCKER_TAG) .
	docker build -f docker/bff.Dockerfile -t nanochat-bff:$(DOCKER_TAG) .

# Builds the TensorRT engine for MODEL (default d20) on this node's GPU, into the compose `models` volume.
docker-export:
	IMAGE_TAG=$(DOCKER_TAG) DEFAULT_MODEL=$(or $(MODEL),d20) $(DOCKER_COMPOSE) --profile export run --rm export

docker-up:
	IMAGE_TAG=$(DOCKER_TAG) DEFAULT_MODEL=$(or $(MODEL),d20) $(DOCKER_COMPOSE) up -d

docker-down:
	IMAGE_TAG=$(DOCKER_TAG) $(DOCKER_COMPOSE) down
