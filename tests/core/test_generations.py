"""Every architecture generation, from random checkpoints in nanochat's format: detection, and the
KV-cache path (prefill, chunked prefill, decode, several rows) against one full forward pass."""

import numpy as np
import pytest

from core.checkpoint import find_checkpoint, open_checkpoint
from core.gpt import TorchRunner, build_gpt
from core.random_checkpoint import make_checkpoint

# G3/G4 at S=512 have short windows of 256/128, so 300 tokens run past them; G1/G2 use S=256 (window 128).
CASES = {
    "G0": dict(sequence_len=256, window_pattern="L"),
    "G1": dict(sequence_len=256, window_pattern="SL"),
    "G2": dict(sequence_len=256, window_pattern="SSL"),
    "G3": dict(sequence_len=512, window_pattern="SSSL"),
    "G4": dict(sequence_len=512, window_pattern="SSSL"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, tmp_path_factory):
    gen = request.param
    base = tmp_path_factory.mktemp(gen)
    make_checkpoint(base, gen, tag="d3", source="base", depth=3, n_embd=64, n_head=4, n_kv_head=2,
                    seed=7, **CASES[gen])
    loaded, _ = open_checkpoint(find_checkpoint("base", nanochat_base=base))
    return gen, build_gpt(loaded.config, loaded.state_dict)


def test_detects_generation(model):
    gen, m = model
    assert m.config.generation == gen
    windows = m.config.window_sizes()
    if gen == "G0":
        assert windows == [None, None, None]
    else:
        assert windows[-1] == m.config.sequence_len and min(windows) < 300


def test_prefill_then_decode_equals_full_forward(model):
    _, m = model
    ids = np.random.RandomState(0).randint(0, m.config.vocab_size, size=300)
    full = m.full_logits(ids.tolist()).numpy()
    runner = TorchRunner(m, max_slots=3, max_seq=320)
    got = [runner.forward(ids[None, :40], np.array([0]), np.array([2]))[0]]
    for p in range(40, 300):
        got.append(runner.forward(ids[None, p : p + 1], np.array([p]), np.array([2]))[0])
    assert np.abs(np.stack(got) - full[39:]).max() < 1e-5


def test_chunked_prefill_equals_full_forward(model):
    _, m = model
    ids = np.random.RandomState(1).randint(0, m.config.vocab_size, size=290)
    full = m.full_logits(ids.tolist()).numpy()
    runner = TorchRunner(m, max_slots=1, max_seq=300)
    for start in range(0, 290, 100):
        last = runner.forward(ids[None, start : start + 100], np.array([start]), np.array([0]))[0]
        assert np.abs(last - full[min(start + 100, 290) - 1]).max() < 1e-5


def test_rows_at_different_positions_decode_together(model):
    _, m = model
    rng = np.random.RandomState(2)
    seqs = [rng.randint(0, m.config.vocab_size, size=n) for n in (5, 140, 61)]
    runner = TorchRunner(m, max_slots=4, max_seq=200)
    slots = np.array([3, 0, 1])
    for seq, slot in zip(seqs, slots, strict=True):
        runner.forward(seq[None, :-1], np.array([0]), np.array([slot]))
    last = np.array([[s[-1]] for s in seqs])
    batched = runner.forward(last, np.array([len(s) - 1 for s in seqs]), slots)
    for i, seq in enumerate(seqs):
        assert np.abs(batched[i] - m.full_logits(seq.tolist())[-1].numpy()).max() < 1e-5
