"""Checkpoint -> ONNX (-> TensorRT) -> Triton model repository. See export/pipeline.py."""

from export.options import ExportOptions, options
from export.pipeline import ExportError, export_model

__all__ = ["ExportError", "ExportOptions", "export_model", "options"]
