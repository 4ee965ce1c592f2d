"""
Model swaps through the BFF against a Triton server of their own (swaps unload models): a swap while 8
streams run lets all 8 finish and sends new streams to the new model; a failed load leaves the old model
serving; the current model is read back from Triton by a restarted BFF.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.bff.bffkit import (
    AUTH,
    generate,
    is_done,
    metric,
    parse_events,
    run_bff,
    text_of,
    triton_settings,
    wait_until,
)
from tools.local_triton import LocalTriton, derive_model

pytestmark = pytest.mark.triton
LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "max_tokens": 120}


@pytest.fixture(scope="module")
def swap_triton(oracle_repository):
    derive_model(oracle_repository, "demo", "demo_b")
    broken = derive_model(oracle_repository, "demo", "demo_broken")
    onnx = broken / "1" / "model.onnx"
    onnx.unlink()
    onnx.write_bytes(b"not an onnx graph")
    with LocalTriton(oracle_repository, load=["demo"]) as server:
        yield server


async def _stream(client: httpx.AsyncClient, url: str) -> list[dict]:
    async with client.stream("POST", url + "/generate", json=LONG, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        return parse_events([line async for line in r.aiter_lines()])


def _wait_unloaded(server, model: str, timeout: float = 30) -> None:
    wait_until(lambda: httpx.get(f"{server.http_url}/v2/models/{model}/ready").status_code != 200,
               f"{model} was never unloaded", timeout)


def test_swap_while_streams_run(swap_triton):
    with run_bff(**triton_settings(swap_triton, model="demo")) as url:
        reference = text_of(generate(url, LONG)[1])

        async def scenario():
            async with httpx.AsyncClient() as client:
                streams = [asyncio.create_task(_stream(client, url)) for _ in range(8)]
                await asyncio.sleep(0.3)  # streams are running (4 slots) or queued in Triton
                swap = await client.post(url + "/models/swap", json={"model_tag": "demo_b"}, headers=AUTH,
                                         timeout=60)
                after = await _stream(client, url)
                return swap, await asyncio.gather(*streams), after

        swap, results, after = asyncio.run(scenario())
        assert swap.status_code == 202
        assert swap.json() == {"status": "draining", "current_model": "demo_b"}
        for events in results:  # every stream on the old model ran to its end, untouched
            assert is_done(events[-1])
            assert text_of(events) == reference
        assert text_of(after) == reference  # same weights under the new name
        assert metric(swap_triton.metrics_url, "nanochat_generated_tokens_total", model="demo_b") > 0
        _wait_unloaded(swap_triton, "demo")  # drained, then unloaded
        models = httpx.get(url + "/models", headers=AUTH).json()
        assert models["current_model"] == "demo_b"
        assert {m["model_tag"]: m["loaded"] for m in models["models"]}["demo"] is False
        assert httpx.get(url + "/stats", headers=AUTH).json()["swap"]["state"] == "idle"

    # A restarted BFF (no BFF_MODEL) reads the current model back from Triton.
    with run_bff(**triton_settings(swap_triton)) as url:
        assert httpx.get(url + "/health").json() == {"status": "ok", "ready": True, "current_model": "demo_b"}


def test_failed_swap_keeps_the_old_model(swap_triton):
    with run_bff(**triton_settings(swap_triton)) as url:
        current = httpx.get(url + "/health").json()["current_model"]
        r = httpx.post(url + "/models/swap", json={"model_tag": "demo_broken"}, headers=AUTH, timeout=60)
        assert r.status_code == 502
        assert "demo_broken" in r.json()["detail"] and f"still serving {current}" in r.json()["detail"]
        assert httpx.get(url + "/health").json() == {"status": "ok", "ready": True, "current_model": current}
        r, events = generate(url, LONG)
        assert r.status_code == 200 and is_done(events[-1]) and text_of(events)
        swap = httpx.get(url + "/stats", headers=AUTH).json()["swap"]
        assert swap["state"] == "idle" and "demo_broken" in swap["last_error"]


def test_unknown_model_is_404(swap_triton):
    with run_bff(**triton_settings(swap_triton)) as url:
        r = httpx.post(url + "/models/swap", json={"model_tag": "no-such-model"}, headers=AUTH)
        assert r.status_code == 404
        assert "no-such-model" in r.json()["detail"]


def test_drain_first_refuses_new_streams_until_the_new_model_is_loaded(swap_triton):
    with run_bff(**triton_settings(swap_triton, swap_strategy="drain-first")) as url:
        old = httpx.get(url + "/health").json()["current_model"]
        new = "demo" if old == "demo_b" else "demo_b"

        async def scenario():
            async with httpx.AsyncClient() as client:
                running = asyncio.create_task(_stream(client, url))
                await asyncio.sleep(0.3)
                swap = await client.post(url + "/models/swap", json={"model_tag": new}, headers=AUTH, timeout=60)
                refused = await client.post(url + "/generate", json=LONG, headers=AUTH)
                return swap, refused, await running

        swap, refused, events = asyncio.run(scenario())
        assert swap.status_code == 202 and swap.json() == {"status": "draining", "current_model": old}
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert is_done(events[-1])
        wait_until(lambda: httpx.get(url + "/health").json() == {"status": "ok", "ready": True, "current_model": new},
                   "drain-first swap did not finish", timeout=60)
        assert generate(url, LONG)[0].status_code == 200
