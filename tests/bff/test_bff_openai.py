"""
The OpenAI surface (bff/openai.py) with the official `openai` client against the live BFF and the real
Triton, serving the head oracle: answers are nanochat's greedy references, streamed and whole, with stop
strings, seeds, usage, and the backend's refusals in OpenAI's shape (the surface's logic: tests/bff/inprocess/).
"""

from __future__ import annotations

import openai
import pytest

from tools.bff_client import KEY
from tools.measure import SERVER_TIMEOUT_S

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def client(bff_url):
    return openai.OpenAI(base_url=bff_url + "/v1", api_key=KEY, max_retries=0, timeout=SERVER_TIMEOUT_S)


def conversation(oracle_references, i: int = 0) -> dict:
    return oracle_references["head"]["conversations"][i]


def test_a_whole_completion_is_nanochats_greedy_answer(client, oracle_references):
    conv = conversation(oracle_references)
    r = client.chat.completions.create(model="head", messages=conv["messages"], temperature=0, max_tokens=32)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "head" and r.created > 0
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == conv["greedy"]["text"]
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (conv["prompt_len"], 32)
    assert r.usage.total_tokens == conv["prompt_len"] + 32


def test_a_streamed_completion_has_openais_chunks_and_usage(client, oracle_references):
    conv = conversation(oracle_references, 1)
    chunks = list(client.chat.completions.create(model="head", messages=conv["messages"], temperature=0,
                                                 max_completion_tokens=32, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == conv["greedy"]["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32


def test_stop_strings_end_the_answer_before_them(client, oracle_references):
    conv = conversation(oracle_references)
    full = conv["greedy"]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]  # three characters from the middle of the answer
    cut = full[: full.index(stop)]
    whole = client.chat.completions.create(model="head", messages=conv["messages"], temperature=0, max_tokens=32,
                                           stop=[stop, "never-appears"])
    assert whole.choices[0].message.content == cut and whole.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="head", messages=conv["messages"], temperature=0, max_tokens=32,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_a_seed_gives_nanochats_seeded_answer(client, oracle_references):
    conv = conversation(oracle_references)
    want = conv["sampled_t1_k50_seed42"]
    p = want["params"]
    answers = [client.chat.completions.create(model="head", messages=conv["messages"], temperature=p["temperature"],
                                              max_tokens=p["max_tokens"], seed=p["seed"],
                                              extra_body={"top_k": p["top_k"]}).choices[0].message.content
               for _ in range(2)]
    assert answers[0] == answers[1] == want["text"]  # nanochat's own seeded sample, top_k as vLLM takes it


def test_a_prompt_longer_than_the_context_is_openais_context_length_exceeded(client):
    # the backend's own refusal, as vLLM answers it (the other error shapes: tests/bff/inprocess/test_openai.py)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="head", messages=[{"role": "user", "content": "word " * 1500}])
    assert e.value.code == "context_length_exceeded" and "context" in e.value.message


def test_tool_choice_naming_web_search(client, oracle_references):
    """tool_choice naming web_search is /generate's force_web_search: on the head oracle (nanochat's tool channel)
    the backend serves the turn as it is, token for token."""
    conv = conversation(oracle_references)
    forced = {"type": "function", "function": {"name": "web_search"}}
    r = client.chat.completions.create(model="head", messages=conv["messages"], temperature=0, max_tokens=32,
                                       tool_choice=forced)
    assert r.choices[0].message.content == conv["greedy"]["text"]
    assert client.chat.completions.create(model="head", messages=conv["messages"], temperature=0, max_tokens=4,
                                          tool_choice="auto").choices[0].message.content


def test_vllms_length_controls(client, oracle_references):
    """min_tokens and ignore_eos as AIPerf and vLLM's benchmark send them (extra_body), through the backend: a stop
    string early in the greedy answer does not end it before min_tokens; ignore_eos runs to max_tokens exactly; a
    min_tokens above max_tokens is the backend's 400."""
    conv = conversation(oracle_references)
    full = conv["greedy"]["text"]
    stop = full[3:6]  # within the answer's first few tokens
    early = client.chat.completions.create(model="head", messages=conv["messages"], temperature=0, max_tokens=32,
                                           stop=[stop])
    held = client.chat.completions.create(model="head", messages=conv["messages"], temperature=0, max_tokens=32,
                                          stop=[stop], extra_body={"min_tokens": 20})
    assert early.usage.completion_tokens < 20 <= held.usage.completion_tokens
    assert held.choices[0].message.content.startswith(full[: full.index(stop) + len(stop)])
    r = client.chat.completions.create(model="head", messages=conv["messages"], temperature=0.9, max_tokens=24,
                                       extra_body={"ignore_eos": True, "top_k": 0})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (24, "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="head", messages=conv["messages"], max_tokens=4,
                                       extra_body={"min_tokens": 5})
    assert "min_tokens (5) must be at most max_tokens (4)" in e.value.message
