"""
The registry's swaps in-process, over a FakePool that plays Triton's repository: drain-first refuses new streams
until the new model is loaded, a failed drain-first load brings the old model back, a swap through one BFF moves
another, and no model is a 503 until a swap loads one. What only a real Triton shows (streams finishing on a model
being unloaded, a load that really fails, the swap epoch in a config override) stays in tests/bff/test_bff_swap.py.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

import httpx

from tests.bff.inprocess.client import Bff, events
from tests.support.bffkit import is_done
from tests.support.fake_triton import FakePool, Piece, answer
from tools.bff_client import AUTH
from tools.measure import OUTCOME_TIMEOUT_S

FAST = {"probe_interval_s": 0.05, "ping_interval_s": 0.05}
BODY = {"messages": [{"role": "user", "content": "Tell me a long story."}]}


async def until(condition: Callable[[], bool | Awaitable[bool]], failure: str) -> None:
    """Waits until `condition()` (a bool, or an awaitable of one) holds; fails with `failure` past the bound."""
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while True:
        held = condition()
        if await held if inspect.isawaitable(held) else held:
            return
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.01)


async def _is(answer_of: Awaitable[object], want: object) -> bool:
    return await answer_of == want


async def health(http: httpx.AsyncClient) -> dict:
    return (await http.get("/health")).json()


async def generate(http: httpx.AsyncClient) -> tuple[int, list]:
    r = await http.post("/generate", json=BODY, headers=AUTH)
    return r.status_code, events(r.text) if r.status_code == 200 else []


def test_drain_first_refuses_new_streams_until_the_new_model_is_loaded(tmp_path):
    pool = FakePool(served=("demo",), others=("demo_b",))
    bff = Bff(pool, tmp_path, swap_strategy="drain-first", **FAST)

    async def work(http):
        release = asyncio.Event()  # the old model's stream runs until the test lets it end
        pool.scripts = [[Piece("Once", 0, "", final=False, usage={}), release, *answer(" upon")]]
        running = asyncio.create_task(generate(http))
        await until(lambda: bool(pool.streams), "the stream was never opened")
        swap = await http.post("/models/swap", json={"model_tag": "demo_b"}, headers=AUTH)
        refused = await http.post("/generate", json=BODY, headers=AUTH)
        release.set()
        streamed = await running
        await until(lambda: pool.states["demo_b"] == "READY", "demo_b was never loaded")
        await until(lambda: _is(health(http), {"status": "ok", "ready": True, "current_model": "demo_b"}),
                    "the drain-first swap did not finish")
        return swap, refused, streamed, await generate(http)

    swap, refused, (status, streamed), (after, _) = bff.call(work)
    assert swap.status_code == 202 and swap.json() == {"status": "draining", "current_model": "demo"}
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert status == 200 and is_done(streamed[-1])
    assert after == 200 and pool.opened[-1]["model"] == "demo_b"
    assert pool.states == {"demo": "UNAVAILABLE", "demo_b": "READY"}


def test_drain_first_whose_load_fails_brings_the_old_model_back(tmp_path):
    pool = FakePool(served=("demo",), others=("demo_broken",))
    pool.broken.add("demo_broken")
    bff = Bff(pool, tmp_path, swap_strategy="drain-first", **FAST)

    async def work(http):
        swap = await http.post("/models/swap", json={"model_tag": "demo_broken"}, headers=AUTH)
        await until(lambda: _is(_swap_state(http), "idle"), "the failed drain-first swap never finished")
        return swap, (await http.get("/stats", headers=AUTH)).json()["swap"], await health(http), await generate(http)

    swap, state, healthy, (status, streamed) = bff.call(work)
    assert swap.status_code == 202 and swap.json() == {"status": "draining", "current_model": "demo"}
    assert "loading demo_broken failed" in state["last_error"] and "demo reloaded" in state["last_error"]
    assert healthy == {"status": "ok", "ready": True, "current_model": "demo"}
    assert status == 200 and is_done(streamed[-1])


async def _swap_state(http: httpx.AsyncClient) -> str:
    return (await http.get("/stats", headers=AUTH)).json()["swap"]["state"]


def test_another_bffs_swap_is_seen_after_a_probe(tmp_path):
    # two BFF processes' views of one Triton (gunicorn workers, or replicas): a swap through one moves the other
    pool = FakePool(served=("demo",), others=("demo_b",))
    one, other = Bff(pool, tmp_path, **FAST), Bff(pool, tmp_path, **FAST)

    async def work():
        async with one.session() as first, other.session() as second:
            assert (await health(second))["current_model"] == "demo"
            swap = await first.post("/models/swap", json={"model_tag": "demo_b"}, headers=AUTH)
            await until(lambda: pool.states["demo"] == "UNAVAILABLE", "demo was never unloaded")
            await until(lambda: _is(health(second), {"status": "ok", "ready": True, "current_model": "demo_b"}),
                        "the other BFF kept serving the unloaded model")
            return swap, await generate(second)

    swap, (status, streamed) = asyncio.run(work())
    assert swap.status_code == 202
    assert status == 200 and is_done(streamed[-1]) and pool.opened[-1]["model"] == "demo_b"


def test_no_model_loaded_is_a_503_until_a_swap_loads_one(tmp_path):
    pool = FakePool(served=(), others=("demo",))
    bff = Bff(pool, tmp_path, **FAST)

    async def work(http):
        before = await health(http)
        refused = await http.post("/generate", json=BODY, headers=AUTH)
        swap = await http.post("/models/swap", json={"model_tag": "demo"}, headers=AUTH)
        return before, refused, swap, await generate(http)

    before, refused, swap, (status, streamed) = bff.call(work)
    assert before == {"status": "ok", "ready": False, "current_model": None}
    assert refused.status_code == 503 and refused.json() == {"detail": "no model is loaded"}
    assert refused.headers["retry-after"]
    assert swap.json() == {"status": "draining", "current_model": "demo"}
    assert status == 200 and is_done(streamed[-1])
