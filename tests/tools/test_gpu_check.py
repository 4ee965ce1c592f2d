"""
`make gpu-check`'s code paths on this CPU: the PyTorch rows for the head oracle (greedy equality with nanochat's
references at fp32, fp16 agreement, decode timing by batch), the rows for runtimes that are not installed, which
say why instead of failing, and the stream through Triton and the BFF on a CPU model. The GPU run itself is
`make gpu-check` on a GPU box (exit 2 here: tests/export/test_repository.py).
"""

from __future__ import annotations

from core import roofline
from tests.support.oracles import oracle_or_skip, references
from tools import gpu_check


def test_the_pytorch_rows_and_the_missing_runtimes_on_cpu(tmp_path):
    ck = gpu_check.Checkpoint("head", oracle_or_skip("head"), "base", references("head"))
    lines = []
    rows = gpu_check.check_checkpoint(ck, tmp_path, "cpu", (1, 2), None, lambda: None, lines.append)
    by = {(r.runtime, r.precision): r for r in rows}
    fp32, fp16 = by["pytorch", "fp32"], by["pytorch", "fp16"]
    n = len(ck.references["conversations"])
    assert fp32.greedy == f"{n}/{n}", "the model core at fp32 continues as nanochat did"
    agree, total = map(int, fp16.agreement.split("/"))
    assert total > 0 and agree / total >= 0.9 and fp16.max_diff < 1.0
    assert all(r.step_s[1] > 0 and r.step_s[2] > 0 for r in (fp32, fp16))
    skipped = {r.runtime: r.skipped for r in rows if r.skipped}
    assert "TensorRT's Python API is not installed" in skipped["tensorrt"]
    assert "CUDAExecutionProvider" in skipped["onnxruntime-cuda"]
    assert "no GPU runtime" in skipped["triton + bff"]
    text = gpu_check.table(rows, (1, 2))
    assert "skipped: TensorRT's Python API is not installed" in text and f"{n}/{n}" in text


def test_the_stream_through_triton_and_the_bff(oracle_repository):
    """The last row of a GPU run, here on the session repository's CPU demo model: the local Triton and the BFF,
    one /generate to its done event."""
    lines = []
    row = gpu_check.serve_row("demo", oracle_repository, "demo", lines.append)
    assert row.skipped is None and row.note.startswith("/generate streamed ") and "to done" in row.note, row
    assert "TTFT" in row.note and "serving demo through Triton and the BFF" in lines[0]


def test_peak_bandwidth_knows_the_common_serving_gpus():
    assert roofline.peak_bandwidth("NVIDIA L4") == 3.0e11
    assert roofline.peak_bandwidth("NVIDIA L40S") == 8.64e11  # not the L4's, though its name contains "L4"
    assert roofline.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.0e12  # not the A10's
    assert roofline.peak_bandwidth("NVIDIA A10G") == 6.0e11
    assert roofline.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert roofline.peak_bandwidth("Tesla T4") is None
