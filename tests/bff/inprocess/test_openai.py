"""
The OpenAI surface over the fake, with the official `openai` client where it reads the answer: chunk objects
(the role first, one finish chunk, usage when asked, `[DONE]`), the whole body, OpenAI's error shapes, and what
reaches Triton from OpenAI's fields and vLLM's.
"""

from __future__ import annotations

import openai
import orjson
import pytest

from tests.bff.inprocess.client import BASE_URL, Bff, events
from tests.support.fake_triton import SILENT, TritonError, answer
from tools.bff_client import AUTH, KEY
from tools.measure import SERVER_TIMEOUT_S

USER = {"role": "user", "content": "hi"}
CHAT = {"model": "head", "messages": [USER]}


def sdk(bff, work, api_key: str = KEY):
    """What `work(client)` gives, an AsyncOpenAI client of the app."""
    return bff.call(lambda http: work(openai.AsyncOpenAI(base_url=BASE_URL + "/v1", api_key=api_key, max_retries=0,
                                                         http_client=http, timeout=SERVER_TIMEOUT_S)))


def streamed(bff, **fields) -> list:
    async def read(client):
        return [chunk async for chunk in await client.chat.completions.create(stream=True, **fields)]

    return sdk(bff, read)


def test_models_lists_the_served_model_first(bff):
    models = sdk(bff, lambda client: client.models.list()).data
    assert models[0].id == "head" and models[0].object == "model"
    assert {m.id for m in models} == {"head", "orig", "demo"}


def test_a_whole_completion(bff):
    bff.pool.scripts = [answer("Hel", "lo", finish="length", prompt_tokens=11)]
    r = sdk(bff, lambda client: client.chat.completions.create(**CHAT))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "head" and r.created > 0
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == "Hello"
    assert choice.finish_reason == "length" and choice.index == 0
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 2, 13)


@pytest.mark.parametrize(("backend", "openai_reason"), [("stop", "stop"), ("length", "length"),
                                                        ("cancelled", "stop")])
def test_finish_reasons_are_openais(bff, backend, openai_reason):
    bff.pool.scripts = [answer("a", finish=backend)]
    assert bff.post("/v1/chat/completions", CHAT).json()["choices"][0]["finish_reason"] == openai_reason


