"""vLLM's length controls through the real scheduler and the draw: `min_tokens` (no stop token or stop string before
it) and `ignore_eos` (no stop token at all), with a runner whose first choice is always to stop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.model_config import EngineConfig
from backend.requests import RequestError, parse_params
from backend.scheduler import Scheduler
from core.device_sampling import BatchSampling, DrawsOnHost, draw
from core.generation import SamplingParams
from core.tokenizer import Tokenizer
from tests.support.oracles import oracle_tokenizer
from tests.support.schedkit import FakeSink


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(oracle_tokenizer())


class WantsToStop(DrawsOnHost):
    """Every row's most likely token is <|assistant_end|>, then <|bos|>, then "ab" ; all else far below."""

    max_slots, max_seq, prev = 4, 256, None

    def __init__(self, tok: Tokenizer) -> None:
        self.logits = np.full(tok.vocab_size, -20.0, dtype=np.float32)
        self.word = tok.encode("ab")[0]
        # "ab" far below the stops: a sampled row stops at its first chance (at T 0.7 "ab" is drawn once in 10^5;
        # at 7.0 it was once in 23, and the min_tokens test failed a CI run)
        self.logits[[tok.assistant_end, tok.bos, self.word]] = [9.0, 8.0, 1.0]

    def forward(self, ids, positions, slots):
        return np.tile(self.logits, (len(slots), 1))


def run(tok, params: SamplingParams, stops=()) -> tuple[list[int], str, object]:
    runner, sink = WantsToStop(tok), FakeSink()
    sched = Scheduler(runner, tok, sink, EngineConfig())
    try:
        sched.submit("r", tok.render_for_completion([{"role": "user", "content": "hi"}]), params, stops=list(stops))
        sink.wait(1)
    finally:
        sched.close()
    ids, text, final, error = sink.result("r")
    assert error is None, error
    return ids, text, final


@pytest.mark.parametrize("seed", [None, 7], ids=["batch-draw", "seeded-exact"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_min_tokens_holds_the_stop_back(tok, seed, temperature):
    ids, _, final = run(tok, SamplingParams(temperature, 3, 50, seed=seed, min_tokens=6))
    assert len(ids) == 6 and tok.assistant_end not in ids and tok.bos not in ids
    assert (final.finish_reason, final.completion_tokens) == ("stop", 6)  # the 7th draw may stop, and does
    _, _, plain = run(tok, SamplingParams(0.0, None, 50))
    assert (plain.finish_reason, plain.completion_tokens) == ("stop", 0)


def test_ignore_eos_runs_to_max_tokens(tok):
    ids, _, final = run(tok, SamplingParams(0.0, None, 20, ignore_eos=True))
    assert ids == [WantsToStop(tok).word] * 20 and (final.finish_reason, final.completion_tokens) == ("length", 20)


def test_stop_strings_wait_for_min_tokens(tok):
    _, text, final = run(tok, SamplingParams(0.0, None, 10, ignore_eos=True), stops=["ab"])
    assert (text, final.finish_reason) == ("", "stop")  # the first token's text is the stop string
    _, text, final = run(tok, SamplingParams(0.0, None, 10, ignore_eos=True, min_tokens=3), stops=["ab"])
    assert (text, final.finish_reason) == ("ababab", "stop")  # matched from the 4th token on


def test_the_draw_masks_held_rows_only():
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.0]] * 3)
    sampling = BatchSampling(np.zeros(3, np.float32), np.zeros(3, np.int64), np.ones(3, np.float32),
                             np.array([False, False, True]), np.array([True, False, True]), (0, 1))
    drawn = draw(logits.clone(), sampling, torch.Generator().manual_seed(0))
    assert drawn.tokens[:2].tolist() == [2, 0]
    assert np.isneginf(drawn.exact_logits[0, :2]).all() and drawn.exact_logits[0, 2] == 4.0


def test_min_tokens_above_max_tokens_is_refused():
    inputs = {"min_tokens": np.array([9], np.int32), "max_tokens": np.array([8], np.int32)}
    with pytest.raises(RequestError, match=r"min_tokens \(9\) must be at most max_tokens \(8\)"):
        parse_params(inputs.get)
    assert parse_params({"ignore_eos": np.array([True])}.get).ignore_eos
