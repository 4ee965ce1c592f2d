"""
What the ONNX and TensorRT runners do to their K/V cache each step, on numpy (host) or torch (GPU) arrays alike:
one (max_seq, max_slots, Hkv, D) array per layer and K/V, whose first Lc rows the graph reads in place; only the
batch's B*T new rows are written back, never the whole cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from backend import protocol as P


def layer_count(input_names: Iterable[str]) -> int:
    return sum(1 for n in input_names if n.startswith(P.CACHE_PREFIXES[0]))


def check_step(positions: np.ndarray, slots: np.ndarray, T: int, max_seq: int, max_slots: int) -> None:
    if int(positions.max()) + T > max_seq:
        raise ValueError(f"positions {positions.tolist()} + {T} tokens exceed the cache of {max_seq}")
    if slots.min() < 0 or slots.max() >= max_slots:
        raise ValueError(f"slots {slots.tolist()} outside 0..{max_slots - 1}")


def cached_rows(positions: np.ndarray) -> int:
    """Lc, the cache rows the graph reads. At least 1: that row is masked out at a fresh prefill (a cached key is
    visible only below the row's position), and it keeps every dimension non-zero."""
    return max(1, int(positions.max()))


def write_new(k: Sequence, v: Sequence, out: Mapping, rows, cols) -> None:
    """Scatter each layer's new K/V (T, B, Hkv, D) to the cache at rows, cols (T, B)."""
    for i in range(len(k)):
        k[i][rows, cols] = out[P.new_k(i)]
        v[i][rows, cols] = out[P.new_v(i)]
