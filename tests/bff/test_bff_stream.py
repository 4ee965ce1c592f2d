"""
/generate end to end: uvicorn + the BFF + the real Triton server + exported oracle checkpoints.
Greedy streams equal nanochat's reference text; a client that disconnects gets its Triton request
cancelled (the backend's slot is freed long before the generation could have finished).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.bff.bffkit import AUTH, generate, metric, parse_events, run_bff, text_of, triton_settings

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("oracle", ["head", "orig"])
def test_greedy_matches_nanochat(triton_server, oracle_references, oracle):
    with run_bff(**triton_settings(triton_server, model=oracle)) as url:
        for conv in oracle_references[oracle]["conversations"]:
            r, events = generate(url, {"messages": conv["messages"], "temperature": 0, "max_tokens": 32})
            assert r.status_code == 200
            assert events[-1] == {"done": True}
            assert all(set(e) == {"token", "gpu"} and e["token"] and e["gpu"] == 0 for e in events[:-1])
            assert text_of(events) == conv["greedy"]["text"], conv["name"]


def test_stream_headers_and_framing(bff_url):
    body = {"messages": [{"role": "user", "content": "line\nbreaks \"quoted\""}], "max_tokens": 8}
    with httpx.stream("POST", bff_url + "/generate", json=body, headers={**AUTH, "X-Request-ID": "abc"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-request-id"] == "abc"
        lines = list(r.iter_lines())
    assert all(line == "" or line.startswith(("data: ", ": ping")) for line in lines)
    assert parse_events(lines)[-1] == {"done": True}


def test_prompt_longer_than_the_context_is_a_400(bff_url):
    # Passes the BFF's limits but not the model's 512-token context: Triton's answer becomes the 400.
    r, _ = generate(bff_url, {"messages": [{"role": "user", "content": "word " * 1500}]})
    assert r.status_code == 400
    assert "context" in r.json()["detail"]


def test_disconnect_cancels_the_triton_request(triton_server):
    labels = {"model": "head"}
    with run_bff(**triton_settings(triton_server, model="head")) as url:
        before = metric(triton_server.metrics_url, "nanochat_generated_tokens_total", **labels)
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 1.0,
                "max_tokens": 4096}
        with httpx.stream("POST", url + "/generate", json=body, headers=AUTH) as r:
            events = parse_events(line for line, _ in zip(r.iter_lines(), range(6), strict=False))
            assert any("token" in e for e in events)
        # The response is closed: the BFF must cancel, and the backend free the slot.
        deadline = time.monotonic() + 10
        while metric(triton_server.metrics_url, "nanochat_active_slots", **labels) > 0:
            assert time.monotonic() < deadline, "the backend slot was not freed"
            time.sleep(0.1)
        generated = metric(triton_server.metrics_url, "nanochat_generated_tokens_total", **labels) - before
        assert generated < 400, f"{generated} tokens: the request ran on instead of being cancelled"
        stats = httpx.get(url + "/stats", headers=AUTH).json()["bff"]
        assert stats["streams"]["active"] == 0
        assert stats["streams"]["ended"].get("disconnect") == 1
