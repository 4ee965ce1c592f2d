"""
How Triton's failures at the start of a stream become HTTP answers on both surfaces (the contract's
{"detail"} and OpenAI's {"error"}), with Retry-After where trying again helps; the stream limit, no model, and
the access log line that says why a 4xx or 5xx was answered.
"""

from __future__ import annotations

import asyncio
import logging

import falcon.testing
import pytest

from tests.bff.inprocess.client import Bff
from tests.support.fake_triton import KINDS, SILENT, FakePool, TritonError, answer
from tools.bff_client import AUTH

USER = {"role": "user", "content": "hi"}
CHAT = {"model": "head", "messages": [USER]}
CONTEXT = "invalid request: prompt of 600 tokens does not fit the context of 512 tokens"  # the backend's words
# kind -> (status, Retry-After, OpenAI's error type)
MAPPING = {"invalid": (400, None, "invalid_request_error"), "busy": (503, "1", "service_unavailable_error"),
           "no_model": (503, "1", "service_unavailable_error"), "down": (503, "1", "service_unavailable_error"),
           "failed": (502, None, "server_error"), "timeout": (502, None, "server_error")}


def access_lines(caplog) -> list[dict]:
    return [r.msg for r in caplog.records if r.name == "bff.access" and isinstance(r.msg, dict)]


def test_every_kind_is_mapped():
    assert set(MAPPING) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_triton_error_at_the_start_of_a_stream(bff, kind, caplog):
    detail = f"Triton says {kind}"
    bff.pool.scripts = [[TritonError(kind, detail)]]
    status, retry_after, _ = MAPPING[kind]
    with caplog.at_level(logging.INFO, logger="bff.access"):
        r = bff.post("/generate", {"messages": [USER]})
    assert (r.status_code, r.json(), r.headers.get("retry-after")) == (status, {"detail": detail}, retry_after)
    assert r.headers["content-type"] == "application/json"
    assert bff.pool.streams[0].closed and bff.pool.endpoints[0].active == 0
    (line,) = access_lines(caplog)
    assert (line["status"], line["detail"]) == (status, detail)
    assert bff.get("/stats").json()["bff"]["errors"] == {kind: 1}


@pytest.mark.parametrize("kind", KINDS)
def test_a_triton_error_at_the_start_of_a_stream_in_openais_shape(bff, kind):
    bff.pool.scripts = [[TritonError(kind, f"Triton says {kind}")]]
    status, retry_after, error_type = MAPPING[kind]
    r = bff.post("/v1/chat/completions", {**CHAT, "stream": True})
    assert (r.status_code, r.headers.get("retry-after")) == (status, retry_after)
    assert r.json() == {"error": {"message": f"Triton says {kind}", "type": error_type, "param": None,
                                  "code": None}}


def test_a_prompt_longer_than_the_context_is_openais_context_length_exceeded(bff):
    bff.pool.scripts = [[TritonError("invalid", CONTEXT)]]
    r = bff.post("/v1/chat/completions", CHAT)
    assert r.status_code == 400
    assert r.json()["error"] == {"message": CONTEXT, "type": "invalid_request_error", "param": None,
                                 "code": "context_length_exceeded"}
    bff.pool.scripts = [[TritonError("invalid", CONTEXT)]]
    assert bff.post("/generate", {"messages": [USER]}).json() == {"detail": CONTEXT}


def test_a_model_not_served_is_a_404_on_openais_route(bff):
    r = bff.post("/v1/chat/completions", {**CHAT, "model": "orig"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert bff.pool.opened == []


def test_no_model_loaded_is_a_503(tmp_path):
    bff = Bff(FakePool(served=(), others=("head",)), tmp_path)
    r = bff.post("/generate", {"messages": [USER]})
    assert (r.status_code, r.json(), r.headers["retry-after"]) == (503, {"detail": "no model is loaded"}, "5")
    r = bff.post("/v1/chat/completions", CHAT)
    assert (r.status_code, r.headers["retry-after"]) == (503, "5")
    assert r.json()["error"] == {"message": "no model is loaded", "type": "service_unavailable_error", "param": None,
                                 "code": None}
    assert bff.get("/health").json() == {"status": "ok", "ready": False, "current_model": None}


def test_the_stream_limit(pool, tmp_path):
    pool.scripts = [[SILENT]]  # the first stream runs (silently) while the others ask
    bff = Bff(pool, tmp_path, max_streams=1, first_response_wait_s=0, ping_interval_s=0.001)

    async def over_the_limit():
        async with falcon.testing.ASGIConductor(bff.app) as conductor:
            running = await conductor.simulate_request("POST", "/generate", json={"messages": [USER]}, headers=AUTH,
                                                       _stream_result=True)
            assert running.status_code == 200
            answers = [await conductor.simulate_post("/generate", json={"messages": [USER]}, headers=AUTH),
                       await conductor.simulate_post("/v1/chat/completions", json=CHAT, headers=AUTH)]
            await running.finalize()
            after = await conductor.simulate_post("/generate", json={"messages": [USER]}, headers=AUTH)
            return answers, after

    (generate, chat), after = asyncio.run(over_the_limit())
    assert (generate.status_code, generate.json, generate.headers["retry-after"]) == \
        (503, {"detail": "1 streams are already running"}, "1")
    assert (chat.status_code, chat.json["error"]["type"]) == (503, "service_unavailable_error")
    assert after.status_code == 200  # the limit counts streams running, not streams ever run
    assert len(pool.opened) == 2


def test_4xx_access_log_lines_name_the_reason(bff, caplog):
    with caplog.at_level(logging.INFO, logger="bff.access"):
        r = bff.post("/generate", {"messages": [USER], "temperature": 5})
        unauthorized = bff.post("/generate", {"messages": [USER]}, headers={})
    lines = [line for line in access_lines(caplog) if line.get("route") == "/generate"]
    assert [(line["status"], line["detail"]) for line in lines] == [
        (400, r.json()["detail"]), (401, unauthorized.json()["detail"])]
    assert "body.temperature" in lines[0]["detail"]


def test_a_failed_stream_logs_its_end_and_why(bff, caplog):
    bff.pool.scripts = [[*answer("a")[:1], TritonError("failed", "boom")]]
    with caplog.at_level(logging.INFO, logger="bff.access"):
        bff.post("/generate", {"messages": [USER]})
    (line,) = access_lines(caplog)
    assert (line["status"], line["end"], line["detail"], line["pieces"]) == (200, "error", "boom", 1)
