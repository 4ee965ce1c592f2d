# syntax=docker/dockerfile:1
# Triton Inference Server with the `nanochat` Python-based backend, and (target `export`) the image that
# builds TensorRT engines on the GPU node that will serve them. Build from the repository root:
#   docker build -f docker/triton.Dockerfile --target triton -t nanochat-triton:latest .
#   docker build -f docker/triton.Dockerfile --target export -t nanochat-export:latest .
#
# Why 25.10: the gRPC stream-cancellation fix (25.04+; the BFF cancels on every client disconnect, and 25.01 crashed
# under such storms, docker/README.md), decoupled-model cancellation (23.10+), numpy 1 and 2 (24.11+; we install
# numpy 1.26.4 because the project pins numpy<2), and CUDA 13.0: PyPI's torch 2.13.0 is a CUDA 13.0 build, so the
# container and torch agree on the CUDA major (driver R580+). Ubuntu 24.04 with Python 3.12, the stub's Python, so
# packages go into that interpreter. TensorRT is the container's own (10.13.3); its Python API is PyPI's binary
# bindings of the same release, and the build checks the library it loads is that release.
# Bumping TRITON_RELEASE means bumping tensorrt-cu13-bindings in docker/constraints-gpu.txt to its TensorRT.
ARG TRITON_RELEASE=25.10

FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3 AS triton

# PIP_BREAK_SYSTEM_PACKAGES: the Python backend stub embeds the system Python 3.12, so the project is
# installed into that interpreter (Ubuntu 24.04 marks it externally managed).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/nanochat-triton
COPY pyproject.toml README.md ./
COPY docker/constraints-gpu.txt docker/
COPY core/ core/
COPY backend/ backend/
# Exactly the extras of the folders copied: core (torch, tiktoken, numpy) and backend (ONNX Runtime), plus
# TensorRT's Python API, wheels only, all pinned by the constraints. torch is PyPI's CUDA build: the backend's seeded
# sampling matches nanochat's torch.Generator, and the TensorRT runner keeps the KV cache in torch tensors.
# tests/deploy/test_image_dependencies.py resolves this line against PyPI; tests/deploy/test_images.py builds this
# environment (minus the bindings, which need the container's TensorRT) and serves a model from it.
# The smoke step imports what tritonserver's stub imports (the scheduler and both runners) and checks that the
# TensorRT bindings run on the container's libnvinfer of the same release.
# hadolint ignore=DL3013
RUN pip install --only-binary=:all: --constraint docker/constraints-gpu.txt ".[core,backend]" tensorrt-cu13-bindings \
    && python3 -c "import numpy, torch, backend.scheduler, backend.runner, backend.onnx_runner, backend.trt_runner; assert numpy.__version__.startswith('1.'), numpy.__version__" \
    && python3 -c "from backend.tensorrt_module import check_library; print('tensorrt', check_library())"

# A Python-based backend: every model whose config.pbtxt says `backend: "nanochat"` is served by this file.
COPY backend/model.py /opt/tritonserver/backends/nanochat/model.py

# A fixed numeric user, so Kubernetes can enforce runAsNonRoot and fsGroup can make the volume readable.
RUN groupadd --gid 10001 nanochat \
    && useradd --uid 10001 --gid nanochat --create-home --shell /usr/sbin/nologin nanochat \
    && mkdir -p /models \
    && chown nanochat:nanochat /models
USER 10001:10001

# The model repository is mounted here (compose volume, Kubernetes PVC); nothing is baked in.
VOLUME ["/models"]
EXPOSE 8000 8001 8002

# Explicit model control: the BFF loads and swaps models through the repository API. Extra arguments (CMD,
# compose `command`, Kubernetes `args`) are appended, e.g. --load-model=d20 so a fresh replica comes up serving.
# --exit-timeout-secs: on SIGTERM Triton waits this long for in-flight streams before exiting. The two gRPC
# flags accept the BFF's keepalive pings, and the exporter's configs need no auto-complete (backend/protocol.py
# TRITON_FLAGS: it would start an extra stub at every model load).
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "tritonserver", \
            "--model-repository=/models", \
            "--model-control-mode=explicit", \
            "--exit-timeout-secs=60", \
            "--grpc-keepalive-permit-without-calls=1", \
            "--grpc-http2-min-recv-ping-interval-without-data=5000", \
            "--disable-auto-complete-config"]
CMD []

# python3 is in the image (the stub needs it); curl may not be.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]


# `make export` on the GPU node: the same image (the same TensorRT and torch), plus ONNX for tracing.
FROM triton AS export

USER 0:0
# make: the export runs as `make export`, the same command a user types; python3-venv: Ubuntu 24.04's python3 has
# no ensurepip without it, so `python3 -m venv` below would stop. No pins for apt packages: the base image tag fixes
# the Ubuntu release, and the archive drops superseded versions, which would break pinned builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make python3-venv \
    && rm -rf /var/lib/apt/lists/*

COPY export/ export/
# A venv that sees the system packages above (torch, TensorRT, the project): `make export` runs $(VENV)/bin/python.
# The export extra adds ONNX and onnxscript to what the serving stage installed.
# hadolint ignore=DL3013
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --only-binary=:all: --constraint docker/constraints-gpu.txt ".[core,backend,export]" \
        tensorrt-cu13-bindings \
    && /opt/venv/bin/python -c "import export.pipeline, export.graph, export.tensorrt_build" \
    && /opt/venv/bin/python -m export --help > /dev/null

COPY Makefile ./
USER 10001:10001
ENV VENV=/opt/venv \
    MODEL_REPOSITORY=/models \
    NANOCHAT_BASE_DIR=/checkpoints

# The model repository and the checkpoints are mounted; arguments are make variables: MODEL=d20 PRECISION=fp16 ...
# (NANOCHAT_BASE_DIR and MODEL_REPOSITORY come from the environment above; make passes them to the CLI).
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "make", "VENV=/opt/venv", "export"]
CMD ["RUNTIME=tensorrt", "PRECISION=auto", "MODEL_REPOSITORY=/models"]
HEALTHCHECK NONE
