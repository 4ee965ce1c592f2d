"""
The batched draw (core/device_sampling.py) against the distribution it must sample, on any device: per row, a
chi-square test against softmax(top-k(logits) / T) with top_p's nucleus, computed in numpy; and the draws a second
at a d20's vocabulary. The tests run it on the CPU, `make gpu-check` on the GPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from core.device_sampling import BatchSampling, draw

SETTINGS = [  # (temperature, top_k (0: all), top_p)
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 10, 1.0), (0.8, 50, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.6, 20, 0.5),
    (2.0, 3, 1.0),
]


def expected(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    order = np.argsort(-logits, kind="stable")
    keep = order[: top_k or len(logits)]
    z = logits[keep].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        before = np.cumsum(p) - p
        p = np.where(before < top_p, p, 0.0)
        p[0] = p[0] or 1.0
        p /= p.sum()
    out = np.zeros(len(logits))
    out[keep] = p
    return out


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """P-value of counts against probs (categories expected >= 5 times; the rest pooled)."""
    n = counts.sum()
    big = probs * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(probs[big] * n, probs[~big].sum() * n)
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def batch(settings: list[tuple[float, int, float]], exact: list[bool] | None = None) -> BatchSampling:
    t, k, p = zip(*settings, strict=True)
    return BatchSampling(np.array(t, dtype=np.float32), np.array(k, dtype=np.int64), np.array(p, dtype=np.float32),
                         np.zeros(len(settings), bool) if exact is None else np.array(exact))


def distribution_check(device: str, vocab: int = 64, draws: int = 20_000,
                       seed: int = 1) -> list[tuple[tuple, float, int]]:
    """(settings, chi-square p-value, draws outside the row's top-k/nucleus) per row of SETTINGS, drawn together
    in one batch of len(SETTINGS) * draws rows on `device`."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(SETTINGS), vocab)) * 2).astype(np.float32)
    table = torch.from_numpy(np.repeat(logits, draws, axis=0)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = draw(table, batch([s for s in SETTINGS for _ in range(draws)]), gen).tokens.reshape(len(SETTINGS), draws)
    out = []
    for i, settings in enumerate(SETTINGS):
        probs = expected(logits[i], *settings)
        counts = np.bincount(tokens[i], minlength=vocab)
        out.append((settings, chi_square_p(counts, probs), int(counts[probs == 0].sum())))
    return out


def draws_per_second(device: str, rows: int, vocab: int = 65_536, steps: int = 50,
                     sync=lambda: None) -> float:
    """Batch draws a second of `rows` rows at temperature 0.8, top_k 50 (the gateway's), logits already there."""
    logits = torch.randn(rows, vocab, device=device)
    settings, gen = batch([(0.8, 50, 1.0)] * rows), torch.Generator(device=device).manual_seed(0)
    draw(logits, settings, gen)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        draw(logits, settings, gen)
    sync()
    return steps / (time.perf_counter() - t)


def sampler_line(device: str, sync=lambda: None) -> str:
    """gpu-check's row: the distribution check's worst p-value and draws outside, and draws/s at 64 and 256 rows."""
    results = distribution_check(device)
    worst = min(p for _, p, _ in results)
    outside = sum(n for _, _, n in results)
    speed = {rows: draws_per_second(device, rows, sync=sync) for rows in (64, 256)}
    verdict = "ok" if worst > 1e-4 and not outside else "WRONG"
    return (f"device sampler on {device}: {verdict} (chi-square over {len(results)} settings, worst p {worst:.3g}, "
            f"{outside} draws outside top-k/top-p); vocabulary 65,536, temperature 0.8, top_k 50: "
            + ", ".join(f"{s:,.0f} draws/s at {rows} rows" for rows, s in speed.items()))
