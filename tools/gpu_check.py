"""
`make gpu-check`: every runtime this GPU box has, on the demo model and the shared oracles, in one table: low
precisions' top-1 agreement with fp32, fp32 greedy equality with nanochat's references, decode ms per step and MBU;
then one /generate through the local Triton and the BFF, and the device sampler's check. What is not installed is a
row saying so, never a crash; without a CUDA GPU it stops at once with exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend import tensorrt_module
from core.roofline import bytes_per_step, dense_params, peak_bandwidth
from tools.paths import ORACLE_DIR
from tools.sampler_check import sampler_line

BATCHES = (1, 8, 64)
AGREEMENT_STEPS = 32
SPEED_STEPS = 32
WIDTH = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass
class Row:
    model: str
    runtime: str
    precision: str
    agreement: str = "-"  # top-1 vs fp32, "agree/steps"
    max_diff: float | None = None
    greedy: str = "-"  # fp32 greedy == nanochat's references, "same/conversations"
    step_s: dict[int, float] = field(default_factory=dict)  # batch -> median seconds per decode step
    mbu: float | None = None
    skipped: str | None = None  # why this runtime did not run
    note: str | None = None  # a row that is a sentence (the stream through Triton and the BFF)


def prefill_rows(runner, prompt: list[int], batch: int) -> np.ndarray:
    """The prompt prefilled into slots 0..batch-1, one row per call (the activations of one row at a time)."""
    return np.concatenate([runner.forward(np.array([prompt]), np.array([0]), np.array([b])) for b in range(batch)])


# The median of greedy steps at half the context, each row in a slot of its own; MBU at batch 1 = bytes read per
# step (weights + the K/V each layer's window reads) / step time / the GPU's peak bandwidth (nanochat's infer_bench).
def decode_step_seconds(runner, prompt: list[int], batch: int, steps: int, sync: Callable[[], None]) -> float:
    """Median seconds of one greedy decode step with `batch` rows, each at the prompt's context."""
    logits, slots, times = prefill_rows(runner, prompt, batch), np.arange(batch), []
    for s in range(steps):
        tokens = logits.argmax(-1)[:, None]
        sync()
        t = time.perf_counter()
        logits = runner.forward(tokens, np.full(batch, len(prompt) + s), slots)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# Both runs are fed the fp32 run's tokens, so every step compares the same context.
def agreement(fp32, low, prompts: list[list[int]], steps: int) -> tuple[int, int, float]:
    """(steps where low's top-1 equals fp32's, steps, max |logit diff|), both fed fp32's greedy tokens."""
    agree = total = 0
    worst = 0.0
    for prompt in prompts:
        a, b = (r.forward(np.array([prompt]), np.array([0]), np.array([0])) for r in (fp32, low))
        for s in range(steps):
            agree, total = agree + int(a.argmax() == b.argmax()), total + 1
            worst = max(worst, float(np.abs(a - b).max()))
            token, pos = np.array([[int(a.argmax())]]), np.array([len(prompt) + s])
            a, b = (r.forward(token, pos, np.array([0])) for r in (fp32, low))
    return agree, total, worst


def greedy_matches(runner, conversations: list[dict]) -> int:
    """Conversations whose greedy continuation equals nanochat's reference tokens."""
    same = 0
    for conv in conversations:
        want = conv["greedy"]["tokens"]
        logits, got = runner.forward(np.array([conv["prompt_ids"]]), np.array([0]), np.array([0])), []
        for s in range(len(want)):
            got.append(int(logits.argmax()))
            logits = runner.forward(np.array([[got[-1]]]), np.array([len(conv["prompt_ids"]) + s]), np.array([0]))
        same += got == want
    return same


@dataclass
class Checkpoint:
    label: str
    base: Path  # nanochat base dir
    source: str | None
    references: dict | None  # references.json of an oracle


