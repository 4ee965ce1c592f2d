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

from tests.support.bffkit import model_ready, wait_until
from tests.support.tritonkit import long_prompt, stub_process, wait_busy
from tools.bff_client import AUTH, generate, health, run_bff, stats, triton_settings
from tools.local_triton import free_port
from tools.measure import SERVER_TIMEOUT_S
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
    await wait_busy(server, "demo_1slot", active=1, queued=requests - 1)
    try:
        yield
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


def test_a_full_triton_queue_is_a_503_with_retry_after(triton_server):
    with run_bff(**triton_settings(triton_server, model="demo_1slot")) as url:

        async def scenario():
            async with slot_and_queue_taken(triton_server, 2), httpx.AsyncClient(timeout=SERVER_TIMEOUT_S) as client:
                return await client.post(url + "/generate", json=BODY, headers=AUTH, timeout=30)

        r = asyncio.run(scenario())
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"].startswith("queue full: 1 slots busy and 1 requests waiting")
        assert generate(url, BODY)[0].status_code == 200  # and serves again once the queue drains


def test_the_stream_limit_is_a_503_until_a_stream_ends(triton_server):
    settings = triton_settings(triton_server, model="demo_1slot", max_streams=1, first_response_wait_s=0)
    with run_bff(**settings) as url:

        async def scenario():
            async with slot_and_queue_taken(triton_server, 1), httpx.AsyncClient(timeout=SERVER_TIMEOUT_S) as client, \
                    client.stream("POST", url + "/generate", json=BODY, headers=AUTH, timeout=30) as first:
                assert first.status_code == 200  # queued in Triton: open, pinging
                return await client.post(url + "/generate", json=BODY, headers=AUTH, timeout=30)

        second = asyncio.run(scenario())
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert second.json() == {"detail": "1 streams are already running"}
        # the first stream ends when the BFF has seen its client go (a moment after the client closed it)
        active = lambda: stats(url)["bff"]["streams"]["active"]
        wait_until(lambda: active() == 0, "the first stream did not end after its client closed it")
        assert generate(url, BODY)[0].status_code == 200  # room again
        bff = stats(url)["bff"]
        assert bff["errors"]["stream_limit"] == 1 and bff["streams"]["active"] == 0


def test_a_swap_to_the_current_model_changes_nothing(bff_url):
    r = httpx.post(bff_url + "/models/swap", json={"model_tag": "head"}, headers=AUTH, timeout=SERVER_TIMEOUT_S)
    assert r.status_code == 202 and r.json() == {"status": "unchanged", "current_model": "head"}


def test_an_unreachable_triton_is_a_503_everywhere_and_not_ready():
    port = free_port()  # nothing listens there
    with run_bff(triton_urls=(f"127.0.0.1:{port}",), triton_metrics_urls=(f"http://127.0.0.1:{port}/metrics",),
                 model="head") as url:
        assert health(url) == {"status": "ok", "ready": False, "current_model": None}
        r, events = generate(url, BODY)
        assert r.status_code == 503 and events == [] and r.headers["retry-after"]
        swap = httpx.post(url + "/models/swap", json={"model_tag": "head"}, headers=AUTH, timeout=SERVER_TIMEOUT_S)
        assert swap.status_code == 503 and "Triton is not reachable" in swap.json()["detail"]


LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "max_tokens": 200}


def test_a_burst_cannot_overshoot_the_stream_limit(triton_server):
    # the limit was checked before the stream started, after awaits: a burst passed it together
    with run_bff(**triton_settings(triton_server, model="head", max_streams=2)) as url:

        async def one(client):
            async with client.stream("POST", url + "/generate", json=LONG, headers=AUTH, timeout=60) as r:
                return r.status_code, [line async for line in r.aiter_lines()]

        async def burst():
            async with httpx.AsyncClient(timeout=SERVER_TIMEOUT_S) as client:
                return await asyncio.gather(*(one(client) for _ in range(10)))

        statuses = sorted(code for code, _ in asyncio.run(burst()))
        assert statuses == [200] * 2 + [503] * 8


def test_health_answers_without_waiting_for_a_frozen_triton(triton_server):
    import os
    import signal

    from bff.triton import PROBE_TIMEOUT_S

    with run_bff(**triton_settings(triton_server, model="head")) as url:
        assert health(url)["ready"] is True
        os.kill(triton_server.process.pid, signal.SIGSTOP)  # every call to Triton now hangs
        try:
            # a /health that asked Triton could only answer once its probe timed out: half that is an outcome
            # bound (it did not wait for Triton), not a speed check
            answers = [httpx.get(url + "/health", timeout=PROBE_TIMEOUT_S / 2).json() for _ in range(20)]
        finally:
            os.kill(triton_server.process.pid, signal.SIGCONT)
        # the last probe's answer (a probe that times out meanwhile may turn ready to False: also an answer)
        assert answers[0] == {"status": "ok", "ready": True, "current_model": "head"}
        assert all(a["status"] == "ok" and a["current_model"] == "head" for a in answers), answers


