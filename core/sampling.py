"""
nanochat's sample_next_token, and sample_rows: the same for a batch whose rows each have their own generator and
settings. The RNG is consumed exactly as nanochat's Engine does: one generator per request, seeded once, one draw per
generated token (forced tool tokens included), so a request's tokens never depend on what shares its batch.
"""

from __future__ import annotations

import numpy as np
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
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        return _draw(vals, rng, temperature, idx)
    return _draw(logits, rng, temperature)


def _draw(logits: torch.Tensor, rng: torch.Generator | None, temperature: float,
          idx: torch.Tensor | None = None, top_p: float = 1.0) -> torch.Tensor:
    """The generator's one draw from softmax(logits / temperature); idx maps top-k columns to token ids.
    With top_p < 1 the draw is from the most likely tokens whose probabilities reach top_p (the most likely
    one always stays), still one multinomial draw, so the generator advances as nanochat's does."""
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = torch.sort(probs, dim=-1, descending=True)
        keep = probs.cumsum(-1) - probs < top_p
        keep[..., 0] = True
        probs = probs * keep
        idx = order if idx is None else idx.gather(1, order)
    choice = torch.multinomial(probs, num_samples=1, generator=rng)
    return choice if idx is None else idx.gather(1, choice)


Sampler = tuple[torch.Generator | None, float, int | None, float]  # a row's generator, temperature, top_k, top_p


@torch.inference_mode()
def sample_rows(logits: np.ndarray, samplers: list[Sampler]) -> list[int | Exception]:
    """One token per row of logits (B, V), each row with its own generator and settings: what
    sample_next_token gives row by row, with the costly parts shared across rows. Greedy rows take
    one numpy argmax (numpy, like torch, returns the first maximal index); sampled rows with the same
    top_k share one topk call, which over a 65k vocabulary costs more than the rest of a row's work.
    A row whose draw fails (logits that are not finite) gets its exception instead of a token, and the
    other rows their tokens, each generator having drawn exactly once: one row never fails the batch."""
    if any(sampler[1] < 0 for sampler in samplers):
        raise ValueError("temperature must be >= 0")
    tokens = logits.argmax(-1).tolist()
    by_k: dict[int, list[int]] = {}
    for i, (_, temperature, top_k, _) in enumerate(samplers):
        if temperature > 0:
            by_k.setdefault(min(top_k, logits.shape[-1]) if top_k else 0, []).append(i)
    table = torch.from_numpy(logits)
    for k, rows in by_k.items():
        vals, idx = torch.topk(table[rows], k, dim=-1) if k else (table[rows], None)
        for j, i in enumerate(rows):
            rng, temperature, _, top_p = samplers[i]
            try:
                tokens[i] = int(_draw(vals[j:j + 1], rng, temperature, None if idx is None else idx[j:j + 1], top_p))
            except RuntimeError as e:  # torch.multinomial on a row of inf/nan probabilities
                tokens[i] = e
    return tokens
