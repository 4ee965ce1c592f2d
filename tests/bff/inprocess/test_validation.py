"""Every validation rule of the BFF's bodies (/generate, OpenAI's chat, the swap): a 400 naming the problem,
before anything reaches Triton; and what passes them reaches Triton within the backend's own ranges."""

from __future__ import annotations

import logging

import pytest

from bff.validation import MAX_DEPTH, MAX_TOTAL_CHARS
from tests.bff.inprocess.client import events
from tests.support.bffkit import is_done
from tests.support.fake_triton import answer
from tools.bff_client import AUTH

USER = {"role": "user", "content": "hi"}


def msgs(*contents: str, role: str = "user") -> list[dict]:
    return [{"role": role, "content": c} for c in contents]


INVALID = [
    ("missing messages", {}, "'messages' is a required property"),
    ("body not an object", [USER], "is not of type 'object'"),
    ("force_web_search not a boolean", {"messages": [USER], "force_web_search": "yes"}, "body.force_web_search"),
    ("no messages", {"messages": []}, "body.messages"),
    ("501 messages", {"messages": msgs(*["x"] * 501)}, "body.messages"),
    ("message not an object", {"messages": ["hi"]}, "body.messages[0]"),
    ("message without content", {"messages": [{"role": "user"}]}, "'content' is a required property"),
    ("message with unknown field", {"messages": [{**USER, "name": "x"}]}, "'name' was unexpected"),
    ("empty content", {"messages": msgs("")}, "body.messages[0].content"),
    ("content of 8001 characters", {"messages": msgs("x" * 8001)}, "body.messages[0].content"),
    ("more than 32000 characters in total", {"messages": msgs(*["x" * 8000] * 4, "y")}, "in total"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, "body.messages[0].role"),
    ("system not first", {"messages": [USER, {"role": "system", "content": "x"}]}, "body.messages[1].role"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, "body.messages[0].content"),
    ("temperature below 0", {"messages": [USER], "temperature": -0.1}, "body.temperature"),
    ("temperature above 2", {"messages": [USER], "temperature": 2.01}, "body.temperature"),
    ("temperature not a number", {"messages": [USER], "temperature": "hot"}, "body.temperature"),
    ("top_k below 0", {"messages": [USER], "top_k": -1}, "body.top_k"),
    ("top_k above 200", {"messages": [USER], "top_k": 201}, "body.top_k"),
    ("top_k not an integer", {"messages": [USER], "top_k": 1.5}, "body.top_k"),
    ("max_tokens below 1", {"messages": [USER], "max_tokens": 0}, "body.max_tokens"),
    ("max_tokens above 4096", {"messages": [USER], "max_tokens": 4097}, "body.max_tokens"),
    # what the repair of a history (bff/conversation.py) cannot fix
    ("no user message", {"messages": [{"role": "assistant", "content": "x"}]}, "no user message"),
    ("last message not the user's", {"messages": [USER, {"role": "assistant", "content": "x"}]},
     "the last message must be from the user"),
]


@pytest.mark.parametrize(("body", "detail"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_rule_is_enforced(bff, body, detail):
    r = bff.post("/generate", body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert detail in r.json()["detail"]
    assert bff.pool.opened == []


@pytest.mark.parametrize(("raw", "detail"), [(b"{not json", "not valid JSON"), (b"", "JSON object is required")])
def test_body_must_be_json(bff, raw, detail):
    r = bff.post("/generate", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert detail in r.json()["detail"]


def test_body_size_is_bounded(bff):
    r = bff.post("/generate", content=b" " * ((1 << 20) + 1))
    assert r.status_code == 413
    assert "larger than" in r.json()["detail"]


def test_json_nested_a_thousand_deep_is_a_400_not_a_500(bff):
    body = '{"messages": ' + "[" * 1000 + "]" * 1000 + "}"
    r = bff.post("/generate", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json() == {"detail": f"body is nested more than {MAX_DEPTH} levels deep"}


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "system", "content": "be brief"}, USER, {"role": "assistant", "content": "hello"}, USER]},
    {"messages": [USER], "temperature": None, "top_k": None, "max_tokens": None},
    {"messages": [USER], "temperature": 0, "top_k": 0, "max_tokens": 1},
    {"messages": [USER], "temperature": 2, "top_k": 200, "max_tokens": 2},
    {"messages": [USER], "top_k": 5.0, "max_tokens": 2.0},
], ids=["leading system and turns", "nulls take defaults", "lower bounds", "upper bounds",
        "integral numbers written as floats"])
