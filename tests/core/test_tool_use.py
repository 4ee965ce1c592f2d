"""The calculator tool through the generation loop: forced tokens, their count toward max_tokens,
RNG consumption on forced steps, and nanochat's rules for which expressions are evaluated."""


import numpy as np
import pytest
import torch

from core.calculator import MAX_STRING, use_calculator
from core.device_sampling import DrawsOnHost
from core.generation import SamplingParams, generate
from core.sampling import make_generator, sample_next_token
from core.tokenizer import Tokenizer
from tests.support.oracles import oracle_tokenizer


class ScriptedRunner(DrawsOnHost):
    """Logits that put all weight on script[k] at the k-th call (past the script: spread out, so
    sampling is random), and a record of what was fed."""

    max_slots, max_seq = 1, 512

    def __init__(self, script, vocab):
        self.script, self.vocab, self.fed = script, vocab, []
        self.spread = np.random.RandomState(0).randn(1, vocab).astype(np.float32)

    def logits(self, step):
        if step >= len(self.script):
            return self.spread.copy()
        logits = np.full((1, self.vocab), -30.0, dtype=np.float32)
        logits[0, self.script[step]] = 30.0
        return logits

    def forward(self, input_ids, positions, slots):
        self.fed.append(input_ids[0].tolist())
        return self.logits(len(self.fed) - 1)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(oracle_tokenizer())


def run(tok, expr, tail, max_tokens=64, temperature=0.0):
    script = [tok.python_start, *tok.encode(expr), tok.python_end, *tail]
    runner = ScriptedRunner(script, tok.vocab_size)
    out = list(generate(runner, tok, [tok.bos, tok.user_start, tok.user_end, tok.assistant_start],
                        SamplingParams(temperature, None, max_tokens, 3)))
    return out, runner


def test_result_is_forced_and_fed_back(tok):
    # the model keeps running during the forced tokens; what it samples then is discarded
    discarded = [tok.bos] * (2 + len(tok.encode("14")))
    out, runner = run(tok, "2+3*4", discarded + tok.encode(" done") + [tok.assistant_end])
    tokens, forced = [t for t, _ in out], [f for _, f in out]
    call = [tok.python_start, *tok.encode("2+3*4"), tok.python_end]
    result = [tok.output_start, *tok.encode("14"), tok.output_end]
    assert tokens[: len(call) + len(result)] == call + result
    assert forced == [False] * len(call) + [True] * len(result) + [False] * (len(tokens) - len(call) - len(result))
    assert [f[0] for f in runner.fed[1:]] == tokens[:-1]
    assert tokens[-1] == tok.assistant_end


def test_forced_tokens_count_toward_max_tokens(tok):
    expr = "123456*654321"
    n_call = len(tok.encode(expr)) + 2
    out, _ = run(tok, expr, [tok.assistant_end], max_tokens=n_call + 2)
    assert len(out) == n_call + 2
    assert [f for _, f in out][-2:] == [True, True]
    assert out[n_call][0] == tok.output_start


def test_sampling_consumes_rng_on_forced_steps(tok):
    # script only up to the call: then the forced result, then random samples from spread logits
    out, runner = run(tok, "1+1", [], max_tokens=30, temperature=1.0)
    assert sum(f for _, f in out) == 3
    rng = make_generator(3)  # replay: one draw per step, forced steps included, as nanochat does
    for step, (token, forced) in enumerate(out):
        drawn = int(sample_next_token(torch.from_numpy(runner.logits(step)), rng, 1.0, None))
        if not forced:
            assert token == drawn, step


@pytest.mark.parametrize("expr, result", [
    ("2+3*4", 14), ("12/60", 0.2), ("0.2*50", 10.0), ("1,000+1", 1001), ("(1+2)*3", 9),
    ("'strawberry'.count('r')", 3), ("\"banana\".count(\"a\")", 3),
    ("2**10", None), ("1/0", None), ("__import__('os')", None), ("open('x').count('a')", None),
    ("'abc'.upper()", None), ("x+1", None), ("print(1)", None), ("", None), ("dir().count(1)", None),
])
def test_calculator_rules(expr, result):
    assert use_calculator(expr) == result


@pytest.mark.parametrize("expr, result", [
    ("'a'.ljust(1000000000).count(' ')", None),  # would allocate a gigabyte on the step thread
    ("'a'.ljust(99999).ljust(99999).zfill(100001).count('0')", None),
    ("'x'.center(99999999).count('x')", None),
    ("9" * 2200 + "*" + "9" * 2200, None),  # 4400 digits: Python cannot print it into the forced tokens
    ("'a'.ljust(50).count(' ')", 49), ("'ab'.zfill(10).count('0')", 8),  # within the bound: nanochat's result
    ("('Hello').lower().count('l')", 2), ("'x'.join('abc').count('x')", 2), ("9" * 40 + "*2", int("9" * 40) * 2),
])
def test_calculator_work_is_bounded_and_results_are_nanochats(expr, result):
    import tracemalloc

    tracemalloc.start()
    try:
        assert use_calculator(expr) == result
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * MAX_STRING, peak  # no gigabyte built, no huge int printed


def test_a_refused_bomb_forces_nothing(tok):
    out, _ = run(tok, "'a'.ljust(1000000000).count(' ')", [*tok.encode(" no"), tok.assistant_end])
    assert not any(f for _, f in out)


def test_rejected_expression_forces_nothing(tok):
    out, _ = run(tok, "2**10", [*tok.encode(" no"), tok.assistant_end])
    assert not any(f for _, f in out)
    assert tok.output_start not in [t for t, _ in out]
