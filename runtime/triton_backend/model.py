"""
The `nanochat` Triton backend: a Python-based backend serving every model whose config.pbtxt says
backend: "nanochat" (installed as <backends>/nanochat/model.py, the layout of vLLM's Triton backend).

Glue only, as in vLLM's backend: initialize() reads the config parameters, builds the runner chosen
by `runtime` (onnx -> OrtRunner, tensorrt -> TrtRunner) on this instance's device and starts a
runtime.scheduler.Scheduler; execute() parses each request and hands it over, returning None
(decoupled); finalize() stops the scheduler, which ends anything unfinished with a FINAL error.
Responses, cancellation checks and custom metrics go through TritonSink and TritonMetrics from the
scheduler's response thread. The request/response contract is model_repository/README.md.

The stub's interpreter ignores PYTHONPATH, so before importing numpy or the project this file adds
the directories in NANOCHAT_TRITON_SYS_PATH (set by runtime/local_triton.py; unset in a container
whose Python already has the packages) to the front of sys.path, honouring their .pth files.
"""

import os
import site
import sys


def _add_sys_path() -> None:
    before = list(sys.path)
    for directory in filter(None, os.environ.get("NANOCHAT_TRITON_SYS_PATH", "").split(os.pathsep)):
        site.addsitedir(directory)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before  # ours first: the system Python's packages may not fit (numpy 2)


_add_sys_path()

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from runtime.metrics import TritonMetrics  # noqa: E402
from runtime.requests import RequestError, parse_request  # noqa: E402
from runtime.responses import Output  # noqa: E402
from runtime.scheduler import Scheduler  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402


def make_runner(runtime: str, version_dir: Path, params: dict, max_slots: int, max_seq: int,
                kind: str, device_id: int):
    if runtime == "onnx":
        from runtime.onnx_runner import OrtRunner

        providers = None  # OrtRunner's default: CUDA when ONNX Runtime has it, else CPU
        if kind == "GPU":
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        return OrtRunner(version_dir / params.get("onnx_file", "model.onnx"), max_slots, max_seq,
                         providers=providers)
    if runtime == "tensorrt":
        from runtime.trt_runner import TrtRunner

        return TrtRunner(version_dir / params.get("plan_file", "model.plan"), max_slots, max_seq,
                         device_id=device_id)
    raise ValueError(f"unknown runtime {runtime!r}; expected onnx or tensorrt")


# Each output from the Output of one response; model_repository/README.md documents them. A piece's
# outputs go in every response; the usage outputs describe the whole request and go in its final one.
PIECE_OUTPUTS = {
    "text": lambda o: np.array([o.text.encode()], dtype=np.object_),
    "token_ids": lambda o: np.array(o.token_ids, dtype=np.int64),
    "device_id": lambda o: np.array([o.device_id], dtype=np.int32),
    "finish_reason": lambda o: np.array([o.finish_reason.encode()], dtype=np.object_),
}
USAGE_OUTPUTS = {
    "prompt_tokens": lambda o: np.array([o.prompt_tokens], dtype=np.int32),
    "completion_tokens": lambda o: np.array([o.completion_tokens], dtype=np.int32),
    "dropped_turns": lambda o: np.array([o.dropped_turns], dtype=np.int32),
}
OUTPUTS = {**PIECE_OUTPUTS, **USAGE_OUTPUTS}


class Handle:
    """A request's response sender and the outputs its client asked for (all of them when it named none):
    each tensor costs shared memory and IPC per response, and the BFF wants three per piece."""

    __slots__ = ("final_outputs", "outputs", "sender")

    def __init__(self, request) -> None:
        self.sender = request.get_response_sender()
        wanted = set(request.requested_output_names()) or set(OUTPUTS)
        self.outputs = [n for n in PIECE_OUTPUTS if n in wanted]
        self.final_outputs = self.outputs + [n for n in USAGE_OUTPUTS if n in wanted]


class TritonSink:
    """Sends scheduler outputs as decoupled responses through each request's response sender."""

    FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def send(self, handle: Handle, out: Output | None, error: str | None, final: bool) -> None:
        if error is not None:
            response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error))
        else:
            names = handle.final_outputs if final else handle.outputs
            response = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, OUTPUTS[name](out)) for name in names])
        handle.sender.send(response, flags=self.FINAL if final else 0)

    def is_cancelled(self, handle: Handle) -> bool:
        return handle.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        if not config.get("model_transaction_policy", {}).get("decoupled"):
            raise pb_utils.TritonModelException(
                "the nanochat backend needs model_transaction_policy { decoupled: true }")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        kind, device_id = args["model_instance_kind"], int(args["model_instance_device_id"])
        max_slots, max_seq = int(params.get("max_slots", 8)), int(params.get("max_seq", 512))
        self.tokenizer = Tokenizer.load(version_dir / params.get("tokenizer_file", "tokenizer.pkl"))
        runner = make_runner(params.get("runtime", "onnx"), version_dir, params, max_slots, max_seq, kind, device_id)
        labels = {"model": args["model_name"], "version": args["model_version"], "device": str(device_id)}
        self.scheduler = Scheduler(runner, self.tokenizer, TritonSink(), max_queue=int(params.get("max_queue", 64)),
                                   prefill_chunk=int(params.get("prefill_chunk", 256)),
                                   stream_interval=int(params.get("stream_interval", 1)), device_id=device_id,
                                   exporter=TritonMetrics(pb_utils, labels))
        self.max_seq = max_seq
        _log("model_ready", model=args["model_name"], runtime=params.get("runtime", "onnx"), kind=kind,
             device_id=device_id, max_slots=max_slots, max_seq=max_seq)

    def execute(self, requests: list) -> None:
        for request in requests:
            handle = Handle(request)

            def get(name: str, request=request):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                prompt, params, dropped_turns = parse_request(get, self.tokenizer, self.max_seq)
            except RequestError as e:
                self.scheduler.reject(handle, e)
                continue
            self.scheduler.submit(handle, prompt, params, dropped_turns)
        return None

    def finalize(self) -> None:
        self.scheduler.close()
        stats = self.scheduler.stats
        _log("model_finalized", send_errors=stats.send_errors, export_errors=stats.export_errors,
             last_export_error=stats.last_export_error)


def _log(event: str, **fields) -> None:
    print(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}), file=sys.stderr, flush=True)
