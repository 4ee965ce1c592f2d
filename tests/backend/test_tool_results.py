"""
A tool result taken whole (backend/scheduler.py `_take_forced`): a row drawn with the batch streams a long result at
once and puts it through the model a prefill chunk a step, not a token a step, and its answer goes on exactly as a
cold prefill of the same tokens would have it. The model is the real core (a small random checkpoint of each
generation: G4's smear reads the previous token's id across the chunk); only its first tokens are scripted, to write
the call.
"""

from __future__ import annotations

import threading
import time

import pytest

from backend.model_config import EngineConfig
from backend.scheduler import Scheduler
from core.checkpoint import find_checkpoint, open_checkpoint
from core.device_sampling import DrawsOnHost
from core.generation import SamplingParams, generate
from core.gpt import TorchRunner, build_gpt
from core.random_checkpoint import make_checkpoint
from core.tool_calls import ToolRegistry, ToolResult
from tests.support.schedkit import FakeSink

CHUNK = 64
RESULT = " ".join(f"word{i}" for i in range(100))  # about 500 tokens of result with its JSON (a 512-token vocabulary)


class CallingRunner(DrawsOnHost, TorchRunner):
    """The real core (its draw on the host, from forward's logits), whose first draws of the answer are a scripted
    call; it counts the calls it gets."""

    def __init__(self, model, prompt_len: int, call: list[int], **kw) -> None:
        super().__init__(model, **kw)
        self.prompt_len, self.call, self.calls = prompt_len, call, 0
        self.hold: threading.Event | None = None  # set: the first chunk of a result waits for it
        self.holding = threading.Event()

    def forward(self, input_ids, positions, slots):
        self.calls += 1
        if self.hold is not None and input_ids.shape[1] > 1 and positions[0] > self.prompt_len:
            self.holding.set()
            self.hold.wait(30)
            self.hold = None
        logits = super().forward(input_ids, positions, slots)
        for row, pos in enumerate(positions.tolist()):
            j = pos + input_ids.shape[1] - self.prompt_len  # the answer's token this row draws
            if 0 <= j < len(self.call):
                logits[row] = -1e9
                logits[row, self.call[j]] = 1e9
        return logits


def search(arguments: dict) -> tuple[dict, dict]:
    return {"query": arguments["query"], "results": [{"snippet": RESULT}]}, {}


@pytest.fixture(scope="module", params=["G0", "G4"])
def model(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    make_checkpoint(base, request.param, depth=2, n_embd=64, sequence_len=1024)
    loaded, tok = open_checkpoint(find_checkpoint("sft", nanochat_base=base))
    return build_gpt(loaded.config, loaded.state_dict), tok


def call_tokens(tok) -> list[int]:
    return [tok.python_start, *tok.encode('{"tool":"web_search","arguments":{"query":"q"}}'), tok.python_end]


def answer(model, tok, max_tokens: int, seed: int | None = None, cancel_while_feeding: bool = False):
    prompt = tok.render_for_completion([{"role": "user", "content": "look it up"}])
    call = call_tokens(tok)
    runner = CallingRunner(model, len(prompt), call, max_slots=2, max_seq=1024)
    sink = FakeSink()
    sched = Scheduler(runner, tok, sink, EngineConfig(prefill_chunk=CHUNK), tools=ToolRegistry({"web_search": search}))
    params = SamplingParams(0.0, None, max_tokens) if seed is None else SamplingParams(1.0, 50, max_tokens, seed=seed)
    try:
        if cancel_while_feeding:
            runner.hold = threading.Event()
        sched.submit("a", list(prompt), params)
        if cancel_while_feeding:
            assert runner.holding.wait(30), "the result never went through the model in a chunk"
            sink.cancelled.add("a")
            time.sleep(0.5)  # the response thread looks every 0.25 s and flags the row for the step thread
            runner.hold.set()
        sink.wait(1)
        ids, _, final, error = sink.result("a")
        assert error is None, error
        deadline = time.monotonic() + 10
        while sched.slots.free != 2 and time.monotonic() < deadline:  # the final goes out before the slot is freed
            time.sleep(0.01)
        free = sched.slots.free
        assert not sched._feeding
    finally:
        sched.close()
    forced = [tok.output_start, *tok.encode(ToolResult("web_search", True, search({"query": "q"})[0]).payload()),
              tok.output_end]
    return prompt, call, forced, ids, final, runner.calls, free


def test_a_long_result_goes_through_in_chunks_and_the_answer_goes_on_as_from_a_cold_prefill(model):
    m, tok = model
    prompt, call, forced, ids, final, calls, free = answer(m, tok, max_tokens=700)
    assert len(forced) > 400
    assert ids[: len(call) + len(forced)] == call + forced  # the call, then the whole result, streamed
    after = ids[len(call) + len(forced):]
    assert after, "the answer goes on after the result"
    # a cold greedy run over the same context gives the same continuation: the cache holds the result right
    cold = [t for t, _ in generate(TorchRunner(m, 1, 1024), tok, prompt + call + forced,
                                   SamplingParams(0.0, None, len(after)))]
    assert after == cold[: len(after)]
    # the result took a few calls, not one a token: prompt, call, result chunks, continuation
    assert calls <= 1 + len(call) + -(-len(forced) // CHUNK) + len(after) + 2, calls
    assert free == 2 and final.finish_reason in ("stop", "length")


def test_a_result_past_max_tokens_ends_the_answer_with_it(model):
    m, tok = model
    _, call, forced, ids, final, _, free = answer(m, tok, max_tokens=len(call_tokens(tok)) + 100)
    assert ids == (call + forced)[: len(ids)] and len(ids) == len(call) + 100
    assert final.finish_reason == "length" and free == 2  # nothing left running, the slot is free


def test_cancelled_while_its_result_goes_through_the_model(model):
    m, tok = model
    *_, final, _, free = answer(m, tok, max_tokens=700, cancel_while_feeding=True)
    assert final.finish_reason == "cancelled" and free == 2


def test_a_seeded_answer_takes_its_result_a_token_a_step_as_nanochat(model):
    """Its generator draws at every step, forced or not (nanochat's rule), so the result is not taken whole."""
    m, tok = model
    _, call, forced, ids, _, calls, _ = answer(m, tok, max_tokens=700, seed=3)
    assert ids[: len(call) + len(forced)] == call + forced
    assert calls >= len(call) + len(forced)

