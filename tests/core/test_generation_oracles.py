"""
The model core against nanochat's own code, one tiny model per commit that changed the forward pass
(../shared/oracle/generations: G0, G1, three G2 variants, G3, G4). Each generation's detection, windows and
constants, the full forward, the cached decode and a chunked prefill must give nanochat's logits within
1e-4; the late-G2 models only with their overrides, and far off without them (so the override matters).
"""

from __future__ import annotations

import numpy as np
import pytest

from core.gpt import TorchRunner
from tests.support.oracles import generation_model, generation_oracle, generation_oracles

TOL = 1e-4


@pytest.fixture(scope="module", params=generation_oracles() or ["missing"])
def oracle(request):
    return generation_model(request.param)


def test_detection_and_windows_are_nanochats(oracle):
    entry, model, _, _ = oracle
    cfg = model.config
    assert cfg.generation == entry["generation"]
    want = [None] * cfg.n_layer if entry["windows"] is None else [w for w, _ in entry["windows"]]
    assert cfg.window_sizes() == want
    assert cfg.rope_bf16 == (entry["rotary_table_dtype"] == "torch.bfloat16")


def test_full_forward(oracle):
    _, model, ids, folder = oracle
    got = model.full_logits(ids.tolist()).numpy()
    assert np.abs(got - np.load(folder / "logits_full.npy")).max() < TOL


def test_cached_decode(oracle):
    entry, model, ids, folder = oracle
    want, prefill = np.load(folder / "logits_decode.npy"), entry["prefill"]
    runner, slot = TorchRunner(model, 2, len(ids)), np.array([1])  # slot 1: the row index must not matter
    got = [runner.forward(ids[None, :prefill], np.array([0]), slot)[0]]
    for p in range(prefill, len(ids)):
        got.append(runner.forward(ids[None, p : p + 1], np.array([p]), slot)[0])
    assert np.abs(np.array(got) - want).max() < TOL


def test_chunked_prefill(oracle):
    # prefill in chunks that end inside and beyond the short window: each chunk's last logits are the
    # full forward's at that position
    _, model, ids, folder = oracle
    full = np.load(folder / "logits_full.npy")
    runner, slot, start = TorchRunner(model, 1, len(ids)), np.array([0]), 0
    for end in (7, 64, 130, 200, 300):
        logits = runner.forward(ids[None, start:end], np.array([start]), slot)[0]
        assert np.abs(logits - full[end - 1]).max() < TOL, end
        start = end


@pytest.mark.parametrize("name", [n for n in generation_oracles() if generation_oracle(n)[1]["overrides"]])
def test_late_g2_needs_its_overrides(name):
    _, model, ids, folder = generation_model(name, with_overrides=False)
    err = np.abs(model.full_logits(ids.tolist()).numpy() - np.load(folder / "logits_full.npy")).max()
    assert err > 100 * TOL, f"{name} matches nanochat without its overrides (max |diff| {err:.2e})"
