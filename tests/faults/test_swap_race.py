"""
Swaps that race across BFF processes sharing one Triton (as gunicorn workers and replicas do: each has its own
registry, only Triton is shared). Two swaps to different models sent at once to two BFFs while streams run:
one model is loaded at the end, both BFFs serve it, no stream fails.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.bff.bffkit import AUTH, is_done, run_bff, stream_events, triton_settings, wait_until
from tools.local_triton import LocalTriton, derive_model

pytestmark = pytest.mark.triton
BODY = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "max_tokens": 48}
MODELS = ("demo", "demo_b", "demo_c")


@pytest.fixture(scope="module")
def race_triton(oracle_repository):
    for name in MODELS[1:]:
        derive_model(oracle_repository, "demo", name)
    with LocalTriton(oracle_repository, load=["demo"]) as server:
        yield server


def loaded(server) -> list[str]:
    return [m for m in MODELS if httpx.get(f"{server.http_url}/v2/models/{m}/ready").status_code == 200]


def settled(server, urls: list[str]) -> str | None:
    """The one model loaded, if Triton has exactly one and every BFF serves it, ready and idle."""
    models = loaded(server)
    if len(models) != 1:
        return None
    for url in urls:
        health, stats = httpx.get(url + "/health").json(), httpx.get(url + "/stats", headers=AUTH).json()
        if health != {"status": "ok", "ready": True, "current_model": models[0]} or stats["swap"]["state"] != "idle":
            return None
    return models[0]


@pytest.mark.parametrize("strategy", ["load-first", "drain-first"])
def test_two_swaps_at_once_on_two_bffs_end_with_one_model_everywhere(race_triton, strategy):
    settings = triton_settings(race_triton, swap_strategy=strategy, drain_timeout_s=20)
    with run_bff(**settings) as one, run_bff(**settings) as two:
        start = httpx.get(one + "/health").json()["current_model"]
        targets = [m for m in MODELS if m != start]

        async def go():
            async with httpx.AsyncClient(timeout=120) as client:
                streams = [asyncio.create_task(stream_events(client, url, BODY)) for url in (one, two, one, two)]
                await asyncio.sleep(0.3)  # the streams are running when the swaps arrive
                pairs = zip((one, two), targets, strict=True)
                swaps = await asyncio.gather(*(client.post(url + "/models/swap", json={"model_tag": model},
                                                           headers=AUTH) for url, model in pairs))
                return await asyncio.gather(*streams), swaps

        results, swaps = asyncio.run(go())
        assert all(events and is_done(events[-1]) for events in results), results
        assert {r.status_code for r in swaps} <= {202, 409}, [r.text for r in swaps]
        wait_until(lambda: settled(race_triton, [one, two]), f"models did not settle: {loaded(race_triton)}",
                   timeout=60)
        winner = settled(race_triton, [one, two])
        assert winner in targets
        for url in (one, two):  # and both stream from it
            with httpx.stream("POST", url + "/generate", json=BODY, headers=AUTH, timeout=60) as r:
                assert r.status_code == 200
                assert any('"done"' in line for line in r.iter_lines())


def test_a_stream_whose_model_another_bff_swapped_away_goes_to_the_new_one(race_triton):
    """The other BFF's prober is far from its next look (60 s), so only the stream itself can find out: every
    endpoint answers that its model is gone, it reads Triton again and streams from what Triton serves."""
    settings = triton_settings(race_triton, drain_timeout_s=20)
    with run_bff(**settings) as one, run_bff(**{**settings, "probe_interval_s": 60}) as other:
        start = httpx.get(other + "/health").json()["current_model"]
        target = next(m for m in MODELS if m != start)
        assert httpx.post(one + "/models/swap", json={"model_tag": target}, headers=AUTH,
                          timeout=60).status_code == 202
        wait_until(lambda: loaded(race_triton) == [target], f"{start} was not unloaded", timeout=30)
        assert httpx.get(other + "/health").json()["current_model"] == start  # it has not looked yet
        with httpx.stream("POST", other + "/generate", json=BODY, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200, r.read()
            assert any('"done"' in line for line in r.iter_lines())
        assert httpx.get(other + "/health").json()["current_model"] == target
