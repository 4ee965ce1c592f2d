"""
`make bench-export`: export time, then decode speed of the exported graph under ONNX Runtime beside
the PyTorch model core (TorchRunner), in one run on the same machine, as one table.

It takes the export options (`make bench-export MODEL=d4 SOURCE=base NANOCHAT_BASE_DIR=...`) and
exports into a temporary repository unless MODEL_REPOSITORY is given. With no checkpoint options at
all it benchmarks the demo checkpoint (core/random_checkpoint.py) so the target runs anywhere. Timings:
batch-1 prefill of a prompt of half the context (at most PROMPT tokens), then DECODE greedy steps;
per-token time is the median step, as nanochat's infer_bench reports TPOT.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backend.protocol import ONNX_FILE, VERSION, read_metadata
from export.__main__ import parse_options
from export.pipeline import ExportError, export_model

PROMPT, DECODE = 256, 64


def time_runner(runner, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """(prefill seconds, median decode seconds per token) for one row through a Runner."""
    slot = np.array([0])
    t = time.perf_counter()
    logits = runner.forward(prompt[None, :], np.array([0]), slot)
    prefill = time.perf_counter() - t
    times = []
    for s in range(steps):
        token = np.array([[int(logits[0].argmax())]])
        t = time.perf_counter()
        logits = runner.forward(token, np.array([len(prompt) + s]), slot)
        times.append(time.perf_counter() - t)
    return prefill, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from backend.onnx_runner import OrtRunner
    from core.gpt import TorchRunner, build_gpt

    try:
        a = parse_options(argv)
    except ValueError as e:
        print(f"bench-export: error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        base = a.nanochat_base_dir
        if not any((a.model, a.source, a.checkpoint_dir, base)):
            from core.random_checkpoint import make_checkpoint

            base = Path(tmp) / "nanochat"
            make_checkpoint(base)
            print(f"no checkpoint given: benchmarking the demo checkpoint (G4 random weights) in {base}")
        repo = a.model_repository if a.model_repository != "model_repository" else Path(tmp) / "repo"
        t = time.perf_counter()
        try:
            target = export_model(a.replace(model_repository=repo, nanochat_base_dir=base, runtime="onnx",
                                             verify=False))
        except ExportError as e:
            print(f"bench-export: error: {e}", file=sys.stderr)
            return 2
        export_s = time.perf_counter() - t
        meta = read_metadata(target / VERSION)
        from core.checkpoint import find_checkpoint, open_checkpoint

        ref = find_checkpoint(meta["source"] if meta["source"] != "dir" else None, meta["model_tag"], meta["step"],
                              a.checkpoint_dir, base)
        loaded, _ = open_checkpoint(ref)
        model = build_gpt(loaded.config, loaded.state_dict)
        cfg, max_seq = model.config, meta["max_seq"]
        n_prompt = min(PROMPT, max_seq // 2)
        steps = min(DECODE, max_seq - n_prompt - 1)
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, n_prompt)
        threads = torch.get_num_threads()
        runners = [("PyTorch model core (TorchRunner)", "-", TorchRunner(model, meta["max_slots"], max_seq)),
                   ("ONNX Runtime (OrtRunner)", f"{export_s:.1f}",
                    OrtRunner(target / VERSION / ONNX_FILE, meta["max_slots"], max_seq, threads=threads))]
        rows = []
        for label, exp, runner in runners:
            time_runner(runner, prompt[:16], 4)  # warm-up: allocations, kernel selection
            prefill, tpot = time_runner(runner, prompt, steps)
            rows.append((label, exp, prefill * 1e3, tpot * 1e3, 1 / tpot))
    print(f"\nbench-export: {meta['name']} ({meta['generation']}, {meta['precision']}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on CPU, {threads} threads, batch 1, "
          f"prompt {n_prompt} tokens, {steps} decode steps (median)")
    header = f"{'runtime':<34} {'export s':>9} {'prefill ms':>11} {'decode ms/token':>16} {'tokens/s':>9}"
    print(header + "\n" + "-" * len(header))
    for label, exp, prefill, tpot, tps in rows:
        print(f"{label:<34} {exp:>9} {prefill:>11.2f} {tpot:>16.3f} {tps:>9.1f}")
    print(f"ONNX Runtime vs PyTorch decode: {rows[0][3] / rows[1][3]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
