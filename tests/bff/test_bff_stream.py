"""
/generate end to end: uvicorn + the BFF + the real Triton server + exported oracle checkpoints.
Greedy streams equal nanochat's reference text; a client that disconnects mid-stream gets its Triton
request cancelled and the backend's slot freed.
"""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.support.bffkit import assert_cancelled_and_freed, finished, wait_until
from tests.support.tritonkit import long_answers
from tools.bff_client import AUTH, generate, run_bff, stats, text_of, triton_settings
from tools.measure import SERVER_TIMEOUT_S

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("oracle", ["head", "orig"])
def test_greedy_matches_nanochat(triton_server, oracle_references, oracle):
    with run_bff(**triton_settings(triton_server, model=oracle)) as url:
        for conv in oracle_references[oracle]["conversations"]:
            r, events = generate(url, {"messages": conv["messages"], "temperature": 0, "max_tokens": 32})
            assert r.status_code == 200
            assert events[-1] == {"done": True, "finish_reason": "length", "dropped_turns": 0,
                                  "usage": {"prompt_tokens": conv["prompt_len"], "completion_tokens": 32}}
            assert all(set(e) == {"token", "gpu"} and e["token"] and e["gpu"] == 0 for e in events[:-1])
            assert text_of(events) == conv["greedy"]["text"], conv["name"]


def test_prompt_longer_than_the_context_is_a_400(bff_url):
    # Passes the BFF's limits but not the model's 512-token context: Triton's answer becomes the 400.
    r, _ = generate(bff_url, {"messages": [{"role": "user", "content": "word " * 1500}]})
    assert r.status_code == 400
    assert "context" in r.json()["detail"]


def disconnects(url: str) -> int:
    return stats(url)["bff"]["streams"]["ended"].get("disconnect", 0)


def test_disconnect_mid_stream_cancels_the_triton_request(triton_server):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 4096}
    with long_answers(triton_server) as model, run_bff(**triton_settings(triton_server, model=model)) as url:
        before = finished(triton_server, model)
        with httpx.stream("POST", url + "/generate", json=body, headers=AUTH, timeout=SERVER_TIMEOUT_S) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data:"))
            assert "token" in orjson.loads(first[5:])
        wait_until(lambda: disconnects(url) == 1, "the BFF did not notice the client leave")
        assert_cancelled_and_freed(triton_server, model, before)
        assert stats(url)["bff"]["streams"]["active"] == 0
