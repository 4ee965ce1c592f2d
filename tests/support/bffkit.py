"""
Helpers for the BFF tests: a live BFF on a loopback port (real uvicorn in a thread of the test process)
and SSE reading the way the gateway does it: `data:` lines, JSON, token pieces concatenated, stop at done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import psutil
import uvicorn

import bff
from backend.protocol import FINISH_REASONS, METRIC_ACTIVE_SLOTS, METRIC_FINISHED
from bff.app import create_app
from bff.settings import from_env
from tools.local_triton import free_port
from tools.measure import OUTCOME_TIMEOUT_S, SERVER_TIMEOUT_S, metric

KEY = "test-internal-key"
AUTH = {"X-Internal-API-Key": KEY}


@contextlib.contextmanager
def run_bff(**overrides):
    """A live BFF on 127.0.0.1:<free port>; yields its base URL."""
    values = dict(api_key=KEY, port=free_port(), ping_interval_s=0.5, probe_interval_s=0.5)
    settings = from_env({}, **{**values, **overrides})
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the BFF did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def triton_settings(server, **overrides) -> dict:
    return dict(triton_urls=(server.grpc_url,), triton_metrics_urls=(server.metrics_url,),
                model_repository=str(server.model_repository), **overrides)


def parse_events(lines) -> list[dict]:
    """The gateway's parser: every `data:` line is one JSON event; stop after done."""
    events = []
    for line in lines:
        if line.startswith("data:"):
            event = orjson.loads(line[5:].strip())
            events.append(event)
            if event.get("done"):
                break
    return events


def generate(url: str, body: dict, headers: dict = AUTH, timeout: float = 60) -> tuple[httpx.Response, list]:
    """POST /generate and read the whole stream."""
    with httpx.stream("POST", url + "/generate", json=body, headers=headers, timeout=timeout) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r, parse_events(r.iter_lines())
        r.read()
        return r, []


async def stream_events(client: httpx.AsyncClient, url: str, body: dict, on_first_token=None) -> list[dict]:
    """One /generate's events, read as the gateway reads them; calls on_first_token() at its first token."""
    lines = []
    async with client.stream("POST", url + "/generate", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            lines.append(line)
            if on_first_token is not None and line.startswith('data: {"token"'):
                on_first_token()
                on_first_token = None
    return parse_events(lines)


def first_tokens(streams: int) -> tuple[Callable[[], None], asyncio.Event]:
    """An on_first_token for `streams` streams, and an event set once every one of them has streamed a token:
    what a test waits for before acting on running streams (a fixed sleep loses that race on a loaded host)."""
    started, seen = asyncio.Event(), [0]

    def on_first_token() -> None:
        seen[0] += 1
        if seen[0] == streams:
            started.set()

    return on_first_token, started


def is_done(event: dict) -> bool:
    """The BFF's done event: the answer is whole, with the finish reason and counts the backend gave."""
    return (event.get("done") is True and event.get("finish_reason") in ("stop", "length")
            and set(event) == {"done", "finish_reason", "usage", "dropped_turns"})


def text_of(events: list[dict]) -> str:
    return "".join(e["token"] for e in events if "token" in e)


def finished(server, model: str) -> dict[str, float]:
    """The backend's ended requests by finish reason, from Triton's /metrics."""
    return {reason: metric(server.metrics_url, METRIC_FINISHED, model=model, finish_reason=reason)
            for reason in FINISH_REASONS}


def loaded_models(server) -> list[str]:
    """The models READY in a Triton server, from its repository index."""
    index = httpx.post(f"{server.http_url}/v2/repository/index", json={"ready": True}, timeout=SERVER_TIMEOUT_S).json()
    return sorted(m["name"] for m in index)


def health(url: str) -> dict:
    """The BFF's GET /health."""
    return httpx.get(url + "/health", timeout=SERVER_TIMEOUT_S).json()


def stats(url: str) -> dict:
    """The BFF's GET /stats."""
    return httpx.get(url + "/stats", headers=AUTH, timeout=SERVER_TIMEOUT_S).json()


def model_ready(server, model: str) -> bool:
    """Whether a Triton server has `model` loaded and ready."""
    return httpx.get(f"{server.http_url}/v2/models/{model}/ready", timeout=SERVER_TIMEOUT_S).status_code == 200


def wait_until(condition, failure: str, timeout: float = OUTCOME_TIMEOUT_S) -> None:
    """Polls until `condition()` holds; fails with `failure` after `timeout` seconds (a bound on a hang, not a
    speed check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def assert_cancelled_and_freed(server, model: str, before: dict[str, float]) -> None:
    """The backend ended exactly one more request, as cancelled, and holds no slot."""
    wait_until(lambda: sum(finished(server, model).values()) > sum(before.values())
               and metric(server.metrics_url, METRIC_ACTIVE_SLOTS, model=model) == 0,
               "the backend request did not end or its slot was not freed")
    after = finished(server, model)
    assert {r: after[r] - before[r] for r in after} == {**dict.fromkeys(FINISH_REASONS, 0), "cancelled": 1}


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/health", timeout=2).json()["ready"]
    return False


@contextlib.contextmanager
def gunicorn(server, model: str = "head", workers: int = 1, graceful_s: float = 30, **env):
    """gunicorn -c bff/gunicorn_conf.py bff.app:app (the production server) with `workers` uvicorn workers,
    serving `model`; `env`: more BFF_* variables. Yields (process, url); process.log_tail() is its log's end."""
    port = free_port()
    env = {**os.environ, "INTERNAL_API_KEY": KEY, "BFF_TRITON_URLS": server.grpc_url,
           "BFF_TRITON_METRICS_URLS": server.metrics_url, "BFF_MODEL": model,
           "BFF_MODEL_REPOSITORY": str(server.model_repository), "BFF_HOST": "127.0.0.1", "BFF_PORT": str(port),
           "BFF_WORKERS": str(workers), "BFF_GRACEFUL_TIMEOUT_S": str(graceful_s), **env}
    conf = Path(bff.__file__).parent / "gunicorn_conf.py"
    # its log goes to a file: a pipe that nobody reads fills after a few hundred requests' access lines and
    # then blocks every worker that logs
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(conf), "bff.app:app"], env=env,
                                stderr=log, text=True)
        proc.log_tail = lambda chars=3000: (log.seek(0), log.read()[-chars:])[1]
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: proc.poll() is None and ready(url), "gunicorn did not serve the BFF", timeout=60)
            yield proc, url
        finally:
            if proc.poll() is None:
                for worker in psutil.Process(proc.pid).children(recursive=True):  # a killed master leaves them
                    worker.kill()
                proc.kill()
            proc.wait(10)
