# Every target passes variables through to a Python entry point; the work is done there. `make help` lists them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
PYTEST_ARGS ?=
# Python writes the bytecode of what it imports: with PYTHONDONTWRITEBYTECODE set (as on this machine and in CI), every
# process compiled torch anew, 7 s of CPU an import on a slow VM against 2.6 s (docs/benchmarks.md)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help install test lint

help:  ## this list
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

install: $(VENV)/.installed  ## .venv with every extra (CPU torch, ONNX Runtime, the local Triton, the BFF, dev tools)

# uv installs what pip would resolve, four times faster here (12 s against 47 s: CI's first minute); it reads
# none of pip's settings, so pip's find-links (PIP_FIND_LINKS: the CPU torch wheel on this machine's disk) are
# passed on. Like --no-compile, it leaves bytecode to Python, which writes it for what it imports.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip uv
	$(BIN)/uv pip install -q --python $(BIN)/python $(foreach d,$(PIP_FIND_LINKS),--find-links $(d)) -e ".[$(EXTRAS)]"
	touch $@

lint: install  ## ruff
	$(BIN)/ruff check .

test: install lint  ## lint and the whole suite (starts and stops real Triton servers)
	$(BIN)/pytest $(PYTEST_ARGS)

# Docker images and compose for GPU nodes (docker/README.md). The work is done by docker itself.
DOCKER_TAG ?= latest
DOCKER_COMPOSE ?= docker compose -f docker/compose.yaml
# compose reads its variables from .env in its project directory, the folder of the first -f file
DOCKER_ENV := docker/.env

.PHONY: docker-build docker-env docker-export docker-up docker-down

docker-build:  ## the Triton, export and BFF images
	docker build -f docker/triton.Dockerfile --target triton -t nanochat-triton:$(DOCKER_TAG) .
	docker build -f docker/triton.Dockerfile --target export -t nanochat-export:$(DOCKER_TAG) .
	docker build -f docker/bff.Dockerfile -t nanochat-bff:$(DOCKER_TAG) .

docker-env: $(DOCKER_ENV)  ## docker/.env from docker/env.example with fresh keys (kept once written)

# Order-only: editing env.example later must not replace the keys the services and their callers hold.
$(DOCKER_ENV): | docker/env.example
	umask 077 && internal=$$(openssl rand -hex 32) && admin=$$(openssl rand -hex 32) && \
	  sed -e "s/^INTERNAL_API_KEY=$$/&$$internal/" -e "s/^TRITON_ADMIN_KEY=$$/&$$admin/" docker/env.example > $@.tmp
	mv $@.tmp $@

# MODEL is passed only when given, so DEFAULT_MODEL in docker/.env (else compose's d20) applies otherwise.
docker-export: $(DOCKER_ENV)  ## TensorRT engine for MODEL on this node's GPU, into the compose volume
	IMAGE_TAG=$(DOCKER_TAG) $(if $(MODEL),DEFAULT_MODEL=$(MODEL)) $(DOCKER_COMPOSE) --profile export run --rm export

docker-up: $(DOCKER_ENV)  ## Triton + the BFF with compose
	IMAGE_TAG=$(DOCKER_TAG) $(if $(MODEL),DEFAULT_MODEL=$(MODEL)) $(DOCKER_COMPOSE) up -d

# compose interpolates the whole file for every command: `down` needs no keys, so any stand-in passes the :? checks
docker-down:  ## stop them (no docker/.env needed)
	IMAGE_TAG=$(DOCKER_TAG) INTERNAL_API_KEY=$${INTERNAL_API_KEY:-unused} TRITON_ADMIN_KEY=$${TRITON_ADMIN_KEY:-unused} \
	  $(DOCKER_COMPOSE) down

# --- export: every option of `python -m export` is a make variable of the same name in capitals (MODEL=d20
#     SOURCE= STEP= CHECKPOINT_DIR= NANOCHAT_BASE_DIR= NAME= MODEL_REPOSITORY= RUNTIME= PRECISION= MAX_SLOTS=
#     MAX_SEQ= TOOL_CHANNEL= MAX_QUEUE= PREFILL_CHUNK= STREAM_INTERVAL= STREAM_INTERVAL_MS= MAX_RESPONSES_PER_S=
#     PREFIX_CACHE= TOOL_TIMEOUT_MS= UNHEALTHY_AFTER=
#     OVERRIDES="softcap=20 ..."
#     FORCE=1 VERIFY=0): make puts command-line variables in the environment, and --env reads them (export/options.py
#     defines them; `.venv/bin/python -m export --help` lists them).
# These run the venv's Python as it is (no reinstall), so an export never touches the environment.
.PHONY: export bench-export gpu-check

