"""The batched draw (core/device_sampling.py) against the distribution it must sample: for each row's settings,
softmax(top-k(logits) / T) with top_p's nucleus, computed here in numpy; a chi-square test per row at a fixed
seed, several temperatures, k and top_p in one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.device_sampling import NOT_FINITE, BatchSampling, draw

V = 64
DRAWS = 20_000
SETTINGS = [  # (temperature, top_k (0: all), top_p)
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 10, 1.0), (0.8, 50, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.6, 20, 0.5),
    (2.0, 3, 1.0),
]


def expected(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    order = np.argsort(-logits, kind="stable")
    keep = order[: top_k or len(logits)]
    z = logits[keep].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        before = np.cumsum(p) - p
        p = np.where(before < top_p, p, 0.0)
        p[0] = p[0] or 1.0
        p /= p.sum()
    out = np.zeros(len(logits))
    out[keep] = p
    return out


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """P-value of counts against probs (categories expected >= 5 times; the rest pooled)."""
    n = counts.sum()
    big = probs * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(probs[big] * n, probs[~big].sum() * n)
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def batch(settings, exact=None) -> BatchSampling:
    t, k, p = zip(*settings, strict=True)
    return BatchSampling(np.array(t, dtype=np.float32), np.array(k, dtype=np.int64), np.array(p, dtype=np.float32),
                         np.zeros(len(settings), bool) if exact is None else np.array(exact))


def test_each_rows_draws_follow_its_own_distribution():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(SETTINGS), V)) * 2).astype(np.float32)
    reps = DRAWS
    table = torch.from_numpy(np.repeat(logits, reps, axis=0))  # row i's settings repeated: one batch, one call
    sampling = batch([s for s in SETTINGS for _ in range(reps)])
    tokens = draw(table, sampling, torch.Generator().manual_seed(1)).tokens.reshape(len(SETTINGS), reps)
    for i, (t, k, p) in enumerate(SETTINGS):
        probs = expected(logits[i], t, k, p)
        counts = np.bincount(tokens[i], minlength=V)
        assert not counts[probs == 0].any(), f"row {i} {SETTINGS[i]} drew a token outside its top-k / nucleus"
        assert chi_square_p(counts, probs) > 1e-4, f"row {i} {SETTINGS[i]}"


def test_a_wrong_distribution_fails_the_check():
    """The check can fail: the draws of temperature 1 against the distribution of temperature 0.7."""
    logits = (np.random.default_rng(0).standard_normal(V) * 2).astype(np.float32)
    tokens = draw(torch.from_numpy(np.tile(logits, (DRAWS, 1))), batch([(1.0, 0, 1.0)] * DRAWS),
                  torch.Generator().manual_seed(1)).tokens
    assert chi_square_p(np.bincount(tokens, minlength=V), expected(logits, 0.7, 0, 1.0)) < 1e-6


def test_greedy_rows_take_the_argmax_and_exact_rows_bring_their_logits_back():
    logits = np.random.default_rng(2).standard_normal((4, V)).astype(np.float32)
    got = draw(torch.from_numpy(logits.copy()), batch([(0.0, 0, 1.0), (1.0, 50, 1.0), (0.0, 5, 1.0), (0.9, 0, 1.0)],
                                                      exact=[False, True, False, True]), torch.Generator())
    assert got.tokens[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()
    np.testing.assert_array_equal(got.exact_logits, logits[[1, 3]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_row_of_logits_that_are_not_finite_gets_its_mark_and_the_others_their_tokens(bad):
    logits = np.random.default_rng(3).standard_normal((3, V)).astype(np.float32)
    logits[1] = bad if bad == -np.inf else logits[1]
    logits[1, 7] = bad
    got = draw(torch.from_numpy(logits), batch([(1.0, 50, 1.0), (1.0, 50, 1.0), (1.0, 0, 1.0)]), torch.Generator())
    assert got.tokens[1] == NOT_FINITE and NOT_FINITE not in got.tokens[[0, 2]]
