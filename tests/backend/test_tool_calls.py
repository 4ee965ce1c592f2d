"""The registry tool channel through the real scheduler: JSON calls written with special-token markers and with text
markers, results in samosaChaat's shape, a call that hangs past its deadline while other rows decode, cancellation
while a call runs, and a forced search at the start of an answer. The runner is scripted; the tools are the real
calculator and a web_search stand-in (backend/web_search.py has its own tests against real HTTP servers)."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from backend.model_config import EngineConfig
from backend.requests import RequestError, parse_force
from backend.scheduler import Scheduler
from backend.tool_runs import registry_from_env
from core.calculator_tool import calculator
from core.device_sampling import DrawsOnHost
from core.generation import SamplingParams
from core.tokenizer import Tokenizer
from core.tool_calls import ToolCall, ToolRegistry, ToolResult, forced_text
from tests.support.httpkit import json_reply, searxng_results
from tests.support.oracles import oracle_tokenizer
from tests.support.schedkit import FakeSink

GREEDY = SamplingParams(0.0, None, 200)


class ScriptedModel(DrawsOnHost):
    """Each prompt has a script: the tokens its answer samples, in order. Tokens between a call's end and its
    result's end are forced by the scheduler (the draw there is discarded), so they do not move the script on."""

    prev = None

    def __init__(self, tok: Tokenizer, scripts: dict[tuple, list[int]], max_slots: int = 1) -> None:
        self.tok, self.scripts, self.max_slots, self.max_seq = tok, scripts, max_slots, 2048
        self.fed: dict[int, list[int]] = {}
        self.prefilled: list[list[int]] = []  # every prefill call's ids, for the forced search's prompt

    def forward(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        out = np.full((len(slots), self.tok.vocab_size), -30.0, dtype=np.float32)
        for row, (slot, pos) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
            fed = self.fed.setdefault(slot, [])
            del fed[pos:]
            fed += ids[row].tolist()
            if pos == 0:
                self.prefilled.append(list(fed))
            out[row, self.next_token(fed)] = 30.0
        return out

    def next_token(self, fed: list[int]) -> int:
        found = [(p, s) for p, s in self.scripts.items() if tuple(fed[: len(p)]) == p]
        if not found:  # a prompt read in chunks: this step's draw is not taken
            return self.tok.bos
        prompt, script = found[0]
        sampled, text = 0, b""
        for token in fed[len(prompt):]:
            sampled += not self._forced(text)
            text += self.tok.byte_table[token]
        if self._forced(text):
            return self.tok.encode(" x")[0]  # discarded: a result token is forced here
        return script[sampled] if sampled < len(script) else self.tok.assistant_end

    @staticmethod
    def _forced(text: bytes) -> bool:
        return text.count(b"<|python_end|>") > text.count(b"<|output_end|>")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(oracle_tokenizer())


def prompt(tok: Tokenizer, text: str) -> tuple:
    return tuple(tok.render_for_completion([{"role": "user", "content": text}]))


def start(tok, scripts, tools: dict | ToolRegistry, max_slots=1, **engine) -> tuple[Scheduler, ScriptedModel, FakeSink]:
    runner, sink = ScriptedModel(tok, scripts, max_slots), FakeSink()
    registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
    return Scheduler(runner, tok, sink, EngineConfig(**engine), tools=registry), runner, sink


def answer(sched, sink, handle, prompt_ids, params=GREEDY, **kw) -> tuple[list[int], str, object]:
    sched.submit(handle, list(prompt_ids), params, **kw)
    sink.wait(1)
    ids, text, final, error = sink.result(handle)
    assert error is None, error
    return ids, text, final


def special_call(tok, payload: str) -> list[int]:
    return [tok.python_start, *tok.encode(payload), tok.python_end]


def test_json_calculator_call_with_special_markers(tok):
    p = prompt(tok, "what is 2+3?")
    call = '{"tool": "calculator", "arguments": {"expression": "2+3"}}'
    sched, _, sink = start(tok, {p: special_call(tok, call) + tok.encode(" It is 5.")}, {"calculator": calculator})
    try:
        ids, text, final = answer(sched, sink, "a", p)
    finally:
        sched.close()
    result = '{"error":null,"metadata":{},"output":{"expression":"2+3","value":5},"success":true,"tool":"calculator"}'
    expected = [*special_call(tok, call), tok.output_start, *tok.encode(result), tok.output_end,
                *tok.encode(" It is 5.")]
    assert ids == expected
    assert text == tok.decode(expected)  # the markers reach the client as text: the UI's cards parse them
    assert final.finish_reason == "stop"


def test_json_search_call_with_text_markers_and_a_legacy_expression(tok):
    """A samosaChaat model writes the markers as text; its result comes back as text too. A payload that is not
    JSON is a calculator expression."""
    searched = []

    def search(arguments):
        searched.append(arguments)
        return {"query": arguments["query"], "results": [{"url": "https://example.com", "snippet": "42"}]}, \
            {"search_backend": "test"}

    p, q = prompt(tok, "search please"), prompt(tok, "legacy please")
    call = '<|python_start|>{"tool":"web_search","arguments":{"query":"meaning of life"}}<|python_end|>'
    scripts = {p: tok.encode("Let me look. " + call) + tok.encode(" The answer is 42."),
               q: tok.encode("<|python_start|>6*7<|python_end|>") + tok.encode(" So 42.")}
    sched, _, sink = start(tok, scripts, {"web_search": search, "calculator": calculator}, max_slots=2)
    try:
        _, text, _ = answer(sched, sink, "s", p)
        _, legacy, _ = answer(sched, sink, "l", q)
    finally:
        sched.close()
    result = ToolResult("web_search", True, {"query": "meaning of life",
                                             "results": [{"url": "https://example.com", "snippet": "42"}]},
                        metadata={"search_backend": "test"}).payload()
    assert text == f"Let me look. {call}<|output_start|>{result}<|output_end|> The answer is 42."
    assert searched == [{"query": "meaning of life"}]
    payload = legacy.split("<|output_start|>")[1].split("<|output_end|>")[0]
    assert json.loads(payload)["output"] == {"expression": "6*7", "value": 42}
    assert legacy.endswith("<|output_end|> So 42.")


def test_a_models_search_reads_the_configured_backend(tok, server):
    """The real tools (backend/tool_runs.py) over a SearXNG on loopback, named by the environment as in production;
    without one, the same call gets a failed result and the answer goes on."""
    server.routes["/search"] = json_reply(searxng_results(2))
    call = '{"tool":"web_search","arguments":{"query":"nanochat","top_k":1}}'
    p = prompt(tok, "find it")
    scripts = {p: tok.encode(f"<|python_start|>{call}<|python_end|>") + tok.encode(" Found it.")}
    texts = []
    for environ in ({"SEARXNG_URL": server.url("")}, {}):
        sched, _, sink = start(tok, scripts, registry_from_env(5.0, environ))
        try:
            texts.append(answer(sched, sink, "s", p)[1])
        finally:
            sched.close()
    results = [json.loads(t.split("<|output_start|>")[1].split("<|output_end|>")[0]) for t in texts]
    assert [r.query for r in server.requests] == [{"q": ["nanochat"], "format": ["json"]}]
    assert results[0] == {"error": None, "metadata": {"num_results": 1, "search_backend": "searxng"},
                          "output": {"query": "nanochat", "results": [{"snippet": "about 0", "title": "R0",
                                                                       "url": "https://r0.test/"}]},
                          "success": True, "tool": "web_search"}
    assert results[1]["success"] is False and results[1]["error"] == "no search backend configured"
    assert all(t.endswith("<|output_end|> Found it.") for t in texts)


def test_a_hanging_tool_does_not_hold_the_other_rows(tok):
    """One row's search hangs past its deadline while 8 others decode: they finish, token for token as without it,
    before the deadline; the hanging row then gets a failed result and finishes too."""
    release = threading.Event()

    def hang(arguments):
        release.wait(30)
        return {}

    hanging = prompt(tok, "hang")
    others = {prompt(tok, f"row {i}"): tok.encode(f" answer number {i} " * 8) for i in range(8)}
    scripts = {hanging: special_call(tok, '{"tool":"web_search","arguments":{"query":"q"}}') + tok.encode(" ok"),
               **others}
    sched, _, sink = start(tok, scripts, {"web_search": hang}, max_slots=9, tool_timeout_ms=2000)
    try:
        sched.submit("hang", list(hanging), GREEDY)
        for i, p in enumerate(others):
            sched.submit(i, list(p), GREEDY)
        sink.wait(8)
        # had the step loop waited for the call, the hanging row's deadline would have ended it first
        assert not sink.responses["hang"][-1][2], "the other rows waited for the hanging call"
        sink.wait(1)
    finally:
        release.set()
        sched.close()
    for i, script in enumerate(others.values()):
        ids, _, final, error = sink.result(i)
        assert error is None and ids == script and final.finish_reason == "stop"
    _, text, final, error = sink.result("hang")
    assert error is None and final.finish_reason == "stop"
    assert '"error":"web_search timed out after 2 s"' in text and text.endswith("<|output_end|> ok")
    assert sched.slots.free == 9


def test_cancelled_while_its_call_runs(tok):
    release = threading.Event()
    p = prompt(tok, "cancel me")
    scripts = {p: special_call(tok, '{"tool":"web_search","arguments":{"query":"q"}}')}
    sched, _, sink = start(tok, scripts, {"web_search": lambda a: release.wait(30) and {}}, tool_timeout_ms=60_000)
    try:
        sched.submit("c", list(p), GREEDY)
        deadline = time.monotonic() + 10
        while not sched._calling and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched._calling, "the call never started"
        sink.cancelled.add("c")
        sink.wait(1)
        deadline = time.monotonic() + 10
        while sched.slots.free != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        release.set()
        sched.close()
    assert sink.result("c")[2].finish_reason == "cancelled"
    assert sched.slots.free == 1 and not sched._calling


def test_a_forced_search_starts_the_answer(tok):
    """The call and its result are streamed before the first sampled token and are in the prompt the model reads."""
    def search(arguments):
        return {"query": arguments["query"], "results": [{"url": "https://example.com/news", "title": "News"}]}

    p = prompt(tok, "latest news")
    call = ToolCall("web_search", {"query": "latest news", "top_k": 3})
    preface = forced_text(call, ToolResult("web_search", True, search(call.arguments)))
    scripts = {(*p, *tok.encode(preface)): tok.encode(" Here is the news.")}
    sched, runner, sink = start(tok, scripts, {"web_search": search})
    try:
        sched.submit("f", list(p), GREEDY, force=call)
        sink.wait(1)
    finally:
        sched.close()
    first = sink.responses["f"][0][0]
    assert first.text == preface  # a response of its own, before the model's first token
    _, text, final, error = sink.result("f")
    assert error is None and text == preface + " Here is the news." and final.finish_reason == "stop"
    assert runner.prefilled[0] == [*p, *tok.encode(preface)]
    assert final.prompt_tokens == len(p) + len(tok.encode(preface))


def test_a_forced_search_that_leaves_no_room_is_skipped_and_logged(tok):
    p = prompt(tok, "latest news")
    logged = []
    runner, sink = ScriptedModel(tok, {p: tok.encode(" plain")}), FakeSink()
    runner.max_seq = len(p) + 20  # the search's call and result take more than that
    search = {"web_search": lambda a: {"query": a["query"], "results": [{"url": "https://example.com/" + "x" * 99}]}}
    sched = Scheduler(runner, tok, sink, EngineConfig(), tools=ToolRegistry(search),
                      log=lambda event, **fields: logged.append((event, fields)))
    try:
        _, text, final = answer(sched, sink, "f", p, force=ToolCall("web_search", {"query": "latest news"}))
    finally:
        sched.close()
    assert text == " plain" and final.prompt_tokens == len(p)
    assert [event for event, _ in logged] == ["force_tool_skipped"] and logged[0][1]["max_seq"] == len(p) + 20


def test_calls_beyond_the_bound_fail_at_once(tok):
    calls = [t for i in range(6) for t in tok.encode(f"<|python_start|>{i}+1<|python_end|>")]
    p = prompt(tok, "many")
    sched, _, sink = start(tok, {p: calls}, {"calculator": calculator})
    try:
        sched.submit("m", list(p), SamplingParams(0.0, None, 600))
        sink.wait(1)
    finally:
        sched.close()
    text = sink.result("m")[1]
    results = [json.loads(r.split("<|output_end|>")[0]) for r in text.split("<|output_start|>")[1:]]
    assert len(results) >= 5
    assert [r["success"] for r in results[:4]] == [True] * 4
    assert results[4] == {"error": "more than 4 tool calls in one answer", "metadata": {}, "output": None,
                          "success": False, "tool": "calculator"}


def test_force_tool_input():
    """`force_tool` as Triton hands it (a BYTES tensor): a search on the last user message's question."""
    messages = json.dumps([{"role": "user", "content": "You are samosaChaat.\n\nWho won?"}]).encode()
    inputs = {"messages": np.array([messages], dtype=np.object_), "force_tool": np.array([b"web_search"],
                                                                                          dtype=np.object_)}
    assert parse_force(inputs.get) == ToolCall("web_search", {"query": "Who won?", "top_k": 3})
    assert parse_force({"messages": inputs["messages"]}.get) is None
    for bad, why in [({**inputs, "force_tool": np.array([b"calculator"], dtype=np.object_)}, "one of ['web_search']"),
                     ({**inputs, "force_tool": np.array([b"a", b"b"], dtype=np.object_)}, "one string"),
                     ({"force_tool": inputs["force_tool"]}, "needs `messages`")]:
        with pytest.raises(RequestError, match=re.escape(why)):
            parse_force(bad.get)


def test_why_a_forced_search_would_be_skipped(tok):
    """model.py serves a forced search as a plain turn, with this reason in its log line, when nothing could run it."""
    runner, sink = ScriptedModel(tok, {}), FakeSink()
    cases = [(None, "the model's tool channel is nanochat's calculator (export with TOOL_CHANNEL=registry)"),
             (registry_from_env(5.0, {}), "no search backend configured"),
             (registry_from_env(5.0, {"SEARXNG_URL": "http://127.0.0.1:9"}), "")]
    for tools, why in cases:
        sched = Scheduler(runner, tok, sink, EngineConfig(), tools=tools)
        try:
            assert sched.cannot_force_why == why
        finally:
            sched.close()