def test_limits_are_inclusive(bff, body):
    # the fake refuses what the backend would refuse (outside its input ranges): these reach Triton
    r = bff.post("/generate", body)
    assert r.status_code == 200, r.text
    assert is_done(events(r.text)[-1])
    (sent,) = bff.pool.opened
    assert isinstance(sent["top_k"], int) and isinstance(sent["max_tokens"], int)
    s = bff.settings
    assert sent["temperature"] == (s.temperature if body.get("temperature") is None else body["temperature"])


def test_32000_characters_pass_the_bff(bff):
    # Within the BFF's bound, so Triton sees it (the backend then cuts it, or refuses it for its context)
    roles = ["system", "user", "assistant", "user"]
    messages = [{"role": role, "content": "x" * (MAX_TOTAL_CHARS // 4)} for role in roles]
    r = bff.post("/generate", {"messages": messages, "max_tokens": 1})
    assert r.status_code == 200
    assert bff.pool.opened[0]["messages"] == messages


def test_unknown_fields_are_ignored_and_logged_once(bff, caplog):
    with caplog.at_level(logging.INFO, logger="bff.validation"):
        for _ in range(2):
            r = bff.post("/generate", {"messages": [USER], "conversation_id": "c-1", "client_version": 3})
            assert r.status_code == 200 and is_done(events(r.text)[-1])
    logged = [r.msg["field"] for r in caplog.records if isinstance(r.msg, dict)
              and r.msg.get("event") == "unknown_field_ignored"]
    assert sorted(logged) == ["client_version", "conversation_id"]


CHAT = {"model": "head", "messages": [USER]}
OPENAI_INVALID = [
    ("no model", {"messages": [USER]}, None, "'model' is a required property"),
    ("no messages", {"model": "head", "messages": []}, "messages", "body.messages"),
    ("two choices", {**CHAT, "n": 2}, "n", "body.n"),
    ("temperature above 2", {**CHAT, "temperature": 3}, "temperature", "body.temperature"),
    ("top_k below -1", {**CHAT, "top_k": -2}, "top_k", "body.top_k"),
    ("five stop strings", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "body.stop"),
    ("an unknown tool_choice", {**CHAT, "tool_choice": "always"}, "tool_choice", "body.tool_choice"),
    ("a forced tool other than web_search",
     {**CHAT, "tool_choice": {"type": "function", "function": {"name": "calculator"}}}, "tool_choice", "web_search"),
]


@pytest.mark.parametrize(("body", "param", "message"), [c[1:] for c in OPENAI_INVALID],
                         ids=[c[0] for c in OPENAI_INVALID])
def test_openais_rules_are_enforced_in_openais_shape(bff, body, param, message):
    r = bff.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert message in error["message"]
    assert bff.pool.opened == []


def test_unknown_openai_fields_are_ignored(bff):
    r = bff.post("/v1/chat/completions", {**CHAT, "frequency_penalty": 0.5, "user": "u-1"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello world"


@pytest.mark.parametrize(("body", "status", "detail"), [
    ({}, 400, "'model_tag' is a required property"),
    ({"model_tag": 5}, 400, "body.model_tag"),
    ({"model_tag": "nonexistent"}, 404, "no model 'nonexistent' in the repository"),
])
def test_the_swap_body(bff, body, status, detail):
    r = bff.post("/models/swap", body)
    assert r.status_code == status
    assert detail in r.json()["detail"]
    assert bff.pool.states["head"] == "READY"


def test_a_swap_to_a_model_of_the_repository(bff):
    r = bff.post("/models/swap", {"model_tag": "orig"})
    assert (r.status_code, r.json()) == (202, {"status": "draining", "current_model": "orig"})
    assert bff.pool.states["orig"] == "READY"
    bff.pool.scripts = [answer("x")]
    assert bff.post("/generate", {"messages": [USER]}).status_code == 200
    assert bff.pool.opened[-1]["model"] == "orig"
