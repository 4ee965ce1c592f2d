"""
The GPU settings an export works out without a GPU to try them on: MAX_SLOTS=auto from a device's memory (the KV
cache and the engine's activations per sequence, then the built engine's real activations checked), the
TensorRT prefill profile whose activations grow with the prefill chunk (not max_seq squared, not max_slots), and
the split of a prefill too large for that profile into calls that give what one call gives.
"""

from __future__ import annotations

import numpy as np
import pytest

from backend.protocol import DECODE_PROFILE, PREFILL_PROFILE, PREFILL_ROWS
from backend.runner import in_pieces
from export.pipeline import (
    CPU_SLOTS,
    MAX_AUTO_SLOTS,
    ExportError,
    check_engine_memory,
    choose_max_slots,
    decode_scratch_per_seq,
)
from export.tensorrt_build import profile_shapes

GB = 10**9
D20_BF16_WEIGHTS = 1_400_000_000 * 2
D20_KV_PER_SEQ = 2 * 20 * 2048 * 10 * 128 * 2  # K and V, 20 layers, 2048 positions, 10 heads of 128, bf16
D20 = type("D20", (), dict(n_head=10, n_kv_head=10, head_dim=128))
D20_SCRATCH_PER_SEQ = decode_scratch_per_seq(D20, 2048, 2)
D20_PER_SEQ = D20_KV_PER_SEQ + D20_SCRATCH_PER_SEQ


def test_the_activation_estimate_counts_a_layers_gathered_rows_in_both_dtypes_and_its_scores():
    layer_rows = 2 * 2048 * 10 * 128  # K and V of one layer, every position
    assert layer_rows * (2 + 4 + 4) + 2 * 10 * 2048 * 4 == D20_SCRATCH_PER_SEQ  # 53 MB, a quarter of its KV cache


@pytest.mark.parametrize("asked, memory, chosen", [
    ("auto", None, CPU_SLOTS),  # CPU, or no figure from the GPU
    ("auto", (79 * GB, 80 * GB), MAX_AUTO_SLOTS),  # H100 80 GB: room for 260, capped
    ("auto", (23 * GB, 24 * GB), int((23 * GB - D20_BF16_WEIGHTS - 2.4 * GB) // D20_PER_SEQ)),  # L4: 67
    ("auto", (3 * GB, 4 * GB), 1),  # the weights barely fit: one sequence, with a warning
    (16, (79 * GB, 80 * GB), 16),  # a number is taken as it is
])
def test_auto_slots_fill_the_gpus_free_memory_after_the_weights_and_a_margin(asked, memory, chosen):
    lines = []
    assert choose_max_slots(asked, memory, D20_BF16_WEIGHTS, D20_KV_PER_SEQ, D20_SCRATCH_PER_SEQ,
                            lines.append) == chosen
    if asked == "auto":
        assert lines and lines[0].startswith(f"max_slots: {chosen} (auto")  # the export prints its arithmetic
    assert any("warning" in line for line in lines) == (chosen == 1)


@pytest.mark.parametrize("memory, slots, scratch, refused", [
    ((79 * GB, 80 * GB), 256, 13 * GB, None),  # H100: 2.8 + 53.7 + 13 + 8 = 77.5 GB of 79
    ((23 * GB, 24 * GB), 67, 6 * GB, "MAX_SLOTS=59"),  # L4 whose engine needs more than estimated: what fits
    ((3 * GB, 4 * GB), 1, 1 * GB, "even with one slot"),  # the weights barely fit
])
def test_the_built_engines_activations_are_checked_beside_the_cache(memory, slots, scratch, refused):
    lines = []
    check = lambda: check_engine_memory(memory, D20_BF16_WEIGHTS, D20_KV_PER_SEQ, slots, scratch, lines.append)
    if refused is None:
        check()
    else:
        with pytest.raises(ExportError, match=refused):
            check()
    assert lines[0].startswith("gpu memory: 2.8 GB weights + ") and f"({slots} slots)" in lines[0]


def attention_scores(shape: tuple[int, int, int]) -> int:
    B, T, Lc = shape
    return B * T * (Lc + T)  # per head: the largest scores tensor a call of this shape computes


def test_the_prefill_profile_grows_with_the_chunk_not_with_max_seq_squared_or_slots():
    small, doubled = profile_shapes(64, 2048, 256), profile_shapes(64, 2048, 512)
    assert small[PREFILL_PROFILE][2] == (PREFILL_ROWS, 256, 2048)
    assert attention_scores(doubled[PREFILL_PROFILE][2]) <= 2.25 * attention_scores(small[PREFILL_PROFILE][2])
    assert 100 * attention_scores(small[PREFILL_PROFILE][2]) < attention_scores((64, 2048, 2048))  # the old profile
    assert profile_shapes(256, 2048, 256)[PREFILL_PROFILE] == small[PREFILL_PROFILE]  # more slots: same prefill
    assert small[DECODE_PROFILE][2] == (64, 1, 2048)  # decode: every slot, one token each
    assert profile_shapes(2, 64, 256)[PREFILL_PROFILE][2] == (2, 64, 64)  # never past max_slots or max_seq


def test_a_prefill_split_to_fit_the_profile_gives_what_one_call_gives(demo_exports):
    """Six prompt rows of 10 tokens in calls of at most 4 rows and 3 tokens (the ONNX Runtime runner stands in for
    the engine): the same logits, and the same cache, since the next decode step agrees too."""
    from backend.onnx_runner import OrtRunner

    path = demo_exports("G4") / "1" / "model.onnx"
    whole, split = OrtRunner(path, 3, 64, threads=1), OrtRunner(path, 3, 64, threads=1)
    ids = (np.arange(30).reshape(3, 10) * 37) % 500
    positions, slots = np.array([0, 5, 0]), np.array([2, 0, 1])
    split.forward(ids[1:2, :5], np.array([0]), np.array([0]))  # row 2 continues a prompt: its first 5 tokens
    whole.forward(ids[1:2, :5], np.array([0]), np.array([0]))
    a = whole.forward(ids, positions, slots)
    b = np.concatenate(in_pieces(split.forward, ids, positions, slots, max_rows=2, max_tokens=3))
    assert np.abs(a - b).max() < 1e-4
    step = (np.array([[7], [8], [9]]), positions + 10, slots)
    assert np.abs(whole.forward(*step) - split.forward(*step)).max() < 1e-4