$(BIN)/python:
	@echo "no virtual environment at $(VENV): run 'make install' first" >&2; exit 2

export: $(BIN)/python  ## checkpoint -> ONNX (-> TensorRT) -> model_repository/ (MODEL=d20 ...)
	$(BIN)/python -m export --env

bench-export: $(BIN)/python  ## exported graph on ONNX Runtime vs the PyTorch core (same variables as export)
	$(BIN)/python -m tools.bench_export --env

gpu-check: $(BIN)/python  ## on a GPU: precision agreement, decode speed, MBU
	$(BIN)/python -m tools.gpu_check $(if $(NANOCHAT_BASE_DIR),--nanochat-base-dir "$(NANOCHAT_BASE_DIR)")

# --- the BFF: make serve MODEL=<name> [MODEL_REPOSITORY= TRITON_URL= PORT=8003 WORKERS=N (gunicorn, the
# production server, with N uvicorn workers) TRITON_PRIORITY=idle|normal (the local Triton's CPU priority,
# tools/local_triton.py)]; make demo; make bench.
# INTERNAL_API_KEY comes from the environment (serve prints a one-run key when it is unset).
.PHONY: serve demo bench bench-aiperf bench-prefix

DEMO_DIR ?= build/demo
DEMO_REPO := $(DEMO_DIR)/model_repository
SERVE_ARGS = $(if $(MODEL),--model "$(MODEL)") --model-repository "$(or $(MODEL_REPOSITORY),model_repository)" \
	$(if $(TRITON_URL),--triton-url "$(TRITON_URL)") $(if $(PORT),--port "$(PORT)") \
	$(if $(WORKERS),--workers "$(WORKERS)") $(if $(TRITON_PRIORITY),--triton-priority "$(TRITON_PRIORITY)")

serve: $(BIN)/python  ## Triton + the BFF on :8003 for MODEL
	$(BIN)/python -m tools.serve $(SERVE_ARGS)

# The demo model from nothing: a G4 checkpoint tagged "demo", trained for about a minute (tools/train_demo.py),
# exported into $(DEMO_REPO). Both are files make keeps: a second `make demo` starts at once.
DEMO_CKPT := $(DEMO_DIR)/nanochat/chatsft_checkpoints/demo/model_000000.pt

$(DEMO_CKPT): tools/train_demo.py tools/data/demo_chats.json core/data/demo_corpus.txt | install
	$(BIN)/python -m tools.train_demo --out $(DEMO_DIR)/nanochat

$(DEMO_REPO)/demo/config.pbtxt: $(DEMO_CKPT) core/gpt.py export/graph.py  # a graph that changed is exported again
	$(BIN)/python -m export --nanochat-base-dir $(DEMO_DIR)/nanochat --model demo --name demo \
		--model-repository $(DEMO_REPO) --force

demo: install $(DEMO_REPO)/demo/config.pbtxt  ## from nothing: a toy model trained for a minute, exported, served on CPU
	$(BIN)/python -m tools.serve --model demo --model-repository $(DEMO_REPO) $(if $(PORT),--port "$(PORT)") \
		$(if $(TRITON_PRIORITY),--triton-priority "$(TRITON_PRIORITY)")

# make bench measures the demo checkpoint exported with 16 slots (a repository of its own), so that 16 streams
# decode together instead of queueing for the demo's 8. It runs twice: all processes sharing every CPU, Triton
# at idle priority as make serve runs it, then (with 2+ CPUs) Triton on CPU 0 at normal priority and the BFF and
# the clients on the others, as on a GPU node, where the model's work does not compete with the BFF's (there,
# idle priority would only make Triton's own threads wait for each other's time slices). Then the head oracle (16
# slots) with 16 sampled streams, the batch's draw against the exact per-row path a seed forces, side by side.
BENCH_REPO := $(DEMO_DIR)/bench_repository
BENCH = $(BIN)/python -m tools.bench_bff --model demo --model-repository $(BENCH_REPO)

$(BENCH_REPO)/demo/config.pbtxt: $(DEMO_REPO)/demo/config.pbtxt
	$(BIN)/python -m export --nanochat-base-dir $(DEMO_DIR)/nanochat --model demo --name demo --max-slots 16 \
		--model-repository $(BENCH_REPO) --force

