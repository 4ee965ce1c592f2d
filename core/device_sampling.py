"""
Sampling a whole batch on the device that holds the logits, so a decode step hands the host one id per row, not
rows x vocabulary floats (as vLLM and TensorRT-LLM do on the GPU). Sampled rows draw exactly by the Gumbel-max trick;
a seeded row's logits go to the host, where core.sampling draws as nanochat does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NOT_FINITE = -1  # the token of a sampled row whose logits are not finite: the scheduler ends that request alone


@dataclass
class BatchSampling:
    """Each row's settings, in the batch's row order."""

    temperature: np.ndarray  # (B,) float32; 0 is greedy
    top_k: np.ndarray  # (B,) int64; 0 is the whole vocabulary
    top_p: np.ndarray  # (B,) float32; 1 is off
    exact: np.ndarray  # (B,) bool; rows the host samples itself: their logits come back, their token is unused
    # (B,) bool; rows that may not stop yet (vLLM's min_tokens, ignore_eos): their stop_ids are masked (None: none)
    hold: np.ndarray | None = None
    stop_ids: tuple[int, ...] = ()

    def rows(self, index: np.ndarray) -> BatchSampling:
        return BatchSampling(self.temperature[index], self.top_k[index], self.top_p[index], self.exact[index],
                             None if self.hold is None else self.hold[index], self.stop_ids)


@dataclass
class Drawn:
    tokens: np.ndarray  # (B,) int64
    exact_logits: np.ndarray | None  # (rows with exact set, V) float32, in row order; None when there are none


def new_generator(device: torch.device) -> torch.Generator:
    """A generator for unseeded draws, seeded from the OS: two servers never share their noise."""
    gen = torch.Generator(device=device)
    gen.seed()
    return gen


@torch.inference_mode()
def draw(logits: torch.Tensor, sampling: BatchSampling, generator: torch.Generator) -> Drawn:
    """Each row's token from logits (B, V) on their device; only (B,) ids and the exact rows' logits leave it."""
    if sampling.hold is not None and sampling.hold.any():
        held = torch.as_tensor(np.flatnonzero(sampling.hold)).to(logits.device, non_blocking=True)
        stops = torch.as_tensor(sampling.stop_ids).to(logits.device, non_blocking=True)
        logits[held[:, None], stops[None, :]] = -torch.inf  # the step's own output: changed in place
    tokens = logits.argmax(-1)
    sampled = np.flatnonzero((sampling.temperature > 0) & ~sampling.exact)
    if len(sampled):
        picked = torch.as_tensor(sampled).to(logits.device, non_blocking=True)
        tokens[picked] = _sample(logits[picked].float(), sampling.rows(sampled), generator)
    exact = np.flatnonzero(sampling.exact)
    # seeded rows: core.sampling draws them on the host from the request's generator, token-identical to nanochat
    exact_logits = logits[torch.as_tensor(exact).to(logits.device)].float().cpu().numpy() if len(exact) else None
    return Drawn(tokens.cpu().numpy(), exact_logits)


def _sample(logits: torch.Tensor, s: BatchSampling, generator: torch.Generator) -> torch.Tensor:
    dev, V = logits.device, logits.shape[-1]
    k = np.where((s.top_k <= 0) | (s.top_k > V), V, s.top_k)
    K = int(k.max())
    nucleus = bool((s.top_p < 1).any())
    temperature = torch.as_tensor(s.temperature).to(dev, non_blocking=True)[:, None]
    if K == V and not nucleus:  # the whole vocabulary, unsorted: no top-k pass needed
        vals, idx = logits / temperature, None
    else:
        vals, idx = torch.topk(logits, K, dim=-1)  # sorted, most likely first
        vals = vals / temperature
        cols = torch.arange(K, device=dev)[None, :]
        if int(k.min()) < K:  # rows with a smaller k than the batch's largest
            vals = vals.masked_fill(cols >= torch.as_tensor(k).to(dev, non_blocking=True)[:, None], -torch.inf)
        if nucleus:
            probs = torch.softmax(vals, dim=-1)
            top_p = torch.as_tensor(s.top_p).to(dev, non_blocking=True)[:, None]
            # as core.sampling: the most likely token always stays (cols > 0)
            vals = vals.masked_fill((probs.cumsum(-1) - probs >= top_p) & (cols > 0), -torch.inf)
    u = torch.rand(vals.shape, device=dev, generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
    choice = (vals - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max: an exact draw from softmax(vals)
    top = vals.max(-1).values  # NaN or inf anywhere in a row shows here (topk puts NaN first)
    tokens = choice if idx is None else idx.gather(1, choice[:, None])[:, 0]
    return torch.where(torch.isfinite(top), tokens, NOT_FINITE)


class DrawsOnHost:
    """step() for a runner whose forward() returns host logits (ONNX Runtime on the CPU, test runners): the draw
    runs where those logits are."""

    _generator: torch.Generator | None = None

    def step(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, sampling: BatchSampling) -> Drawn:
        if self._generator is None:
            self._generator = new_generator(torch.device("cpu"))
        logits = self.forward(input_ids, positions, slots)  # type: ignore[attr-defined]  # the runner's own
        return draw(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), sampling, self._generator)
