"""
The runner for an exported model: ONNX Runtime (backend/onnx_runner.py) or TensorRT (backend/trt_runner.py),
as metadata.json's runtime says, on the device of the Triton instance that loads it; "sim" is a GPU's step time
without a model (backend/sim_runner.py, for `make bench-sim`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from backend.model_config import ModelShape
from backend.protocol import ONNX_FILE, PLAN_FILE
from core.generation import Runner


def make_runner(shape: ModelShape, version_dir: Path, gpu: bool, device_id: int) -> Runner:
    if shape.runtime == "sim":
        from backend.sim_runner import load_sim_runner

        return load_sim_runner(shape, version_dir)
    if shape.runtime == "onnx":
        from backend.onnx_runner import OrtRunner

        providers = None  # OrtRunner's default: CUDA when ONNX Runtime has it, else CPU
        if gpu:
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        return OrtRunner(version_dir / ONNX_FILE, shape.max_slots, shape.max_seq, providers=providers)
    from backend.trt_runner import TrtRunner  # ModelShape admits onnx, tensorrt and sim only

    return TrtRunner(version_dir / PLAN_FILE, shape.max_slots, shape.max_seq, device_id=device_id)


def in_pieces(forward: Callable, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, max_rows: int,
              max_tokens: int) -> list:
    """forward() on a batch larger than an engine's profile takes: groups of at most max_rows rows, each fed
    max_tokens tokens at a time (positions advancing, so each piece reads the cache the one before wrote).
    Returns each group's logits after its last token, in row order: concatenated, what one call would return."""
    T = input_ids.shape[1]
    out = []
    for r in range(0, len(input_ids), max_rows):
        ids, pos, sl = input_ids[r : r + max_rows], positions[r : r + max_rows], slots[r : r + max_rows]
        for t in range(0, T, max_tokens):
            logits = forward(ids[:, t : t + max_tokens], pos + t, sl)
        out.append(logits)
    return out
