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

# --- export: make export MODEL=d20 [SOURCE= STEP= CHECKPOINT_DIR= NAME= RUNTIME=auto|tensorrt|onnx
#     PRECISION=fp32|fp16|bf16 MAX_SLOTS= MAX_SEQ= MAX_QUEUE= PREFILL_CHUNK= STREAM_INTERVAL=
#     MODEL_REPOSITORY= FORCE=1
#     NANOCHAT_BASE_DIR=]; defaults and meanings: `.venv/bin/python -m export --help`.
# These run the venv's Python as it is (no reinstall), so an export never touches the environment.
.PHONY: export bench-export gpu-check

EXPORT_ARGS = $(if $(MODEL),--model "$(MODEL)") $(if $(SOURCE),--source "$(SOURCE)") \
	$(if $(STEP),--step "$(STEP)") $(if $(CHECKPOINT_DIR),--checkpoint-dir "$(CHECKPOINT_DIR)") \
	$(if $(NAME),--name "$(NAME)") $(if $(RUNTIME),--runtime "$(RUNTIME)") \
	$(if $(PRECISION),--precision "$(PRECISION)") $(if $(MAX_SLOTS),--max-slots "$(MAX_SLOTS)") \
	$(if $(MAX_SEQ),--max-seq "$(MAX_SEQ)") $(if $(MAX_QUEUE),--max-queue "$(MAX_QUEUE)") \
	$(if $(PREFILL_CHUNK),--prefill-chunk "$(PREFILL_CHUNK)") $(if $(STREAM_INTERVAL),--stream-interval "$(STREAM_INTERVAL)") \
	$(if $(MODEL_REPOSITORY),--model-repository "$(MODEL_REPOSITORY)") \
	$(if $(NANOCHAT_BASE_DIR),--nanochat-base-dir "$(NANOCHAT_BASE_DIR)") \
	$(if $(filter 1 true yes,$(FORCE)),--force)

$(BIN)/python:
	@echo "no virtual environment at $(VENV): run 'make install' first" >&2; exit 2

export: $(BIN)/python
	$(BIN)/python -m export $(EXPORT_ARGS)

bench-export: $(BIN)/python
	$(BIN)/python -m export.bench $(EXPORT_ARGS)

gpu-check: $(BIN)/python
	$(BIN)/python -m export.gpu_check $(if $(NANOCHAT_BASE_DIR),--nanochat-base-dir "$(NANOCHAT_BASE_DIR)")

# --- the BFF: make serve MODEL=<name> [MODEL_REPOSITORY= TRITON_URL= PORT=8003]; make demo; make bench.
# INTERNAL_API_KEY comes from the environment (serve prints a one-run key when it is unset).
.PHONY: serve demo bench

DEMO_DIR ?= build/demo
DEMO_REPO := $(DEMO_DIR)/model_repository
SERVE_ARGS = $(if $(MODEL),--model "$(MODEL)") --model-repository "$(or $(MODEL_REPOSITORY),model_repository)" \
	$(if $(TRITON_URL),--triton-url "$(TRITON_URL)") $(if $(PORT),--port "$(PORT)")

serve: $(BIN)/python
	$(BIN)/python -m bff.serve $(SERVE_ARGS)

# The demo model from nothing: a G4 checkpoint tagged "demo", exported into $(DEMO_REPO).
$(DEMO_REPO)/demo/config.pbtxt: | install
	$(BIN)/python -m runtime.demo --out $(DEMO_DIR)/nanochat
	$(BIN)/python -m export --nanochat-base-dir $(DEMO_DIR)/nanochat --model demo --name demo \
		--model-repository $(DEMO_REPO) --force

demo: install $(DEMO_REPO)/demo/config.pbtxt
	$(BIN)/python -m bff.serve --model demo --model-repository $(DEMO_REPO) $(if $(PORT),--port "$(PORT)")

# make bench measures the demo checkpoint exported with 16 slots (a repository of its own), so that 16 streams
# decode together instead of queueing for the demo's 8. It runs twice: all processes sharing every CPU, then
# (with 2+ CPUs) Triton on CPU 0 and the BFF and the clients on the others, as on a GPU node, where the model's
# work does not compete with the BFF's.
BENCH_REPO := $(DEMO_DIR)/bench_repository
BENCH = $(BIN)/python -m bff.bench --model demo --model-repository $(BENCH_REPO)

$(BENCH_REPO)/demo/config.pbtxt: $(DEMO_REPO)/demo/config.pbtxt
	$(BIN)/python -m export --nanochat-base-dir $(DEMO_DIR)/nanochat --model demo --name demo --max-slots 16 \
		--model-repository $(BENCH_REPO) --force

bench: install $(BENCH_REPO)/demo/config.pbtxt
	$(BENCH) --plot $(DEMO_DIR)/bench_bff.png
	$(if $(filter-out 1,$(shell nproc)),$(BENCH) --triton-cpus 0 --plot $(DEMO_DIR)/bench_bff_split.png)

# --- the Triton backend: make triton MODEL=<name> [MODEL_REPOSITORY= GRPC_PORT=8001 HTTP_PORT=8000
# METRICS_PORT=8002]; make bench-backend [BENCH_BACKEND_ARGS="--max-tokens 64"].
.PHONY: triton bench-backend

triton: install
	$(BIN)/python -m runtime.local_triton --model-repository "$(or $(MODEL_REPOSITORY),model_repository)" \
		$(foreach m,$(MODEL),--load "$(m)") $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) \
		$(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT))

bench-backend: install
	$(BIN)/python -m runtime.bench_backend $(BENCH_BACKEND_ARGS)