$(BENCH_REPO)/head/config.pbtxt:
	$(BIN)/python -m export --nanochat-base-dir $(ORACLE_DIR)/head --source base --name head --max-slots 16 \
		--model-repository $(BENCH_REPO) --force

bench: install $(BENCH_REPO)/demo/config.pbtxt $(BENCH_REPO)/head/config.pbtxt  ## the BFF's SSE vs Triton's gRPC stream, side by side
	$(BENCH) --plot $(DEMO_DIR)/bench_bff.png
	$(if $(filter-out 1,$(shell nproc)),$(BENCH) --triton-cpus 0 --triton-priority normal \
		--plot $(DEMO_DIR)/bench_bff_split.png)
	$(BIN)/python -m tools.bench_bff --model head --model-repository $(BENCH_REPO) --sampled --concurrency 16

# make bench-prefix: ten-turn chats through the BFF, the time to first token of each turn with prefix caching on
# and off, on the demo model and on the shared head oracle (exported into a repository of its own).
ORACLE_DIR ?= ../shared/oracle
PREFIX_REPO := build/prefix_repository

$(PREFIX_REPO)/head/config.pbtxt:
	$(BIN)/python -m export --nanochat-base-dir $(ORACLE_DIR)/head --source base --name head \
		--model-repository $(PREFIX_REPO) --force

bench-prefix: install $(DEMO_REPO)/demo/config.pbtxt $(PREFIX_REPO)/head/config.pbtxt  ## chat TTFT by turn: prefix cache on vs off
	$(BIN)/python -m tools.bench_prefix --model demo --model-repository $(DEMO_REPO)
	$(BIN)/python -m tools.bench_prefix --model head --model-repository $(PREFIX_REPO)

# make bench-sim: the host's cost per token at GPU speed without a GPU (tools/bench_sim.py): the scheduler alone and
# the real Triton + BFF, over a runner that takes a GPU profile's step time (PROFILE=d20-h100 | d20-l4 | zero).
.PHONY: bench-sim
bench-sim: install  ## host CPU per token and share of the device used, on a simulated GPU (PROFILE=d20-h100)
	$(BIN)/python -m tools.bench_sim $(if $(PROFILE),--profile "$(PROFILE)")

# make bench-aiperf: NVIDIA's AIPerf on the BFF's OpenAI surface and genai-perf on Triton's generate_stream, each
# from an environment of its own (pinned; their dependencies clash with ours and each other), offline.
# tritonclient's wheel carries the perf_analyzer that genai-perf drives (PyPI's perf-analyzer is a placeholder
# here); it needs libcudart (a pip wheel, also on CPU) and Debian's libb64-0d.
BENCH_ENVS := build/bench_envs
AIPERF_ENV := $(BENCH_ENVS)/aiperf
GENAI_PERF_ENV := $(BENCH_ENVS)/genai-perf

$(AIPERF_ENV)/.installed:
	$(PY) -m venv $(AIPERF_ENV)
	$(AIPERF_ENV)/bin/pip install -q aiperf==0.13.0 blobfile
	touch $@

$(GENAI_PERF_ENV)/.installed:
	$(PY) -m venv $(GENAI_PERF_ENV)
	$(GENAI_PERF_ENV)/bin/pip install -q genai-perf==0.0.16 "tritonclient[all]==2.51.0" "pandas<3" \
		nvidia-cuda-runtime-cu12 blobfile
	touch $@

bench-aiperf: install $(DEMO_REPO)/demo/config.pbtxt $(AIPERF_ENV)/.installed $(GENAI_PERF_ENV)/.installed  ## AIPerf and genai-perf, offline
	$(BIN)/python -m tools.bench_ecosystem --model demo --model-repository $(DEMO_REPO) \
		--aiperf $(AIPERF_ENV)/bin/aiperf --genai-perf $(GENAI_PERF_ENV)/bin/genai-perf

# --- the Triton backend: make triton MODEL=<name> [MODEL_REPOSITORY= GRPC_PORT=8001 HTTP_PORT=8000
# METRICS_PORT=8002]; make bench-backend [BENCH_BACKEND_ARGS="--max-tokens 64"].
.PHONY: triton bench-backend

triton: install  ## the local Triton alone (ports 8000-8002) with MODEL loaded
	$(BIN)/python -m tools.local_triton --model-repository "$(or $(MODEL_REPOSITORY),model_repository)" \
		$(foreach m,$(MODEL),--load "$(m)") $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) \
		$(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT))

bench-backend: install  ## the backend: continuous batching vs one request at a time
	$(BIN)/python -m tools.bench_backend $(BENCH_BACKEND_ARGS)
