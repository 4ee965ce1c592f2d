"""
The samosaChaat gateway's requests as it sends them today, against the real BFF and Triton (the head
oracle, 512-token context): every turn streams tokens and ends with a done event, however the gateway
built its history. Where the contract file is stricter than its client, the client wins (bff/openapi.yaml).
"""

from __future__ import annotations

import logging

import pytest

from tests.support.bffkit import is_done
from tools.bff_client import generate, text_of

pytestmark = pytest.mark.triton
BODY = {"temperature": 0.0, "max_tokens": 16, "top_k": 50}  # what the gateway sends beside the messages


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def chat(url: str, messages: list[dict], **fields) -> list[dict]:
    r, events = generate(url, {"messages": messages, **BODY, **fields})
    assert r.status_code == 200, r.text
    assert is_done(events[-1]) and not any("error" in e for e in events), events[-3:]
    assert text_of(events)
    return events


@pytest.mark.parametrize("force_web_search", [False, True])
def test_the_gateways_body_with_force_web_search(bff_url, force_web_search):
    events = chat(bff_url, [user("Why is the sky blue?")], force_web_search=force_web_search)
    # this model has no web search: the answer is the one the same request gets without the field
    assert text_of(events) == text_of(chat(bff_url, [user("Why is the sky blue?")]))


def test_a_30_turn_history_longer_than_the_context_is_cut(bff_url):
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(30):
        history += [user(f"Tell me about the number {i} and why it matters to us."),
                    assistant(f"The number {i} is one of many numbers, and it matters a little to everyone.")]
    history.append(user("And what about the sky?"))
    assert sum(len(m["content"]) for m in history) > 4 * 512  # several times the context, in any tokenizer
    events = chat(bff_url, history, max_tokens=64)
    done = events[-1]
    assert 0 < done["dropped_turns"] < 30
    assert done["usage"]["prompt_tokens"] <= 512 - 64  # room for min(max_tokens, 128) tokens of answer
    assert done["usage"]["completion_tokens"] >= len(events) - 1
    # the oldest whole turns went, the system message and the rest stayed: the same as sending the cut history
    kept = [history[0], *history[1 + 2 * done["dropped_turns"]:]]
    again = chat(bff_url, kept, max_tokens=64)
    assert text_of(again) == text_of(events) and again[-1]["dropped_turns"] == 0
    assert again[-1]["usage"] == done["usage"]


def test_only_a_last_message_too_long_alone_is_a_400_and_the_log_says_why(bff_url, caplog):
    with caplog.at_level(logging.INFO, logger="bff.access"):
        r, events = generate(bff_url, {"messages": [user("hi"), assistant("hello"), user("word " * 1500)]})
    assert r.status_code == 400 and events == []
    assert "does not fit the context" in r.json()["detail"]
    line = next(rec.msg for rec in caplog.records if isinstance(rec.msg, dict) and rec.msg.get("status") == 400)
    assert line["detail"] == r.json()["detail"]