def test_a_streamed_completion_has_openais_chunks_and_usage(bff):
    bff.pool.scripts = [answer("Hel", "lo", finish="length", prompt_tokens=11)]
    chunks = streamed(bff, **CHAT, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert chunks[-1].usage.total_tokens == 13


def test_the_chunk_events_on_the_wire(bff):
    bff.pool.scripts = [answer("Hi", finish="stop")]
    r = bff.post("/v1/chat/completions", {**CHAT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    *chunks, done = events(r.text)
    assert done == "[DONE]" and r.text.endswith("data: [DONE]\n\n")
    head = {k: chunks[0][k] for k in ("id", "created", "model")}
    common = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
    choice = {"index": 0, "logprobs": None}
    assert chunks == [
        {**common, "choices": [{**choice, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**common, "choices": [{**choice, "delta": {"content": "Hi"}, "finish_reason": None}]},
        {**common, "choices": [{**choice, "delta": {}, "finish_reason": "stop"}]},
    ]  # no usage chunk unless asked
    assert head["model"] == "head" and head["id"].startswith("chatcmpl-")


def test_pings_in_a_stream_are_comments(pool, tmp_path):
    pool.scripts = [[SILENT, SILENT, *answer("a")]]
    got = events(Bff(pool, tmp_path, first_response_wait_s=0, ping_interval_s=0.001)
                 .post("/v1/chat/completions", {**CHAT, "stream": True}).text)
    assert got[1] == "ping" and got[-1] == "[DONE]" and got[2]["choices"][0]["delta"] == {"content": "a"}


def test_a_failure_mid_stream_is_an_error_event_and_no_done(bff):
    bff.pool.scripts = [[*answer("a")[:1], TritonError("failed", "inference failed: RuntimeError: boom")]]
    got = events(bff.post("/v1/chat/completions", {**CHAT, "stream": True}).text)
    assert got[-1] == {"error": {"message": "the generation failed: inference failed: RuntimeError: boom",
                                 "type": "server_error", "param": None, "code": "failed"}}
    assert "[DONE]" not in got and got[1]["choices"][0]["delta"] == {"content": "a"}
    assert bff.pool.streams[0].closed


def test_a_failure_of_a_whole_completion_is_a_502(bff):
    bff.pool.scripts = [[*answer("a")[:1], TritonError("failed", "boom")]]
    r = bff.post("/v1/chat/completions", CHAT)
    assert r.status_code == 502
    assert r.json() == {"error": {"message": "the generation failed: boom", "type": "server_error", "param": None,
                                  "code": None}}


def test_openais_and_vllms_fields_reach_triton(bff):
    body = {"model": "head", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "b"}]},
        {"role": "user", "content": "again"}],  # sent as given: no repair on this surface
        "temperature": 0, "top_k": -1, "top_p": 0.5, "seed": 7, "max_tokens": 9, "max_completion_tokens": 5,
        "stop": "\n\n", "min_tokens": 2, "ignore_eos": True,
        "tool_choice": {"type": "function", "function": {"name": "web_search"}}}
    assert bff.post("/v1/chat/completions", body).status_code == 200
    sent = bff.pool.opened[0]
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                                {"role": "user", "content": "again"}]
    assert {k: sent[k] for k in ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop", "min_tokens",
                                 "ignore_eos", "force_tool", "min_answer_tokens")} == {
        "temperature": 0.0, "top_k": 0, "top_p": 0.5, "seed": 7, "max_tokens": 5, "stop": ["\n\n"], "min_tokens": 2,
        "ignore_eos": True, "force_tool": "web_search", "min_answer_tokens": None}


def test_integers_written_as_floats_reach_triton_as_integers(bff):
    # JSON Schema's "integer" admits 1.0; the packed INT32/INT64 inputs do not (it was a 500)
    body = {**CHAT, "seed": 7.0, "min_tokens": 2.0, "max_tokens": 9.0, "top_k": 5.0, "top_p": 1}
    assert bff.post("/v1/chat/completions", body).status_code == 200
    sent = bff.pool.opened[0]
    assert [(sent[k], type(sent[k])) for k in ("seed", "min_tokens", "max_tokens", "top_k", "top_p")] == [
        (7, int), (2, int), (9, int), (5, int), (1.0, float)]


def test_defaults_reach_triton(bff):
    s = bff.settings
    assert bff.post("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}).status_code == 200
    sent = bff.pool.opened[0]
    assert (sent["temperature"], sent["top_k"], sent["max_tokens"], sent["stop"], sent["force_tool"]) == \
        (s.temperature, s.top_k, s.max_tokens, [], None)


def test_errors_are_openais(bff):
    async def errors(client):
        with pytest.raises(openai.NotFoundError) as e:
            await client.chat.completions.create(model="gpt-4", messages=[USER])
        assert e.value.code == "model_not_found" and e.value.param == "model" and "`head`" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="head", messages=[USER], n=2)
        assert e.value.param == "n"
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="head", messages=[USER], max_tokens=4,
                                                 tool_choice={"type": "function", "function": {"name": "calculator"}})
        assert e.value.param == "tool_choice" and "web_search" in e.value.message

    sdk(bff, errors)
    with pytest.raises(openai.AuthenticationError):
        sdk(bff, lambda client: client.models.list(), api_key="wrong-key-of-16-chars")
    assert bff.pool.opened == []
    # the contract's header works here too, and the contract's routes keep their own error shape
    assert bff.get("/v1/models", headers=AUTH).status_code == 200
    assert bff.post("/generate", {}).json()["detail"]
    assert orjson.loads(bff.get("/v1/nothing").content) == {"error": {
        "message": "404 Not Found", "type": "not_found_error", "param": None, "code": None}}
