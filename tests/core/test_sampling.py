"""sample_rows (a batch whose rows each have their own generator) against nanochat's sample_next_token."""

import numpy as np
import pytest
import torch

from core.sampling import make_generator, sample_next_token, sample_rows

# greedy, top-k of several sizes (two rows share k=50), the whole vocabulary, and k beyond it
SETTINGS = [(0.0, None), (0.8, 50), (1.0, 50), (0.7, 5), (1.3, None), (0.9, 0), (1.0, 10_000), (0.0, 20)]


def test_rows_draw_what_sample_next_token_draws_row_by_row():
    rng = np.random.default_rng(0)
    V = 4096
    samplers = [(make_generator(i) if t > 0 else None, t, k, 1.0) for i, (t, k) in enumerate(SETTINGS)]
    replay = [(make_generator(i) if t > 0 else None, t, k) for i, (t, k) in enumerate(SETTINGS)]
    for _ in range(20):  # several steps: each row's generator advances once per step, alone
        logits = (3 * rng.standard_normal((len(SETTINGS), V))).astype(np.float32)
        got = sample_rows(logits, samplers)
        want = [int(sample_next_token(torch.from_numpy(logits[i:i + 1]), g, t, k))
                for i, (g, t, k) in enumerate(replay)]
        assert got == want


def test_greedy_ties_take_the_first_maximal_index_as_torch_does():
    logits = np.zeros((2, 100), dtype=np.float32)
    logits[0, [7, 42]] = 5.0
    logits[1, [3, 99]] = np.inf
    got = sample_rows(logits, [(None, 0.0, None, 1.0)] * 2)
    assert got == torch.argmax(torch.from_numpy(logits), dim=-1).tolist() == [7, 3]


def test_negative_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        sample_rows(np.zeros((1, 8), dtype=np.float32), [(None, -0.1, None, 1.0)])


def test_top_p_draws_only_from_the_nucleus_and_once_per_token():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 + 0.3 reaches it), 0 the first
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]], dtype=np.float32))
    for top_p, allowed in ((0.7, {1, 3}), (0.0, {1}), (0.5, {1}), (1.0, {0, 1, 2, 3})):
        rng = make_generator(3)
        drawn = {sample_rows(logits, [(rng, 1.0, None, top_p)])[0] for _ in range(200)}
        assert drawn <= allowed and (len(drawn) > 1) == (len(allowed) > 1), top_p
    # the generator advances by one draw per token, with or without top_p (nanochat's pace)
    a, b = make_generator(5), make_generator(5)
    sample_rows(logits, [(a, 1.0, None, 0.7)])
    sample_rows(logits, [(b, 1.0, None, 1.0)])
    assert torch.equal(a.get_state(), b.get_state())
