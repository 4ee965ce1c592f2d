"""The batched draw (core/device_sampling.py) against the distribution it must sample (tools/sampler_check.py): a
chi-square test per row at a fixed seed, several temperatures, k and top_p in one batch; the check can fail; greedy
and exact rows; rows whose logits are not finite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.device_sampling import NOT_FINITE, draw
from tools.sampler_check import SETTINGS, batch, chi_square_p, distribution_check, expected

V = 64


def test_each_rows_draws_follow_its_own_distribution():
    results = distribution_check("cpu", vocab=V)
    assert [s for s, _, _ in results] == SETTINGS
    for settings, p, outside in results:
        assert outside == 0, f"{settings} drew a token outside its top-k / nucleus"
        assert p > 1e-4, settings


def test_a_wrong_distribution_fails_the_check():
    """The check can fail: the draws of temperature 1 against the distribution of temperature 0.7."""
    logits = (np.random.default_rng(0).standard_normal(V) * 2).astype(np.float32)
    tokens = draw(torch.from_numpy(np.tile(logits, (20_000, 1))), batch([(1.0, 0, 1.0)] * 20_000),
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


def test_the_speed_probe_gpu_check_prints_draws_a_batch_repeatedly():
    from tools.sampler_check import draws_per_second

    assert draws_per_second("cpu", rows=4, vocab=256, steps=3) > 0
