"""
`make gpu-check`: TensorRT on a real GPU, end to end, for the demo and the oracle checkpoints.

For each checkpoint it exports fp32 and fp16 models with RUNTIME=tensorrt (engine build included),
then checks and times them:
  - fidelity: the fp32 engine against the PyTorch model core (max |logit diff| at prefill), nanochat's
    greedy reference tokens for the oracles, and fp16 vs fp32 top-1 agreement over 64 decode steps
    (both engines fed the fp32 engine's tokens, so every step compares the same context);
  - speed: batch-1 decode through TrtRunner (median step, nanochat infer_bench's TPOT), and MBU = bytes
    read per step (weights + the K/V each layer's window reads at that context) / step time / peak
    bandwidth, beside nanochat-style PyTorch decode on the same GPU (the model core in bf16 with a
    CUDA KV cache, batch 1; nanochat computes in bf16 on CUDA).
Without a GPU and TensorRT it stops at once with exit 2 and the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.protocol import PLAN_FILE, VERSION
from tools.paths import ORACLE_DIR

STEPS = 64
PEAK_BANDWIDTH = [  # (substring of the device name, bytes/s), nanochat infer_bench's table; first match wins
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12),
]


def peak_bandwidth(device: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in device), None)


def bytes_per_step(cfg, n_params_dense: int, weight_bytes: int, kv_bytes: int, ctx: int) -> int:
    """Weights read once per step plus, per layer, K and V of min(ctx, window) positions."""
    kv = sum(2 * cfg.n_kv_head * cfg.head_dim * kv_bytes * min(ctx, w or ctx) for w in cfg.window_sizes())
    return n_params_dense * weight_bytes + kv


def dense_params(model) -> int:
    """Parameters a decode step reads in full: everything but the embedding tables (one row each)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("transformer.wte", "value_embeds")))


