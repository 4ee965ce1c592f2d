"""
nanochat's sample_next_token, row by row.

The RNG is consumed exactly as nanochat's Engine consumes it: one torch.Generator per request,
seeded once, and one draw per generated token (forced tool tokens included) through topk, softmax
and torch.multinomial. Each request owns its generator, so its tokens never depend on what else
shares the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_generator(seed: int) -> torch.Generator:
    rng = torch.Generator(device="cpu")
    rng.manual_seed(seed)
    return rng


@torch.inference_mode()
def sample_next_token(
    logits: torch.Tensor, rng: torch.Generator | None, temperature: float, top_k: int | None
) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1). Temperature 0 is argmax and uses no RNG."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return idx.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)
