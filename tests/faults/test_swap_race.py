"""
Swaps that race across BFF processes sharing one Triton (as gunicorn workers and replicas do: each has its own
registry, only Triton is shared). Two swaps to different models sent at once to two BFFs, or to the two workers
of the production server, while streams run: one model is loaded at the end, every BFF and worker serves it,
no stream fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest

from tests.support.bffkit import first_tokens, is_done, model_ready, wait_until
from tools.bff_client import AUTH, bff_process, health, run_bff, stats, stream_events, triton_settings
from tools.local_triton import LocalTriton, derive_model
from tools.measure import SERVER_TIMEOUT_S

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
    return [m for m in MODELS if model_ready(server, m)]


def settled(server, urls: list[str]) -> str | None:
    """The one model loaded, if Triton has exactly one and every BFF serves it, ready and idle."""
    models = loaded(server)
    if len(models) != 1:
        return None
    for url in urls:
        if health(url) != {"status": "ok", "ready": True, "current_model": models[0]} \
                or stats(url)["swap"]["state"] != "idle":
            return None
    return models[0]


@pytest.mark.parametrize("strategy", ["load-first", "drain-first"])
def test_two_swaps_at_once_on_two_bffs_end_with_one_model_everywhere(race_triton, strategy):
    settings = triton_settings(race_triton, swap_strategy=strategy, drain_timeout_s=20)
    with run_bff(**settings) as one, run_bff(**settings) as two:
        start = health(one)["current_model"]
        targets = [m for m in MODELS if m != start]

        async def go():
            async with httpx.AsyncClient(timeout=120) as client:
                on_first_token, streaming = first_tokens(4)
                streams = [asyncio.create_task(stream_events(client, url, BODY, on_first_token))
                           for url in (one, two, one, two)]
                await asyncio.wait_for(streaming.wait(), SERVER_TIMEOUT_S)  # running when the swaps arrive
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
        start = health(other)["current_model"]
        target = next(m for m in MODELS if m != start)
        assert httpx.post(one + "/models/swap", json={"model_tag": target}, headers=AUTH,
                          timeout=SERVER_TIMEOUT_S).status_code == 202
        wait_until(lambda: loaded(race_triton) == [target], f"{start} was not unloaded")
        assert health(other)["current_model"] == start  # it has not looked yet
        with httpx.stream("POST", other + "/generate", json=BODY, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200, r.read()
            assert any('"done"' in line for line in r.iter_lines())
        assert health(other)["current_model"] == target


def worker_pids(proc, request_ids: list[str]) -> dict[str, int]:
    """The pid of the gunicorn worker that wrote each request's access line."""
    pids = {}
    for line in proc.log_tail(10**7).splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("request_id") in request_ids:
                pids[entry["request_id"]] = entry["pid"]
    return pids


def test_two_swaps_at_once_on_the_two_gunicorn_workers_end_with_one_model_every_worker_serves(race_triton):
    """Each swap goes on a connection that a different worker accepted (a kept-alive connection stays with its
    worker; the access lines' pids say which), while four streams run."""
    settings = triton_settings(race_triton, model="demo", workers=2, drain_timeout_s=20)
    with bff_process(gunicorn=True, **settings) as (proc, url):

        async def worker_clients() -> list[httpx.AsyncClient]:
            """One single-connection client per worker: new connections until both workers have accepted one."""
            by_pid: dict[int, httpx.AsyncClient] = {}
            for i in range(40):
                client = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1))
                (await client.get(url + "/health", headers={"X-Request-ID": f"connection-{i}"})).raise_for_status()
                wait_until(lambda i=i: f"connection-{i}" in worker_pids(proc, [f"connection-{i}"]), "no access line")
                pid = worker_pids(proc, [f"connection-{i}"])[f"connection-{i}"]
                if pid in by_pid or len(by_pid) == 2:
                    await client.aclose()
                else:
                    by_pid[pid] = client
                if len(by_pid) == 2:
                    return list(by_pid.values())
            raise AssertionError("40 connections in a row went to one worker")

        async def settled(workers: list[httpx.AsyncClient]) -> str:
            deadline = time.monotonic() + 60
            while True:
                models = loaded(race_triton)
                health = [(await c.get(url + "/health")).json() for c in workers]
                swaps = [(await c.get(url + "/stats", headers=AUTH)).json()["swap"]["state"] for c in workers]
                if len(models) == 1 and swaps == ["idle", "idle"] and health == [
                        {"status": "ok", "ready": True, "current_model": models[0]}] * 2:
                    return models[0]
                assert time.monotonic() < deadline, f"models did not settle: {models} {health} {swaps}"
                await asyncio.sleep(0.2)

        async def go():
            workers = await worker_clients()
            streaming = [httpx.AsyncClient(timeout=120) for _ in range(4)]
            try:
                start = (await workers[0].get(url + "/health")).json()["current_model"]
                targets = [m for m in MODELS if m != start]
                on_first_token, started = first_tokens(4)
                streams = [asyncio.create_task(stream_events(c, url, BODY, on_first_token)) for c in streaming]
                await asyncio.wait_for(started.wait(), SERVER_TIMEOUT_S)  # running when the swaps arrive
                swaps = await asyncio.gather(*(
                    c.post(url + "/models/swap", json={"model_tag": model},
                           headers={**AUTH, "X-Request-ID": f"swap-to-{model}"})
                    for c, model in zip(workers, targets, strict=True)))
                results = await asyncio.gather(*streams)
                winner = await settled(workers)
                answers = [await stream_events(c, url, BODY) for c in workers]  # each worker streams from it
                return targets, swaps, results, winner, answers
            finally:
                for c in [*workers, *streaming]:
                    await c.aclose()

        targets, swaps, results, winner, answers = asyncio.run(go())
        assert len(set(worker_pids(proc, [f"swap-to-{m}" for m in targets]).values())) == 2, "one worker got both"
        assert {r.status_code for r in swaps} <= {202, 409}, [r.text for r in swaps]
        assert all(events and is_done(events[-1]) for events in results), results  # no stream failed
        assert winner in targets
        assert all(is_done(events[-1]) for events in answers)