def decode_times(forward, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy batch-1 decode through forward(ids, pos) -> logits; (tokens, median step seconds)."""
    import torch

    logits = forward(np.array([prompt]), 0)
    tokens, times = [], []
    for s in range(steps):
        tokens.append(int(np.asarray(logits)[0].argmax()))
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = forward(np.array([[tokens[-1]]]), len(prompt) + s)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return tokens, statistics.median(times)


def trt_forward(runner):
    return lambda ids, pos: runner.forward(ids, np.array([pos]), np.array([0]))


def torch_cuda_forward(model, max_seq: int):
    """nanochat-style decode: the model core in bf16 on the GPU, the cache in a CUDA tensor, written as
    TorchRunner writes it (TorchRunner itself keeps its cache on the CPU)."""
    import torch

    dev = torch.device("cuda")
    m = model.to(dev, dtype=torch.bfloat16)
    k, v, prev = m.empty_cache(1, max_seq)
    k, v = [t.to(dev, torch.bfloat16) for t in k], [t.to(dev, torch.bfloat16) for t in v]
    prev = prev.to(dev, torch.bfloat16) if prev is not None else None
    slot = torch.zeros(1, dtype=torch.long, device=dev)

    @torch.inference_mode()
    def forward(ids, pos):
        ids_t = torch.as_tensor(ids, device=dev)
        T, Lc = ids_t.shape[1], max(1, pos)
        out = m(ids_t, torch.tensor([pos], device=dev), slot, [c[:Lc] for c in k], [c[:Lc] for c in v], prev)
        for cache, new in zip(k + v, out.new_k + out.new_v, strict=True):
            cache[pos : pos + T, 0] = new[:, 0]
        if prev is not None:
            prev[0] = out.new_prev[0]
        return out.logits.float().cpu().numpy()

    return forward


def check_checkpoint(label: str, nanochat_base: Path, repo: Path, references: dict | None) -> list[dict]:
    import torch

    from backend.trt_runner import TrtRunner
    from core.checkpoint import open_checkpoint
    from core.gpt import TorchRunner, build_gpt
    from export import export_model, options
    from export.pipeline import resolve_checkpoint

    rows = []
    source = "base" if references else None  # oracles are base checkpoints; others: sft, else what exists
    loaded, _ = open_checkpoint(resolve_checkpoint(None, source, None, None, nanochat_base, print))
    model = build_gpt(loaded.config, loaded.state_dict)
    cfg = model.config
    runners = {}
    for precision in ("fp32", "fp16"):
        target = export_model(options(model_repository=repo, name=f"{label}_{precision}", source=source,
                                      nanochat_base_dir=nanochat_base, runtime="tensorrt", precision=precision,
                                      max_slots=1, force=True))
        runners[precision] = TrtRunner(target / VERSION / PLAN_FILE, 1, cfg.sequence_len)
    convs = references["conversations"] if references else [
        {"name": "random", "prompt_ids": np.random.default_rng(0).integers(0, cfg.vocab_size, 64).tolist()}]

    # fidelity
    core = TorchRunner(model, 1, cfg.sequence_len)
    prompt = convs[0]["prompt_ids"]
    a = runners["fp32"].forward(np.array([prompt]), np.array([0]), np.array([0]))
    b = core.forward(np.array([prompt]), np.array([0]), np.array([0]))
    print(f"{label}: fp32 engine vs PyTorch model core at prefill: max |logit diff| {np.abs(a - b).max():.2e}")
    if references:
        same = 0
        for conv in convs:
            tokens, _ = decode_times(trt_forward(runners["fp32"]), conv["prompt_ids"], 32)
            same += tokens == conv["greedy"]["tokens"]
        print(f"{label}: fp32 engine greedy == nanochat references for {same}/{len(convs)} conversations")
    agree = 0
    f32, f16 = runners["fp32"], runners["fp16"]
    la = f32.forward(np.array([prompt]), np.array([0]), np.array([0]))
    lb = f16.forward(np.array([prompt]), np.array([0]), np.array([0]))
    steps = min(STEPS, cfg.sequence_len - len(prompt) - 1)
    for s in range(steps):
        agree += int(la[0].argmax() == lb[0].argmax())
        tok, pos = np.array([[int(la[0].argmax())]]), np.array([len(prompt) + s])
        la, lb = f32.forward(tok, pos, np.array([0])), f16.forward(tok, pos, np.array([0]))
    print(f"{label}: fp16 vs fp32 engine top-1 agreement over {steps} decode steps: {agree}/{steps} "
          f"({agree / steps:.1%})")

    # speed at half the context, nanochat infer_bench style
    ctx_prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, cfg.sequence_len // 2).tolist()
    steps = min(STEPS, cfg.sequence_len - len(ctx_prompt) - 1)
    ctx_mid = len(ctx_prompt) + steps // 2
    device = torch.cuda.get_device_name()
    dense = dense_params(model)
    for precision, runner in runners.items():
        width = 4 if precision == "fp32" else 2
        _, tpot = decode_times(trt_forward(runner), ctx_prompt, steps)
        rows.append(dict(model=label, gen=cfg.generation, runtime="tensorrt", precision=precision, tpot=tpot,
                         bytes=bytes_per_step(cfg, dense, width, width, ctx_mid), device=device))
    del runners, f32, f16
    _, tpot = decode_times(torch_cuda_forward(model, cfg.sequence_len), ctx_prompt, steps)
    rows.append(dict(model=label, gen=cfg.generation, runtime="pytorch (model core)", precision="bf16", tpot=tpot,
                     bytes=bytes_per_step(cfg, dense, 2, 2, ctx_mid), device=device))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--oracle-dir", default=str(ORACLE_DIR), help="folder with head/ and orig/ oracles")
    p.add_argument("--nanochat-base-dir", help="also check the largest sft (else base) checkpoint here")
    a = p.parse_args(argv)
    from export.tensorrt_build import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"make gpu-check needs a GPU with TensorRT: {reason}", file=sys.stderr)
        return 2
    import torch

    from core.random_checkpoint import make_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        demo = Path(tmp) / "demo"
        make_checkpoint(demo)
        checks = [("demo", demo, None)] + ([("user", Path(a.nanochat_base_dir), None)] if a.nanochat_base_dir else [])
        for name in ("head", "orig"):
            ref = Path(a.oracle_dir) / name / "references.json"
            if ref.is_file():
                checks.append((name, ref.parent, json.loads(ref.read_text())))
            else:
                print(f"oracle {name} not found at {ref.parent}: skipped")
        for label, base, refs in checks:
            rows += check_checkpoint(label, base, Path(tmp) / "repo", refs)
    device = torch.cuda.get_device_name()
    peak = peak_bandwidth(device)
    print(f"\nbatch-1 decode on {device} (peak {peak / 1e12 if peak else float('nan'):.2f} TB/s), median step, "
          f"context at the middle of a half-context prompt + {STEPS} steps")
    header = (f"{'model':<6} {'gen':<4} {'runtime':<22} {'prec':<5} {'ms/token':>9} {'tok/s':>8} "
              f"{'MB/step':>8} {'GB/s':>8} {'MBU':>6}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        bw = r["bytes"] / r["tpot"]
        mbu = f"{bw / peak:.1%}" if peak else "-"
        print(f"{r['model']:<6} {r['gen']:<4} {r['runtime']:<22} {r['precision']:<5} {r['tpot'] * 1e3:>9.3f} "
              f"{1 / r['tpot']:>8.1f} {r['bytes'] / 1e6:>8.2f} {bw / 1e9:>8.1f} {mbu:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
