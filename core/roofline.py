"""
What a decode step costs on a GPU by its memory traffic: the bytes a step reads (every dense weight once, plus each
row's K/V over its attention windows), GPUs' peak bandwidths, and named profiles of a model on a GPU that the
simulated runner (backend/sim_runner.py) steps at. `make gpu-check` uses the same counts for MBU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from core.config import ModelConfig, build_config

PEAK_BANDWIDTH = [  # (substring of the device name, bytes/s), nanochat infer_bench's table and NVIDIA's data
    # sheets; first match wins, so "L40S" before "L4"
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12),
    ("L40S", 8.64e11), ("L4", 3.0e11), ("A10", 6.0e11),
]
PEAK_BF16_FLOPS = {"H100": 989e12, "L4": 121e12}  # dense tensor-core bf16, NVIDIA's data sheets (no sparsity)
D20 = dict(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280,
           window_pattern="SSSL")  # nanochat's d20 in the current architecture (G4)


def peak_bandwidth(device: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in device), None)


def kv_bytes(cfg: ModelConfig, width: int, ctx: int) -> int:
    """K and V that one row at context ctx reads in a step: per layer, min(ctx, window) positions."""
    return sum(2 * cfg.n_kv_head * cfg.head_dim * width * min(ctx, w or ctx) for w in cfg.window_sizes())


def bytes_per_step(cfg: ModelConfig, n_params_dense: int, weight_bytes: int, kv_width: int, ctx: int) -> int:
    """Weights read once per step plus one row's K/V at context ctx."""
    return n_params_dense * weight_bytes + kv_bytes(cfg, kv_width, ctx)


def dense_params(model: torch.nn.Module) -> int:
    """Parameters a decode step reads in full: everything but the embedding tables (one row each)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("transformer.wte", "value_embeds")))


@dataclass(frozen=True)
class GpuProfile:
    """A model on a GPU: a step takes launch_s plus the longer of its bytes over the achieved bandwidth and its
    matmul FLOPs over the achieved bf16 peak (prefill is compute bound, decode memory bound)."""

    name: str
    gpu: str
    bandwidth: float  # peak bytes/s
    flops: float  # peak bf16 FLOP/s
    efficiency: float  # share of both peaks a real step achieves (typically 0.6-0.8)
    launch_s: float  # per step: enqueue, the cache scatter, the ids' copy back
    model: dict  # nanochat model_config of the model it runs (bf16 weights and KV)
    source: str

    def config(self) -> ModelConfig:
        return build_config("G4", self.model, padded_vocab_size=self.model["vocab_size"])

    @functools.cached_property
    def _shape(self) -> tuple[int, np.ndarray, int]:
        """(dense parameters, each layer's window, bf16 K/V bytes per position per layer), worked out once."""
        from core.gpt import GPT

        cfg = self.config()
        with torch.device("meta"):  # shapes only, no memory
            dense = dense_params(GPT(cfg))
        windows = np.array([w or cfg.sequence_len for w in cfg.window_sizes()])
        return dense, windows, 2 * cfg.n_kv_head * cfg.head_dim * 2

    def dense_params(self) -> int:
        return self._shape[0]

    def step_seconds(self, contexts: np.ndarray, tokens: int) -> float:
        """One step over rows at `contexts` (after the step) feeding `tokens` tokens in all."""
        if self.bandwidth == 0:
            return 0.0
        dense, windows, per_position = self._shape
        kv = per_position * int(np.minimum(contexts[:, None], windows[None, :]).sum())
        return self.launch_s + max((dense * 2 + kv) / self.bandwidth, 2 * dense * tokens / self.flops) / self.efficiency


SOURCES = "bandwidth and bf16 peaks: NVIDIA data sheets; efficiency: ../shared/notes/gpu-hot-path.md (60-80%)"
PROFILES = {p.name: p for p in (
    GpuProfile("d20-h100", "NVIDIA H100 SXM", 3.35e12, PEAK_BF16_FLOPS["H100"], 0.7, 50e-6, D20, SOURCES),
    GpuProfile("d20-l4", "NVIDIA L4", 3.0e11, PEAK_BF16_FLOPS["L4"], 0.7, 50e-6, D20, SOURCES),
    GpuProfile("zero", "none: every step returns at once", 0.0, 0.0, 1.0, 0.0, D20, "host cost alone"),
)}
