"""
A swap while 16 streams run, with each strategy: every stream that had begun ends whole (done), none fails,
and the new model is the only one loaded afterwards. The head oracle has 16 slots, so all 16 decode at once.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.bffkit import is_done, loaded_models, wait_until
from tools.bff_client import AUTH, generate, health, run_bff, stream_events, triton_settings
from tools.local_triton import LocalTriton, derive_model

pytestmark = pytest.mark.triton
BODY = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "max_tokens": 200}
STREAMS = 16


@pytest.fixture(scope="module")
def busy_triton(oracle_repository):
    derive_model(oracle_repository, "head", "head_b")
    with LocalTriton(oracle_repository, load=["head"]) as server:
        yield server


@pytest.mark.parametrize("strategy", ["load-first", "drain-first"])
def test_a_swap_while_16_streams_run_fails_none_of_them(busy_triton, strategy):
    with run_bff(**triton_settings(busy_triton, swap_strategy=strategy, drain_timeout_s=60)) as url:
        start = health(url)["current_model"]
        target = "head_b" if start == "head" else "head"

        async def go():
            begun, all_begun = 0, asyncio.Event()

            def first_token() -> None:
                nonlocal begun
                begun += 1
                if begun == STREAMS:
                    all_begun.set()

            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=2 * STREAMS)) as client:
                streams = [asyncio.create_task(stream_events(client, url, BODY, first_token)) for _ in range(STREAMS)]
                await asyncio.wait_for(all_begun.wait(), 60)
                running = sum(not s.done() for s in streams)  # all 16 are decoding when the swap is sent
                swap = await client.post(url + "/models/swap", json={"model_tag": target}, headers=AUTH)
                return swap, await asyncio.gather(*streams), running

        swap, results, running = asyncio.run(go())
        assert swap.status_code == 202, swap.text
        assert running == STREAMS
        failed = [events[-1] for events in results if not (events and is_done(events[-1]))]
        assert failed == [], failed
        wait_until(lambda: loaded_models(busy_triton) == [target]
                   and health(url) == {"status": "ok", "ready": True, "current_model": target},
                   f"the swap to {target} did not finish: {loaded_models(busy_triton)}", timeout=90)
        r, events = generate(url, BODY)
        assert r.status_code == 200 and is_done(events[-1])