def check_runtime(ck: Checkpoint, runtime: str, runners: dict, model, batches: tuple[int, ...], peak: float | None,
                  sync: Callable[[], None]) -> list[Row]:
    """The rows of one runtime: runners maps precision -> a Runner with max(batches) slots (fp32 first)."""
    cfg = model.config
    rng = np.random.default_rng(0)
    refs = ck.references
    prompts = [c["prompt_ids"] for c in refs["conversations"]] if refs else [
        rng.integers(0, cfg.vocab_size, 32).tolist()]
    steps = min(AGREEMENT_STEPS, cfg.sequence_len - max(map(len, prompts)) - 1)
    half = rng.integers(0, cfg.vocab_size, cfg.sequence_len // 2).tolist()
    speed_steps = min(SPEED_STEPS, cfg.sequence_len - len(half) - 1)
    dense = dense_params(model)
    rows = []
    for precision, runner in runners.items():
        row = Row(ck.label, runtime, precision)
        if precision == "fp32":
            if refs:
                row.greedy = f"{greedy_matches(runner, refs['conversations'])}/{len(refs['conversations'])}"
        else:
            agree, total, worst = agreement(runners["fp32"], runner, prompts, steps)
            row.agreement, row.max_diff = f"{agree}/{total}", worst
        for batch in batches:
            row.step_s[batch] = decode_step_seconds(runner, half, batch, speed_steps, sync)
        if peak:
            width = WIDTH[precision]
            row.mbu = bytes_per_step(cfg, dense, width, width, len(half) + speed_steps // 2) / row.step_s[1] / peak
        rows.append(row)
    return rows


def torch_runners(model, precisions: tuple[str, ...], device: str, slots: int, max_seq: int) -> dict:
    import copy

    import torch

    from core.gpt import TorchRunner

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return {p: TorchRunner(copy.deepcopy(model).to(device, dtypes[p]), slots, max_seq) for p in precisions}


def exported_runners(ck: Checkpoint, runtime: str, precisions: tuple[str, ...], repo: Path, slots: int,
                     max_seq: int) -> dict:
    """Each precision exported for `runtime` (tensorrt, or onnx on ONNX Runtime's CUDA provider) and loaded."""
    from backend.protocol import ONNX_FILE, PLAN_FILE, VERSION
    from export import export_model, options

    runners = {}
    for precision in precisions:
        target = export_model(options(model_repository=repo, name=f"{ck.label}_{runtime}_{precision}",
                                      source=ck.source, nanochat_base_dir=ck.base, runtime=runtime,
                                      precision=precision, max_slots=slots, max_seq=max_seq, force=True))
        if runtime == "tensorrt":
            from backend.trt_runner import TrtRunner

            runners[precision] = TrtRunner(target / VERSION / PLAN_FILE, slots, max_seq)
        else:
            from backend.onnx_runner import OrtRunner

            runners[precision] = OrtRunner(target / VERSION / ONNX_FILE, slots, max_seq,
                                           providers=["CUDAExecutionProvider"])
    return runners


def missing_runtimes() -> dict[str, str | None]:
    """runtime -> why it cannot run here (None: it can)."""
    import onnxruntime

    cuda_ort = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return {
        "tensorrt": None if tensorrt_module.installed() else "TensorRT's Python API is not installed",
        "onnxruntime-cuda": None if cuda_ort else "ONNX Runtime has no CUDAExecutionProvider here "
                                                  "(onnxruntime-gpu is not installed)",
    }


def check_checkpoint(ck: Checkpoint, repo: Path, device: str, batches: tuple[int, ...], peak: float | None,
                     sync: Callable[[], None], log: Callable[[str], None] = print) -> list[Row]:
    from core.checkpoint import open_checkpoint
    from core.gpt import build_gpt
    from export.pipeline import resolve_checkpoint

    loaded, _ = open_checkpoint(resolve_checkpoint(None, ck.source, None, None, ck.base, log))
    model = build_gpt(loaded.config, loaded.state_dict)
    slots, max_seq = max(batches), model.config.sequence_len
    low = ("bf16", "fp16") if device == "cuda" and _bf16_supported() else ("fp16",)
    log(f"{ck.label}: PyTorch on {device} ...")
    rows = check_runtime(ck, "pytorch", torch_runners(model, ("fp32", *low), device, slots, max_seq), model, batches,
                         peak, sync)
    served = None  # the model Triton and the BFF stream from: the first GPU runtime's, at its lowest precision
    for runtime, reason in missing_runtimes().items():
        if reason:
            rows.append(Row(ck.label, runtime, "-", skipped=reason))
            continue
        log(f"{ck.label}: exporting and checking {runtime} ...")
        name = "tensorrt" if runtime == "tensorrt" else "onnx"
        precisions = ("fp32", *low) if runtime == "tensorrt" else ("fp32", "fp16")  # ORT's runner: no bf16
        try:
            runners = exported_runners(ck, name, precisions, repo, slots, max_seq)
            rows += check_runtime(ck, runtime, runners, model, batches, peak, sync)
            served = served or f"{ck.label}_{name}_{precisions[-1]}"
        except Exception as e:  # one runtime failing is a row of the table, not the end of the check
            rows.append(Row(ck.label, runtime, "-", skipped=f"failed: {type(e).__name__}: {e}"))
    if served:
        rows.append(serve_row(ck.label, repo, served, log))
    else:
        rows.append(Row(ck.label, "triton + bff", "-", skipped="no GPU runtime (TensorRT, ONNX Runtime CUDA) to serve"))
    return rows


def serve_row(label: str, repo: Path, name: str, log: Callable[[str], None]) -> Row:
    """One exported model behind the local Triton and the BFF (a process of its own, as `make bench` runs it), and
    one /generate streamed to its done event, as the gateway reads it."""
    import httpx

    from tools.bff_client import bff_process, generate_sse, triton_settings
    from tools.local_triton import LocalTriton
    from tools.serve import README_PROMPT

    runtime = "triton + bff"
    if importlib.util.find_spec("pytriton") is None:
        return Row(label, runtime, "-", skipped="tritonserver is not installed (the nvidia-pytriton wheel)")
    log(f"{label}: serving {name} through Triton and the BFF ...")
    body = {"messages": [{"role": "user", "content": README_PROMPT}], "max_tokens": 64, "temperature": 0}
    try:
        with LocalTriton(repo, load=[name]) as triton, \
                bff_process(**triton_settings(triton, model=name)) as (_, url), \
                httpx.Client(timeout=120) as client:
            answer = generate_sse(client, url, body)
    except Exception as e:  # a failure is a row of the table, not the end of the check
        return Row(label, runtime, "-", skipped=f"failed: {type(e).__name__}: {e}")
    if answer.done is None:
        return Row(label, runtime, "-", skipped=f"the stream ended without a done event after {answer.tokens} tokens")
    per_token = (answer.last_s - answer.first_s) / max(1, answer.tokens - 1)
    return Row(label, runtime, name.rsplit("_", 1)[-1], note=f"/generate streamed {answer.tokens} tokens to done "
               f"({answer.done['finish_reason']}): TTFT {answer.first_s * 1e3:.1f} ms, {per_token * 1e3:.2f} ms/token")


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def table(rows: list[Row], batches: tuple[int, ...]) -> str:
    head = (f"{'model':<6} {'runtime':<17} {'prec':<5} {'top-1 vs fp32':>13} {'max diff':>9} {'greedy':>7} "
            + " ".join(f"{f'ms@{b}':>8}" for b in batches) + f" {f'tok/s@{batches[-1]}':>10} {'MBU@1':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.skipped or r.note:
            lines.append(f"{r.model:<6} {r.runtime:<17} " + (f"skipped: {r.skipped}" if r.skipped else
                                                              f"{r.precision:<5} {r.note}"))
            continue
        diff = f"{r.max_diff:.2e}" if r.max_diff is not None else "-"
        times = " ".join(f"{r.step_s[b] * 1e3:>8.3f}" for b in batches)
        mbu = f"{r.mbu:.1%}" if r.mbu is not None else "-"
        lines.append(f"{r.model:<6} {r.runtime:<17} {r.precision:<5} {r.agreement:>13} {diff:>9} {r.greedy:>7} "
                     f"{times} {batches[-1] / r.step_s[batches[-1]]:>10.0f} {mbu:>6}")
    return "\n".join(lines)


def checkpoints(tmp: Path, oracle_dir: Path, user_base: str | None, log: Callable[[str], None]) -> list[Checkpoint]:
    from core.random_checkpoint import make_checkpoint

    demo = tmp / "demo"
    make_checkpoint(demo)
    found = [Checkpoint("demo", demo, None, None)]
    if user_base:
        found.append(Checkpoint("user", Path(user_base), None, None))
    for name in ("head", "orig"):
        ref = oracle_dir / name / "references.json"
        if ref.is_file():
            found.append(Checkpoint(name, ref.parent, "base", json.loads(ref.read_text())))
        else:
            log(f"oracle {name} not found at {ref.parent}: skipped")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--oracle-dir", default=str(ORACLE_DIR), help="folder with head/ and orig/ oracles")
    p.add_argument("--nanochat-base-dir", help="also check the largest sft (else base) checkpoint here")
    a = p.parse_args(argv)
    import torch

    if not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
        print("make gpu-check needs a CUDA GPU: no CUDA GPU is visible on this machine", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name()
    peak = peak_bandwidth(device_name)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for ck in checkpoints(Path(tmp), Path(a.oracle_dir), a.nanochat_base_dir, print):
            rows += check_checkpoint(ck, Path(tmp) / "repo", "cuda", BATCHES, peak, torch.cuda.synchronize)
    print(f"\n{device_name} (peak {peak / 1e12 if peak else float('nan'):.2f} TB/s); decode: median step at half "
          f"the context, each row in its own slot; greedy: fp32 == nanochat's references")
    print(table(rows, BATCHES))
    print(sampler_line("cuda", torch.cuda.synchronize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
