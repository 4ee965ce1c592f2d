"""
A Runner that stands in for a GPU: each step takes the time a GPU profile says (core/roofline.py: the step's bytes
over the GPU's bandwidth, plus a launch cost) and returns what the GPU runner returns, at once. The wait is a sleep,
which releases the GIL as a CUDA call does, so what the host spends around it (scheduling, detokenizing, responses,
the server's relays) is measured as it would be on a GPU node. `make bench-sim` serves it in the real Triton backend
(metadata.json: runtime "sim" and the profile's name).

Unseeded rows get ids drawn uniformly from `text_ids` (ordinary tokens: the detokenizer and stop strings do real
work); exact rows get logits from a fixed random table, so nanochat's draw on the host runs at the vocabulary's size.
"""

from __future__ import annotations

import time

import numpy as np

from core.device_sampling import BatchSampling, Drawn
from core.roofline import GpuProfile


class SimRunner:
    def __init__(self, profile: GpuProfile, max_slots: int, max_seq: int, vocab_size: int, text_ids: np.ndarray,
                 seed: int = 0):
        self.profile, self.max_slots, self.max_seq = profile, max_slots, max_seq
        self.prev = None
        self.cfg, self.dense = profile.config(), profile.dense_params()
        self.text_ids = np.asarray(text_ids, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.table = self.rng.standard_normal((max_slots, vocab_size), dtype=np.float32)
        self.steps = 0
        self.busy_s = 0.0  # simulated device time so far

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        self._wait(input_ids, positions)
        return self.table[: len(input_ids)]

    def step(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, sampling: BatchSampling) -> Drawn:
        self._wait(input_ids, positions)
        n_exact = int(sampling.exact.sum())
        tokens = self.text_ids[self.rng.integers(len(self.text_ids), size=len(input_ids))]
        return Drawn(tokens, self.table[:n_exact] if n_exact else None)

    def _wait(self, input_ids: np.ndarray, positions: np.ndarray) -> None:
        B, T = input_ids.shape
        if int(positions.max()) + T > self.max_seq:
            raise ValueError(f"positions {positions.tolist()} + {T} tokens exceed the cache of {self.max_seq}")
        seconds = self.profile.step_seconds(self.cfg, self.dense, positions + T, B * T)
        self.steps += 1
        self.busy_s += seconds
        if seconds:
            time.sleep(seconds)
