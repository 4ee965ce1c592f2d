"""Checkpoint -> ONNX (-> TensorRT) -> Triton model repository. See export/pipeline.py."""

from export.pipeline import ExportError, export_model

__all__ = ["ExportError", "export_model"]
