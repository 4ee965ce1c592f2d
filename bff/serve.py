"""
`python -m bff.serve`: the BFF on 127.0.0.1:8003 in front of Triton, for `make serve` and `make demo`.

Without --triton-url it starts a local Triton (runtime.local_triton) over the model repository with the
model loaded; with it, it uses that server (and loads the model there through the BFF's registry). Ctrl-C
stops uvicorn, then Triton. Without INTERNAL_API_KEY (and without BFF_RUN_OPEN=1) it makes a random key
for this run and prints it, so a local server is never open by accident.

    python -m bff.serve --model demo --model-repository model_repository
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets

import uvicorn

from bff import logs
from bff.app import create_app
from bff.settings import from_env


def curl_line(port: int, key: str | None) -> str:
    auth = f" -H 'X-Internal-API-Key: {key}'" if key else ""
    body = '{"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 64}'
    return f"curl -N http://127.0.0.1:{port}/generate -H 'Content-Type: application/json'{auth} -d '{body}'"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bff.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("BFF_MODEL"), help="model to serve (BFF_MODEL)")
    p.add_argument("--model-repository", default=os.environ.get("BFF_MODEL_REPOSITORY", "model_repository"))
    p.add_argument("--triton-url", help="use this Triton gRPC endpoint (host:port) instead of a local one")
    p.add_argument("--host", default=os.environ.get("BFF_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("BFF_PORT", "8003")))
    a = p.parse_args(argv)
    logs.setup()

    key = os.environ.get("INTERNAL_API_KEY")
    if not key and os.environ.get("BFF_RUN_OPEN", "0").lower() not in ("1", "true", "yes"):
        key = secrets.token_urlsafe(16)
        print(f"INTERNAL_API_KEY is not set: using {key} for this run")

    with contextlib.ExitStack() as stack:
        overrides = dict(model=a.model, model_repository=a.model_repository, host=a.host, port=a.port,
                         api_key=key)
        if a.triton_url:
            overrides["triton_urls"] = (a.triton_url,)
        else:
            from runtime.local_triton import LocalTriton

            triton = stack.enter_context(LocalTriton(a.model_repository, load=[a.model] if a.model else []))
            overrides.update(triton_urls=(triton.grpc_url,), triton_metrics_urls=(triton.metrics_url,))
        settings = from_env(**overrides)
        print(f"BFF on http://{a.host}:{a.port} serving {a.model or '(the model Triton has loaded)'}; try:\n"
              f"  {curl_line(a.port, key)}", flush=True)
        uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level="warning",
                    timeout_graceful_shutdown=settings.graceful_timeout_s)


if __name__ == "__main__":
    main()