def test_a_silent_triton_ends_the_stream_with_an_error_and_cancels_it(triton_server):
    from tests.support.bffkit import assert_cancelled_and_freed, finished
    from tools.bff_client import parse_events

    stub = stub_process(triton_server, "head")
    settings = triton_settings(triton_server, model="head", stream_silence_s=1.0, ping_interval_s=0.2)
    with run_bff(**settings) as url:
        before = finished(triton_server, "head")
        body = {**LONG, "max_tokens": 4096}
        lines = []
        try:
            with httpx.stream("POST", url + "/generate", json=body, headers=AUTH, timeout=30) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if line.startswith('data: {"token"') and len(lines) == 1:
                        stub.suspend()  # the model goes silent mid-answer
        finally:
            stub.resume()
        events = parse_events(lines)
        assert events[-1] == {"error": "timeout", "detail": "no response from Triton for 1 s"}
        assert not any("done" in e for e in events)  # not a whole answer
        assert_cancelled_and_freed(triton_server, "head", before)


def test_keepalive_ends_a_stream_whose_triton_froze_long_before_the_silence_bound(triton_server):
    """A partitioned or hung server answers no HTTP/2 ping: the channel's keepalive (backend.protocol) fails
    the stream within KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS, not at the silence bound (here 600 s), and not never."""
    import os
    import signal
    import time

    from backend.protocol import KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS, METRIC_ACTIVE_SLOTS
    from bff.triton import PROBE_TIMEOUT_S
    from tests.support.bffkit import finished
    from tools.bff_client import parse_events
    from tools.measure import metric

    with run_bff(**triton_settings(triton_server, model="head", stream_silence_s=600.0)) as url:
        before = finished(triton_server, "head")
        lines, frozen_at = [], None
        try:
            with httpx.stream("POST", url + "/generate", json={**LONG, "max_tokens": 4096}, headers=AUTH,
                              timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if frozen_at is None and line.startswith('data: {"token"'):
                        os.kill(triton_server.process.pid, signal.SIGSTOP)  # the kernel still ACKs; Triton is gone
                        frozen_at = time.monotonic()
            took = time.monotonic() - frozen_at
        finally:
            os.kill(triton_server.process.pid, signal.SIGCONT)
        events = parse_events(lines)
        assert "error" in events[-1] and events[-1]["error"] != "timeout", events[-1]  # not the silence bound
        assert not any("done" in e for e in events)
        assert took < (KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + PROBE_TIMEOUT_S + 5, took
        # the stub was not frozen: it may have finished the answer before the server, thawed, saw the client
        # gone; either way the request ends and its slot is free
        wait_until(lambda: sum(finished(triton_server, "head").values()) == sum(before.values()) + 1
                   and metric(triton_server.metrics_url, METRIC_ACTIVE_SLOTS, model="head") == 0,
                   "the backend request did not end or its slot was not freed")


def test_the_repository_api_answers_only_the_bff(oracle_repository, tmp_path):
    """Triton with its repository API restricted (as the images run it): a client without the key can
    neither list, load nor unload models; the BFF, given the key, swaps as usual."""
    from tools.bff_client import KEY
    from tools.local_triton import LocalTriton

    repository = tmp_path / "repository"
    repository.mkdir()
    for name in ("demo", "demo_1slot"):
        (repository / name).symlink_to(oracle_repository / name)
    admin = "admin-" + KEY
    with LocalTriton(repository, load=["demo"], admin_key=admin) as server:
        for path in ("/v2/repository/index", "/v2/repository/models/demo/unload"):
            r = httpx.post(server.http_url + path, json={}, timeout=SERVER_TIMEOUT_S)
            assert r.status_code != 200, path
        assert model_ready(server, "demo")  # still loaded
        settings = triton_settings(server, model="demo", triton_admin_key=admin)
        with run_bff(**settings) as url:
            models = httpx.get(url + "/models", headers=AUTH, timeout=SERVER_TIMEOUT_S).json()["models"]
            assert {m["model_tag"]: m["loaded"] for m in models} == {"demo": True, "demo_1slot": False}
            r = httpx.post(url + "/models/swap", json={"model_tag": "demo_1slot"}, headers=AUTH,
                           timeout=SERVER_TIMEOUT_S)
            assert r.status_code == 202 and r.json()["current_model"] == "demo_1slot"
            assert generate(url, BODY)[0].status_code == 200
