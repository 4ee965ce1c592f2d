# syntax=docker/dockerfile:1
# The BFF: Falcon ASGI app under gunicorn with the uvicorn worker, port 8003. Build from the repository root:
#   docker build -f docker/bff.Dockerfile -t nanochat-bff:latest .
# Two stages: `build` fills a venv; the final stage copies only that venv and the source, so pip's caches and
# any build tooling stay behind. Every dependency is a cp312 manylinux wheel (docker/constraints-bff.txt was
# resolved with --only-binary=:all:), so no compiler is needed in either stage.
# Python 3.12: the same minor version as the Triton image. trixie: Debian's current stable. Written out in both
# FROM lines (no ARG) so hadolint can check the image reference.
FROM python:3.12-slim-trixie AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY docker/constraints-bff.txt docker/
# The BFF and the two modules of the project it imports, standard library only: the backend's wire contract and
# core's config dialect (core/__init__.py imports nothing).
COPY backend/__init__.py backend/protocol.py backend/
COPY core/__init__.py core/config_fields.py core/
COPY bff/ bff/
# Installed in place (editable), so the code runs from this source tree, which the final stage copies to the
# same path. Exactly the bff extra; tests/deploy/test_images.py builds the same environment and serves from it.
# --only-binary: fail the build rather than compile anything.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --only-binary=:all: --constraint docker/constraints-bff.txt -e ".[bff]" \
    && /opt/venv/bin/python -c "import bff.app, bff.generate, bff.resources, bff.triton, uvicorn_worker, gunicorn"

FROM python:3.12-slim-trixie
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BFF_HOST=0.0.0.0 \
    BFF_PORT=8003 \
    BFF_MODEL_REPOSITORY=/models
RUN groupadd --gid 10001 bff \
    && useradd --uid 10001 --gid bff --no-create-home --shell /usr/sbin/nologin bff
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001
EXPOSE 8003

# The worker class (uvicorn_worker.UvicornWorker), timeouts and graceful shutdown live in bff/gunicorn_conf.py;
# the bind address is fixed here because inside a container it must be 0.0.0.0.
CMD ["gunicorn", "--config", "/app/bff/gunicorn_conf.py", "--bind", "0.0.0.0:8003", "bff.app:app"]

# /health needs no key and answers 200 whenever the BFF runs (the contract's shape); the container is healthy
# while it reports ready: Triton reachable and the current model READY.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import json, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8003/health', timeout=4); raise SystemExit(0 if json.load(r)['ready'] else 1)"]
