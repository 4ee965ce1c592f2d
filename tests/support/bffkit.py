"""
Helpers for the BFF tests beside the client kit (tools/bff_client.py): what a done event holds, waiting for
streams to start and for a condition, and what the backend's metrics and Triton's repository say.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from backend.protocol import FINISH_REASONS, METRIC_ACTIVE_SLOTS, METRIC_FINISHED
from tools.measure import OUTCOME_TIMEOUT_S, SERVER_TIMEOUT_S, metric


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


def finished(server, model: str) -> dict[str, float]:
    """The backend's ended requests by finish reason, from Triton's /metrics."""
    return {reason: metric(server.metrics_url, METRIC_FINISHED, model=model, finish_reason=reason)
            for reason in FINISH_REASONS}


def loaded_models(server) -> list[str]:
    """The models READY in a Triton server, from its repository index."""
    index = httpx.post(f"{server.http_url}/v2/repository/index", json={"ready": True}, timeout=SERVER_TIMEOUT_S).json()
    return sorted(m["name"] for m in index)


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
