"""
TensorRT on a GPU: engines for an oracle checkpoint, their greedy tokens against nanochat's, fp16
against fp32, and the runner's refusal of an engine whose metadata names another GPU or TensorRT.
Skipped, with the reason, where there is no GPU or no tensorrt package.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.protocol import METADATA_FILE, VERSION, read_metadata
from tests.support.oracles import oracle_or_skip

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from export.tensorrt_build import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"TensorRT tests need a GPU with TensorRT: {reason}")
    from export import export_model, options

    repo, orig = tmp_path_factory.mktemp("trt_repository"), oracle_or_skip("orig")
    return {p: export_model(options(model_repository=repo, name=f"orig_{p}", source="base", nanochat_base_dir=orig,
                                    runtime="tensorrt", precision=p, max_slots=2), log=lambda _: None)
            for p in ("fp32", "fp16")}


def test_engine_greedy_matches_nanochat(engines, references):
    from backend.trt_runner import TrtRunner

    meta = read_metadata(engines["fp32"] / VERSION)
    assert meta["runtime"] == "tensorrt" and meta["tensorrt"]["compute_capability"]
    runner = TrtRunner(engines["fp32"] / "1" / "model.plan", 2, 512)
    for conv in references("orig")["conversations"]:
        prompt = conv["prompt_ids"]
        logits = runner.forward(np.array([prompt]), np.array([0]), np.array([1]))
        tokens = []
        for s in range(32):
            tokens.append(int(logits[0].argmax()))
            logits = runner.forward(np.array([[tokens[-1]]]), np.array([len(prompt) + s]), np.array([1]))
        assert tokens == conv["greedy"]["tokens"], conv["name"]


def test_fp16_engine_agrees_with_fp32(engines, references):
    from backend.trt_runner import TrtRunner

    f32, f16 = (TrtRunner(engines[p] / "1" / "model.plan", 2, 512) for p in ("fp32", "fp16"))
    prompt = references("orig")["conversations"][0]["prompt_ids"]
    a = f32.forward(np.array([prompt]), np.array([0]), np.array([0]))
    b = f16.forward(np.array([prompt]), np.array([0]), np.array([0]))
    agree = 0
    for s in range(64):
        agree += int(a[0].argmax() == b[0].argmax())
        token, pos = np.array([[int(a[0].argmax())]]), np.array([len(prompt) + s])
        a, b = f32.forward(token, pos, np.array([0])), f16.forward(token, pos, np.array([0]))
    assert agree / 64 >= 0.9


def test_engine_for_another_gpu_is_refused(engines, tmp_path):
    import shutil

    from backend.trt_runner import EngineMismatch, TrtRunner

    copy = tmp_path / "1"
    shutil.copytree(engines["fp32"] / "1", copy)
    meta = read_metadata(copy)
    meta["tensorrt"]["compute_capability"] = "1.0"
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(EngineMismatch, match=r"compute capability 1\.0"):
        TrtRunner(copy / "model.plan", 2, 512)
