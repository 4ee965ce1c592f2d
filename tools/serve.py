"""
`python -m tools.serve`: the BFF on 127.0.0.1:8003 in front of Triton, for `make serve` and `make demo`.

Settings are bff/settings.py's, with the flags on top; without --triton-url it starts a local Triton with the model
loaded. Without INTERNAL_API_KEY (or BFF_RUN_OPEN=1) it makes a random key for this run and prints it: a local
server is never open by accident.

    python -m tools.serve --model demo --model-repository model_repository
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import uvicorn

import bff
from bff import logs
from bff.app import create_app
from bff.settings import MissingKey, from_env, to_env
from tools.local_triton import BESIDE_BFF_PRIORITY, PRIORITIES, LocalTriton

README_PROMPT = "Why is the sky blue?"  # the request make serve/demo print, and the README shows


def curl_line(port: int, key: str | None) -> str:
    """The request to try; `key` is printed as given (a one-run key), or named as a variable (a key of yours)."""
    auth = f" -H \"X-Internal-API-Key: {key}\"" if key else ""
    body = json.dumps({"messages": [{"role": "user", "content": README_PROMPT}], "max_tokens": 64})
    return f"curl -N http://127.0.0.1:{port}/generate -H 'Content-Type: application/json'{auth} -d '{body}'"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model to serve (default: BFF_MODEL)")
    p.add_argument("--model-repository", help="default: BFF_MODEL_REPOSITORY, else model_repository")
    p.add_argument("--triton-url", help="use this Triton gRPC endpoint (host:port) instead of a local one")
    p.add_argument("--host", help="default: BFF_HOST, else 127.0.0.1")
    p.add_argument("--port", type=int, help="default: BFF_PORT, else 8003")
    p.add_argument("--triton-priority", choices=sorted(PRIORITIES), default=BESIDE_BFF_PRIORITY,
                   help="the local Triton's CPU priority (default %(default)s; tools/local_triton.py): idle keeps the "
                        "BFF answering at once while the model saturates the CPUs it shares with it")
    p.add_argument("--workers", type=int, help="run the production server, gunicorn with this many uvicorn "
                                               "workers (bff/gunicorn_conf.py), instead of one uvicorn process")
    a = p.parse_args(argv)
    logs.setup()
    # Ctrl-C and SIGTERM stop everything the same way, also in a process started with SIGINT ignored (a job
    # put in the background by a non-interactive shell is, and Python then installs no handler of its own)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)

    given = dict(model=a.model, model_repository=a.model_repository, host=a.host, port=a.port, workers=a.workers)
    overrides = {k: v for k, v in given.items() if v is not None}
    if a.triton_url:
        overrides["triton_urls"] = (a.triton_url,)
    shown = "$INTERNAL_API_KEY"  # a key from the environment is never printed
    try:
        settings = from_env(**overrides)
    except MissingKey:
        settings = from_env(**overrides, api_key=secrets.token_urlsafe(16))
        shown = settings.api_key
        print(f"INTERNAL_API_KEY is not set: using {shown} for this run")

    with contextlib.ExitStack() as stack:
        if not a.triton_url:
            triton = stack.enter_context(LocalTriton(settings.model_repository,
                                                     load=[settings.model] if settings.model else [],
                                                     priority=a.triton_priority))
            settings = dataclasses.replace(settings, triton_urls=(triton.grpc_url,),
                                           triton_metrics_urls=(triton.metrics_url,))
        print(f"BFF on http://{settings.host}:{settings.port} serving "
              f"{settings.model or '(the model Triton has loaded)'}; try:\n"
              f"  {curl_line(settings.port, None if settings.run_open else shown)}", flush=True)
        if a.workers:
            run_gunicorn(settings)
        else:
            uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                        timeout_graceful_shutdown=settings.graceful_timeout_s)


def run_gunicorn(settings) -> None:
    """gunicorn -c bff/gunicorn_conf.py bff.app:app with these settings, until it exits or Ctrl-C."""
    conf = Path(bff.__file__).parent / "gunicorn_conf.py"
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(conf), "bff.app:app"],
                            env={**os.environ, **to_env(settings)})
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)  # gunicorn's graceful stop: streams in flight may finish
        proc.wait()


if __name__ == "__main__":
    main()
