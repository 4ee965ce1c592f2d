"""Helpers for tests against the local Triton server."""

from __future__ import annotations

import asyncio
import time

import psutil

from backend.protocol import METRIC_ACTIVE_SLOTS, METRIC_QUEUE_DEPTH
from tools.measure import OUTCOME_TIMEOUT_S, metric, scrape


def stub_process(server, model: str) -> psutil.Process:
    """The Python backend stub that runs `model` (its one instance) under a LocalTriton."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return next(p for p in children if any(f"/{model}/1/model.py" in a for a in p.cmdline()))


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
