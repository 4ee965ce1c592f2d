"""
The runner for an exported model: ONNX Runtime (backend/onnx_runner.py) or TensorRT (backend/trt_runner.py),
as metadata.json's runtime says, on the device of the Triton instance that loads it.
"""

from __future__ import annotations

from pathlib import Path

from backend.model_config import ModelShape
from backend.protocol import ONNX_FILE, PLAN_FILE
from core.generation import Runner


def make_runner(shape: ModelShape, version_dir: Path, gpu: bool, device_id: int) -> Runner:
    if shape.runtime == "onnx":
        from backend.onnx_runner import OrtRunner

        providers = None  # OrtRunner's default: CUDA when ONNX Runtime has it, else CPU
        if gpu:
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        return OrtRunner(version_dir / ONNX_FILE, shape.max_slots, shape.max_seq, providers=providers)
    from backend.trt_runner import TrtRunner  # ModelShape admits onnx and tensorrt only

    return TrtRunner(version_dir / PLAN_FILE, shape.max_slots, shape.max_seq, device_id=device_id)
