"""
Model swaps through the BFF against a Triton server of their own (swaps unload models): a swap while streams run
on the old model lets them finish on it and sends new streams to the new model; a load that really fails leaves
the old model serving; models a dead swap left are unloaded. The registry's other rules: tests/bff/inprocess/.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import tritonclient.grpc.aio as grpcclient

from tests.support.bffkit import is_done, loaded_models, model_ready, wait_until
from tests.support.tritonkit import stub_process
from tools.bff_client import AUTH, generate, health, run_bff, stats, stream_events, text_of, triton_settings
from tools.local_triton import LocalTriton, derive_model
from tools.measure import SERVER_TIMEOUT_S
from tools.stream_client import make_inputs, stream

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


def _stream(client: httpx.AsyncClient, url: str, on_first_token=None):
    return stream_events(client, url, LONG, on_first_token)


def _swap(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/models/swap", json={"model_tag": model}, headers=AUTH, timeout=SERVER_TIMEOUT_S)


def _direct_text(server, model: str) -> str:
    """The model's greedy answer to LONG straight from Triton, without the BFF."""

    async def go():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return await stream(client, model, make_inputs(messages=LONG["messages"], temperature=0.0,
                                                           max_tokens=LONG["max_tokens"]))
        finally:
            await client.close()

    result = asyncio.run(go())
    assert result.error is None, result.error
    return result.text


def _wait_unloaded(server, model: str, timeout: float = 30) -> None:
    wait_until(lambda: not model_ready(server, model),
               f"{model} was never unloaded", timeout)


def test_swap_drains_the_old_models_streams_while_new_ones_get_the_new_model(swap_triton):
    """Old streams are held open (their model's stub paused from their first token) across the whole swap,
    so a swap that unloaded the old model at once, or sent them to the new one, fails here; the two models
    have different weights (the head and orig oracles), so each stream's text says which model made it."""
    with run_bff(**triton_settings(swap_triton, model="demo")) as url:
        assert _swap(url, "head").status_code == 202
        old = text_of(generate(url, LONG)[1])
        assert old == _direct_text(swap_triton, "head")
        stub = stub_process(swap_triton, "head")

        async def scenario():
            held = asyncio.Event()
            started = 0

            def first_token():
                nonlocal started
                started += 1
                if started == 4:  # every old stream is live: pause their model
                    stub.suspend()
                    held.set()

            async with httpx.AsyncClient(timeout=SERVER_TIMEOUT_S) as client:
                streams = [asyncio.create_task(_stream(client, url, first_token)) for _ in range(4)]
                await asyncio.wait_for(held.wait(), 60)
                try:
                    swap = await client.post(url + "/models/swap", json={"model_tag": "orig"}, headers=AUTH)
                    after = await _stream(client, url)  # the new model serves while the old streams wait
                    still_open = sum(not t.done() for t in streams)
                    state = (await client.get(url + "/stats", headers=AUTH)).json()["swap"]
                finally:
                    stub.resume()
                return swap, after, still_open, state, await asyncio.gather(*streams)

        swap, after, still_open, state, results = asyncio.run(scenario())
        assert swap.status_code == 202 and swap.json() == {"status": "draining", "current_model": "orig"}
        assert still_open == 4 and state["state"] == "draining"
        assert text_of(after) == _direct_text(swap_triton, "orig") != old
        for events in results:  # every stream on the old model ran to its end, with the old model's text
            assert is_done(events[-1]) and text_of(events) == old
        _wait_unloaded(swap_triton, "head")  # drained, then unloaded
        models = httpx.get(url + "/models", headers=AUTH, timeout=SERVER_TIMEOUT_S).json()
        assert models["current_model"] == "orig"
        assert {m["model_tag"]: m["loaded"] for m in models["models"]}["head"] is False
        assert stats(url)["swap"]["state"] == "idle"

    # A restarted BFF (no BFF_MODEL) reads the current model back from Triton.
    with run_bff(**triton_settings(swap_triton)) as url:
        assert health(url) == {"status": "ok", "ready": True, "current_model": "orig"}


def test_failed_swap_keeps_the_old_model(swap_triton):
    with run_bff(**triton_settings(swap_triton)) as url:
        current = health(url)["current_model"]
        r = httpx.post(url + "/models/swap", json={"model_tag": "demo_broken"}, headers=AUTH, timeout=SERVER_TIMEOUT_S)
        assert r.status_code == 502
        assert "demo_broken" in r.json()["detail"] and f"still serving {current}" in r.json()["detail"]
        assert health(url) == {"status": "ok", "ready": True, "current_model": current}
        r, events = generate(url, LONG)
        assert r.status_code == 200 and is_done(events[-1]) and text_of(events)
        swap = stats(url)["swap"]
        assert swap["state"] == "idle" and "demo_broken" in swap["last_error"]


def _unload_all(server) -> None:
    """Straight through Triton's repository API, as no BFF would."""
    for name in loaded_models(server):
        httpx.post(f"{server.http_url}/v2/repository/models/{name}/unload", timeout=SERVER_TIMEOUT_S).raise_for_status()
        _wait_unloaded(server, name)


def test_models_a_dead_swap_left_beside_its_own_are_unloaded_once_no_swap_can_still_be_retiring_them(swap_triton):
    """A BFF that died mid-swap leaves the old model loaded beside the new one. Probers unload it, but only
    after the swap bound (a swap elsewhere may still be draining it before then)."""
    from bff.registry import epoch_config

    _unload_all(swap_triton)
    # demo as Triton's --load-model loads it; demo_b by a swap two minutes ago whose BFF died before unloading demo
    httpx.post(f"{swap_triton.http_url}/v2/repository/models/demo/load", timeout=SERVER_TIMEOUT_S).raise_for_status()
    config = epoch_config(swap_triton.model_repository, "demo_b", time.time() - 120)
    httpx.post(f"{swap_triton.http_url}/v2/repository/models/demo_b/load",
               json={"parameters": {"config": config}}, timeout=SERVER_TIMEOUT_S).raise_for_status()
    assert loaded_models(swap_triton) == ["demo", "demo_b"]

    # the default bounds: a swap may take 22 minutes
    with run_bff(**triton_settings(swap_triton, probe_interval_s=0.1)) as url:
        time.sleep(0.5)  # five probes
        assert loaded_models(swap_triton) == ["demo", "demo_b"]
        assert health(url) == {"status": "ok", "ready": True, "current_model": "demo_b"}
    with run_bff(**triton_settings(swap_triton, model_load_timeout_s=20, drain_timeout_s=10)) as url:  # bound 60 s
        wait_until(lambda: loaded_models(swap_triton) == ["demo_b"], "the stray model was never unloaded")
        assert health(url) == {"status": "ok", "ready": True, "current_model": "demo_b"}
        r, events = generate(url, LONG)
        assert r.status_code == 200 and is_done(events[-1])
