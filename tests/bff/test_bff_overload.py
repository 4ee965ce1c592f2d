"""
The BFF's overload and error answers against the live BFF and the real Triton (not as mappings): Triton's
queue full, the BFF's own stream limit, a swap to the model already served, and a Triton that cannot be
reached. Each is a clear status with a JSON `detail`, and a 503 says when to retry.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
import tritonclient.grpc.aio as grpcclient

from tests.backend.test_triton import long_prompt
from tests.bff.bffkit import AUTH, generate, run_bff, triton_settings
from tools.local_triton import free_port
from tools.stream_client import stream

pytestmark = pytest.mark.triton
BODY = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 4}


@contextlib.asynccontextmanager
async def slot_and_queue_taken(server, requests: int):
    """demo_1slot (one slot, one queue place) kept busy by direct Triton clients until the block ends."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    done = asyncio.Event()
    tasks = [asyncio.create_task(stream(client, "demo_1slot", long_prompt(), cancel_when=lambda r: done.is_set()))
             for _ in range(requests)]
    await asyncio.sleep(0.3)  # in the slot, and in the queue
    try:
        yield
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


def test_a_full_triton_queue_is_a_503_with_retry_after(triton_server):
    with run_bff(**triton_settings(triton_server, model="demo_1slot")) as url:

        async def scenario():
            async with slot_and_queue_taken(triton_server, 2), httpx.AsyncClient() as client:
                return await client.post(url + "/generate", json=BODY, headers=AUTH, timeout=30)

        r = asyncio.run(scenario())
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"].startswith("queue full: 1 slots busy and 1 requests waiting")
        assert generate(url, BODY)[0].status_code == 200  # and serves again once the queue drains


def test_the_stream_limit_is_a_503_until_a_stream_ends(triton_server):
    settings = triton_settings(triton_server, model="demo_1slot", max_streams=1, first_response_wait_s=0)
    with run_bff(**settings) as url:

        async def scenario():
            async with slot_and_queue_taken(triton_server, 1), httpx.AsyncClient() as client, \
                    client.stream("POST", url + "/generate", json=BODY, headers=AUTH, timeout=30) as first:
                assert first.status_code == 200  # queued in Triton: open, pinging
                return await client.post(url + "/generate", json=BODY, headers=AUTH, timeout=30)

        second = asyncio.run(scenario())
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert second.json() == {"detail": "1 streams are already running"}
        assert generate(url, BODY)[0].status_code == 200  # the first stream ended: room again
        stats = httpx.get(url + "/stats", headers=AUTH).json()["bff"]
        assert stats["errors"]["stream_limit"] == 1 and stats["streams"]["active"] == 0


def test_a_swap_to_the_current_model_changes_nothing(bff_url):
    r = httpx.post(bff_url + "/models/swap", json={"model_tag": "head"}, headers=AUTH)
    assert r.status_code == 202 and r.json() == {"status": "unchanged", "current_model": "head"}


def test_an_unreachable_triton_is_a_503_everywhere_and_not_ready():
    port = free_port()  # nothing listens there
    with run_bff(triton_urls=(f"127.0.0.1:{port}",), triton_metrics_urls=(f"http://127.0.0.1:{port}/metrics",),
                 model="head") as url:
        assert httpx.get(url + "/health").json() == {"status": "ok", "ready": False, "current_model": None}
        r, events = generate(url, BODY)
        assert r.status_code == 503 and events == [] and r.headers["retry-after"]
        swap = httpx.post(url + "/models/swap", json={"model_tag": "head"}, headers=AUTH, timeout=30)
        assert swap.status_code == 503 and "Triton is not reachable" in swap.json()["detail"]
