"""samosaChaat's tool channel in the model core: which payloads are calls, the result's exact shape and its bound,
calls found in sampled tokens written with special tokens or as text (split across tokens), and the reference
generation loop answering them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.calculator_tool import calculator
from core.call_scanner import SPECIAL, TEXT, CallScanner
from core.device_sampling import DrawsOnHost
from core.generation import SamplingParams, generate
from core.tokenizer import Tokenizer
from core.tool_calls import (
    MAX_PAYLOAD_CHARS,
    ToolCall,
    ToolRegistry,
    ToolResult,
    call_text,
    forced_text,
    parse_call,
    search_query,
)
from tests.support.oracles import oracle_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(oracle_tokenizer())


@pytest.mark.parametrize(("payload", "call"), [
    ('{"tool": "web_search", "arguments": {"query": "q"}}', ToolCall("web_search", {"query": "q"})),
    ('{"tool_name": "calculator", "args": {"expression": "1+1"}}', ToolCall("calculator", {"expression": "1+1"})),
    ('{"name": "web_search"}', ToolCall("web_search", {})),
    ("  2+3*4 ", ToolCall("calculator", {"expression": "2+3*4"})),  # nanochat's legacy expression
    ('{"tool": 5, "arguments": {}}', ToolCall("calculator", {"expression": '{"tool": 5, "arguments": {}}'})),
    ('["web_search"]', ToolCall("calculator", {"expression": '["web_search"]'})),
    ("", ToolCall("calculator", {"expression": ""})),
])
def test_payloads(payload, call):
    assert parse_call(payload) == call


def test_results_have_samosachaats_shape():
    registry = ToolRegistry({"calculator": calculator, "boom": lambda a: 1 / 0})
    assert registry.execute(ToolCall("nope", {})).payload() == \
        '{"error":"Unknown tool: nope","metadata":{},"output":null,"success":false,"tool":"nope"}'
    broken = json.loads(registry.execute(ToolCall("boom", {})).payload())
    assert broken["success"] is False and broken["error"] == "ZeroDivisionError: division by zero"
    assert json.loads(registry.execute(ToolCall("calculator", {})).payload())["error"] == "Missing expression"
    assert call_text(ToolCall("web_search", {"query": "é"})) == '{"arguments":{"query":"\\u00e9"},"tool":"web_search"}'


def test_a_long_result_is_shortened_and_still_json():
    results = [{"url": f"https://example.com/{i}", "snippet": "ü" * 900 + str(i)} for i in range(8)]
    payload = ToolResult("web_search", True, {"query": "q", "results": results}).payload()
    parsed = json.loads(payload)  # samosaChaat cuts the string at 4,096 and leaves broken JSON; here it parses
    assert len(payload) <= MAX_PAYLOAD_CHARS
    assert [r["url"] for r in parsed["output"]["results"]] == [r["url"] for r in results]
    assert all(r["snippet"].endswith("...") for r in parsed["output"]["results"])
    huge_keys = ToolResult("t", True, {f"k{i:05}": 1 for i in range(2000)}).payload()
    assert json.loads(huge_keys) == {"error": "result too long", "metadata": {}, "output": None, "success": True,
                                     "tool": "t"}


def test_search_query_is_the_last_user_message_after_the_gateways_system_prompt():
    messages = [{"role": "user", "content": "You are samosaChaat.\n\nhi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "You are samosaChaat.\n\n  weather in Pune today? "}]
    assert search_query(messages) == "weather in Pune today?"
    assert search_query([{"role": "system", "content": "s"}]) == ""


def scan(tok, ids):
    scanner, found = CallScanner(tok), []
    for t in ids:
        if (hit := scanner.push(t)) is not None:
            found.append(hit)
    return found


def test_calls_with_special_tokens_and_with_text_markers_split_across_tokens(tok):
    payload = '{"tool":"web_search","arguments":{"query":"x"}}'
    special = [tok.python_start, *tok.encode(payload), tok.python_end]
    assert scan(tok, tok.encode("before ") + special + tok.encode(" after")) == [(SPECIAL, payload)]
    text = tok.encode(f"I'll check.<|python_start|>{payload}<|python_end|> done")
    assert any(len(tok.decode([t])) < len("<|python_start|>") and "|" in tok.decode([t]) for t in text)  # split
    assert scan(tok, text) == [(TEXT, payload)]
    # one token at a time: every marker split at every byte boundary
    singles = [t for ch in f"a<|python_start|>{payload}<|python_end|>" for t in tok.encode(ch)]
    assert scan(tok, singles) == [(TEXT, payload)]
    assert scan(tok, tok.encode("<|python_start|> never closed")) == []
    assert scan(tok, tok.encode("<|python_end|> alone")) == []


class Scripted(DrawsOnHost):
    max_slots, max_seq, prev = 1, 512, None

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, 0

    def forward(self, ids, positions, slots):
        out = np.full((1, self.tok.vocab_size), -30.0, dtype=np.float32)
        out[0, self.script[self.calls] if self.calls < len(self.script) else self.tok.assistant_end] = 30.0
        self.calls += 1
        return out


def test_generate_answers_registry_calls_and_leaves_nanochats_channel_alone(tok):
    call = f"<|python_start|>{call_text(ToolCall('calculator', {'expression': '6*7'}))}<|python_end|>"
    script = tok.encode(call)
    prompt = tok.render_for_completion([{"role": "user", "content": "6*7?"}])
    params = SamplingParams(0.0, None, 200)
    out = [t for t, _ in generate(Scripted(tok, script), tok, prompt, params,
                                  tools=ToolRegistry({"calculator": calculator}))]
    result = ToolResult("calculator", True, {"expression": "6*7", "value": 42}).payload()
    assert tok.decode(out[:-1]).startswith(call + "<|output_start|>" + result + "<|output_end|>")
    # the same text under nanochat's channel is just text: its calculator listens to special tokens only
    plain = [t for t, forced in generate(Scripted(tok, script), tok, prompt, params)]
    assert plain == [*script, tok.assistant_end]


def test_forced_text():
    call, result = ToolCall("web_search", {"query": "q", "top_k": 3}), ToolResult("web_search", False, error="e")
    assert forced_text(call, result) == ('<|python_start|>{"arguments":{"query":"q","top_k":3},"tool":"web_search"}'
                                         '<|python_end|><|output_start|>{"error":"e","metadata":{},"output":null,'
                                         '"success":false,"tool":"web_search"}<|output_end|>\n')
