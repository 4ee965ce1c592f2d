"""Every validation rule of POST /generate, over real HTTP: 400 {"detail": ...} naming the problem."""

from __future__ import annotations

import httpx
import pytest

from tests.support.bffkit import is_done
from tools.bff_client import AUTH, generate
from tools.measure import SERVER_TIMEOUT_S

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
]


@pytest.mark.triton
@pytest.mark.parametrize(("body", "detail"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_rule_is_enforced(bff_url, body, detail):
    r, events = generate(bff_url, body)
    assert r.status_code == 400, r.text
    assert events == []
    assert detail in r.json()["detail"]


@pytest.mark.triton
@pytest.mark.parametrize(("raw", "detail"), [(b"{not json", "not valid JSON"), (b"", "JSON object is required")])
def test_body_must_be_json(bff_url, raw, detail):
    r = httpx.post(bff_url + "/generate", content=raw, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=SERVER_TIMEOUT_S)
    assert r.status_code == 400
    assert detail in r.json()["detail"]


@pytest.mark.triton
def test_body_size_is_bounded(bff_url):
    r = httpx.post(bff_url + "/generate", content=b" " * ((1 << 20) + 1), headers=AUTH, timeout=SERVER_TIMEOUT_S)
    assert r.status_code == 413
    assert "larger than" in r.json()["detail"]


@pytest.mark.triton
@pytest.mark.parametrize("body", [
    {"messages": [{"role": "system", "content": "be brief"}, USER, {"role": "assistant", "content": "hello"}, USER]},
    {"messages": [USER], "temperature": None, "top_k": None, "max_tokens": None},
    {"messages": [USER], "temperature": 0, "top_k": 0, "max_tokens": 1},
    {"messages": [USER], "temperature": 2, "top_k": 200, "max_tokens": 2},
    {"messages": [USER], "top_k": 5.0, "max_tokens": 2.0},
], ids=["leading system and turns", "nulls take defaults", "lower bounds", "upper bounds",
        "integral numbers written as floats"])
def test_limits_are_inclusive(bff_url, body):
    r, events = generate(bff_url, body)
    assert r.status_code == 200, r.text
    assert is_done(events[-1])


@pytest.mark.triton
def test_32000_characters_pass_the_bff(bff_url):
    # Within the BFF's bound, so Triton sees it; the 512-token oracle then refuses it for its context.
    roles = ["system", "user", "assistant", "user"]
    r, _ = generate(bff_url, {"messages": [{"role": role, "content": "x" * 8000} for role in roles], "max_tokens": 1})
    assert r.status_code == 400
    assert "context" in r.json()["detail"]
