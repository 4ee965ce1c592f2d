"""The `nanochat` Triton backend: model.py (the only file that imports triton_python_backend_utils), the
scheduler, responses, request parsing, metrics and the ONNX Runtime and TensorRT runners. protocol.py, the wire
contract, imports nothing, so the BFF and the exporter can read it without the backend's dependencies."""
