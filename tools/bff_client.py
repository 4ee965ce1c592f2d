"""
The BFF's client kit for the tools and the tests: one key, the gateway's SSE reader (each `data:` line is one
JSON event, tokens concatenate, `done` ends the answer) and two launchers sharing one settings builder: uvicorn
in a thread here, or a process of its own (uvicorn, or gunicorn as in production).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import aiohttp
import httpx
import orjson
import psutil
import uvicorn

import bff
from bff.app import create_app
from bff.settings import Settings, from_env, to_env
from tools.local_triton import free_port
from tools.measure import OUTCOME_TIMEOUT_S, SERVER_TIMEOUT_S

KEY = "bff-client-one-run-key"  # at least 16 characters, as the BFF requires
AUTH = {"X-Internal-API-Key": KEY}
GUNICORN_CONF = Path(bff.__file__).parent / "gunicorn_conf.py"


def event(line: str | bytes) -> dict | None:
    """One line of a stream: a `data:` line is one JSON event; a `: ping` comment or a blank line is none."""
    return orjson.loads(line[5:]) if line[:5] in ("data:", b"data:") else None


def unfailed_event(line: str | bytes) -> dict | None:
    """event(line), an error event raised as RuntimeError: a measured stream must not fail."""
    if (e := event(line)) is not None and "error" in e:
        raise RuntimeError(f"the stream failed: {e}")
    return e


def parse_events(lines: Iterable[str | bytes]) -> list[dict]:
    """The gateway's parser: the events of a stream's lines, up to and with its done event."""
    out = []
    for line in lines:
        if (e := event(line)) is not None:
            out.append(e)
            if e.get("done"):
                break
    return out


def text_of(events: Iterable[dict]) -> str:
    return "".join(e["token"] for e in events if "token" in e)


def generate(url: str, body: dict, headers: dict = AUTH, timeout: float = 60) -> tuple[httpx.Response, list[dict]]:
    """POST /generate and read the whole stream (no events when the answer is not a stream)."""
    with httpx.stream("POST", url + "/generate", json=body, headers=headers, timeout=timeout) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r, parse_events(r.iter_lines())
        r.read()
        return r, []


async def stream_events(client: httpx.AsyncClient, url: str, body: dict,
                        on_first_token: Callable[[], None] | None = None) -> list[dict]:
    """One /generate's events, read as the gateway reads them; calls on_first_token() at its first token."""
    lines = []
    async with client.stream("POST", url + "/generate", json=body, headers=AUTH, timeout=120) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            lines.append(line)
            if on_first_token is not None and "token" in (event(line) or {}):
                on_first_token()
                on_first_token = None
    return parse_events(lines)


@dataclasses.dataclass
class Answer:
    """One /generate as the gateway reads it: the tokens concatenated, and when they came."""

    text: str
    tokens: int  # token events
    first_s: float  # seconds from the request to the first token event
    last_s: float  # ... to the last one
    done: dict | None  # the done event; None when the stream ended without one


def generate_sse(client: httpx.Client, url: str, body: dict) -> Answer:
    """POST /generate and read its events to the end; an error event raises RuntimeError."""
    start, times, seen = time.perf_counter(), [], []
    with client.stream("POST", url + "/generate", json=body, headers=AUTH) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if (e := unfailed_event(line)) is not None:
                seen.append(e)
                if "token" in e:
                    times.append(time.perf_counter() - start)
    done = next((e for e in seen if e.get("done")), None)
    return Answer(text_of(seen), len(times), times[0] if times else 0.0, times[-1] if times else 0.0, done)


async def token_times(client: aiohttp.ClientSession, url: str, body: dict) -> list[float]:
    """POST /generate and the perf_counter() of each token event (aiohttp: less CPU per event than
    httpx, which on a shared machine is taken from the server's); an error event raises RuntimeError."""
    times = []
    async with client.post(url + "/generate", json=body, headers=AUTH) as r:
        r.raise_for_status()
        async for line in r.content:
            if "token" in (unfailed_event(line) or {}):
                times.append(time.perf_counter())
    return times


def health(url: str, timeout: float = SERVER_TIMEOUT_S) -> dict:
    """The BFF's GET /health."""
    return httpx.get(url + "/health", timeout=timeout).json()


def ready(url: str) -> bool:
    """Whether a BFF answers at `url` and can serve; False while it starts."""
    with contextlib.suppress(httpx.HTTPError):
        return health(url, timeout=2)["ready"]
    return False


def stats(url: str) -> dict:
    """The BFF's GET /stats."""
    return httpx.get(url + "/stats", headers=AUTH, timeout=SERVER_TIMEOUT_S).json()


def triton_settings(triton, **overrides) -> dict:
    """The settings that put a BFF in front of `triton` (a tools.local_triton.LocalTriton); overrides win."""
    return dict(triton_urls=(triton.grpc_url,), triton_metrics_urls=(triton.metrics_url,),
                model_repository=str(triton.model_repository), **overrides)


def bff_settings(**overrides) -> Settings:
    """A BFF's settings with this kit's key on a free loopback port; `overrides` (Settings' fields) win, and the
    environment of this process is not read."""
    return from_env({}, **{"api_key": KEY, "port": free_port(), **overrides})


@contextlib.contextmanager
def run_bff(**overrides) -> Iterator[str]:
    """A live BFF, uvicorn in a thread of this process; yields its base URL."""
    # probes and pings twice a second: tests wait on them
    settings = bff_settings(**{"ping_interval_s": 0.5, "probe_interval_s": 0.5, **overrides})
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
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
        yield f"http://{settings.host}:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def bff_process(gunicorn: bool = False, **overrides) -> Iterator[tuple[subprocess.Popen, str]]:
    """A BFF in a process of its own, ready to serve: uvicorn, or gunicorn -c bff/gunicorn_conf.py (the production
    server, `workers` uvicorn workers). Yields (process, base URL); process.log_tail() is the end of its log."""
    settings = bff_settings(**overrides)
    url = f"http://{settings.host}:{settings.port}"
    command = ["gunicorn", "-c", str(GUNICORN_CONF), "bff.app:app"] if gunicorn else [
        "uvicorn", "bff.app:app", "--host", settings.host, "--port", str(settings.port), "--log-level", "warning",
        "--no-access-log"]
    # its log goes to a file: a pipe that nobody reads fills after a few hundred requests' access lines and
    # then blocks every worker that logs
    # a temp dir of its own: what the server leaves there when it is killed (gunicorn's metrics directory) goes too
    with tempfile.TemporaryFile("w+") as log, tempfile.TemporaryDirectory(prefix="bff-process-") as tmp:
        proc = subprocess.Popen([sys.executable, "-m", *command], env={**os.environ, **to_env(settings), "TMPDIR": tmp},
                                stderr=log, text=True)
        proc.log_tail = lambda chars=3000: (log.seek(0), log.read()[-chars:])[1]
        proc.tmpdir = Path(tmp)
        try:
            deadline = time.monotonic() + 60
            while not ready(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the BFF did not become ready: {proc.log_tail()}")
                time.sleep(0.05)
            yield proc, url
        finally:
            if proc.poll() is None:
                for worker in psutil.Process(proc.pid).children(recursive=True):  # a killed master leaves them
                    worker.kill()
                proc.kill()
            proc.wait(10)
