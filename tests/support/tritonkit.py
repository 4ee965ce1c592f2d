"""Helpers for tests against the local Triton server: a gRPC client around a coroutine, the requests the
tests send, the backend stub of a model, and a wait for its slots and queue to fill."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import httpx
import psutil
import tritonclient.grpc.aio as grpcclient

from backend.model_config import EngineConfig
from backend.protocol import METRIC_ACTIVE_SLOTS, METRIC_QUEUE_DEPTH, TOKENIZER_FILE, VERSION
from backend.sim_runner import write_sim_model
from tools.measure import OUTCOME_TIMEOUT_S, SERVER_TIMEOUT_S, metric, scrape
from tools.stream_client import make_inputs

T = TypeVar("T")
DEMO_MAX_SEQ = 256  # the session's demo models' context (tests/conftest.py)


def run(coro_fn: Callable[[grpcclient.InferenceServerClient], Awaitable[T]], server, timeout: float = 120.0) -> T:
    """coro_fn(client) with a gRPC client of `server`, closed after; fails past `timeout` seconds."""

    async def main():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return await asyncio.wait_for(coro_fn(client), timeout)
        finally:
            await client.close()

    return asyncio.run(main())


def greedy(**kw) -> list:
    return make_inputs(temperature=0.0, **kw)


def long_prompt() -> list:
    # 801 tokens before a stop token from demo_1slot's random weights (the longest run of seeds 1-60):
    # close to two seconds of its one slot, so tests that need it busy have a wide margin
    return make_inputs(prompt_ids=[5, 6, 7, 8], temperature=1.0, top_k=50, seed=10, max_tokens=1000)


@contextlib.contextmanager
def long_answers(server, name: str = "sim_long") -> Iterator[str]:
    """A simulated GPU (backend/sim_runner.py, d20 on an L4: ~5 ms a step) loaded in `server` for the block: it
    writes ordinary tokens until max_tokens, so 4,096 of them take 20 s or more however loaded the host is, and a
    test can leave or stop mid-answer without racing the answer's end."""
    repo = server.model_repository
    write_sim_model(repo, name, repo / "demo" / VERSION / TOKENIZER_FILE, "d20-l4", 2, 8192, EngineConfig())
    control = f"{server.http_url}/v2/repository/models/{name}"
    httpx.post(f"{control}/load", timeout=SERVER_TIMEOUT_S).raise_for_status()
    try:
        yield name
    finally:
        httpx.post(f"{control}/unload", timeout=SERVER_TIMEOUT_S).raise_for_status()


def command_line(process: psutil.Process) -> list[str]:
    """Its command line; empty for one that has exited (an unloaded model's stub is a zombie until Triton reaps
    it, and psutil refuses to read a zombie's)."""
    with contextlib.suppress(psutil.Error):
        return process.cmdline()
    return []


def stub_process(server, model: str) -> psutil.Process:
    """The Python backend stub that runs `model` (its one instance) under a LocalTriton."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return next(p for p in children if any(f"/{model}/1/model.py" in a for a in command_line(p)))


async def wait_busy(server, model: str, active: int, queued: int, timeout: float = OUTCOME_TIMEOUT_S) -> None:
    """Waits until the backend's metrics show `model` with `active` slots taken and `queued` requests waiting:
    requests sent a moment ago may not have reached the backend yet on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        text = await asyncio.to_thread(scrape, server.metrics_url)
        now = metric(text, METRIC_ACTIVE_SLOTS, model=model), metric(text, METRIC_QUEUE_DEPTH, model=model)
        if now == (active, queued):
            return
        assert time.monotonic() < deadline, f"{model}: (active, queued) is {now}, not {(active, queued)}"
        await asyncio.sleep(0.05)
