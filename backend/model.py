"""
The `nanochat` Triton backend, installed as <backends>/nanochat/model.py (vLLM's Triton backend's layout). Glue
only: initialize() builds the runner and a backend.scheduler.Scheduler from config.pbtxt and metadata.json, execute()
hands each request over and returns None (decoupled), finalize() stops the scheduler. The stub's interpreter ignores
PYTHONPATH, hence _add_sys_path before any other import.
"""

import os
import site
import sys


def _add_sys_path() -> None:
    """NANOCHAT_TRITON_SYS_PATH's directories first on sys.path, with their .pth files (set by tools/local_triton.py;
    unset in a container whose Python already has the packages)."""
    before = list(sys.path)
    for directory in filter(None, os.environ.get("NANOCHAT_TRITON_SYS_PATH", "").split(os.pathsep)):
        site.addsitedir(directory)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before  # ours first: the system Python's packages may not fit (numpy 2)


_add_sys_path()

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import triton_python_backend_utils as pb_utils  # noqa: E402

from backend.metrics import TritonMetrics  # noqa: E402
from backend.model_config import EngineConfig, ModelShape  # noqa: E402
from backend.protocol import (  # noqa: E402
    PIECE_OUTPUTS,
    REGISTRY_TOOLS,
    TOKENIZER_FILE,
    USAGE_OUTPUTS,
    read_metadata,
)
from backend.requests import RequestError, parse_force, parse_request, parse_stops, parse_stream  # noqa: E402
from backend.responses import OUTPUT_ARRAYS, Output  # noqa: E402
from backend.runner import make_runner  # noqa: E402
from backend.scheduler import Scheduler  # noqa: E402
from backend.tool_runs import registry_from_env  # noqa: E402
from core.tokenizer import Tokenizer  # noqa: E402


class Handle:
    """A request's response sender and the outputs its client asked for (all of them when it named none):
    each tensor costs shared memory and IPC per response, and the BFF wants three per piece. The usage
    outputs describe the whole request, so only its final response carries them."""

    __slots__ = ("final_outputs", "outputs", "sender")

    def __init__(self, request) -> None:
        self.sender = request.get_response_sender()
        wanted = set(request.requested_output_names()) or set(OUTPUT_ARRAYS)
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
                output_tensors=[pb_utils.Tensor(name, OUTPUT_ARRAYS[name](out)) for name in names])
        handle.sender.send(response, flags=self.FINAL if final else 0)

    def is_cancelled(self, handle: Handle) -> bool:
        return handle.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        if not config.get("model_transaction_policy", {}).get("decoupled"):
            raise pb_utils.TritonModelException(
                "the nanochat backend needs model_transaction_policy { decoupled: true }")
        engine = EngineConfig.from_parameters({k: v["string_value"] for k, v in config.get("parameters", {}).items()})
        version_dir = Path(args["model_repository"]) / args["model_version"]
        shape = ModelShape.from_metadata(read_metadata(version_dir))
        kind, device_id = args["model_instance_kind"], int(args["model_instance_device_id"])
        self.tokenizer = Tokenizer.load(version_dir / TOKENIZER_FILE)
        runner = make_runner(shape, version_dir, kind == "GPU", device_id)
        labels = {"model": args["model_name"], "version": args["model_version"], "device": str(device_id)}
        # the registry channel's tools; web_search's backend is the server's environment (TAVILY_API_KEY, SEARXNG_URL)
        tools = registry_from_env(engine.tool_timeout_ms / 1000) if shape.tool_channel == REGISTRY_TOOLS else None
        self.scheduler = Scheduler(runner, self.tokenizer, TritonSink(), engine, device_id=device_id,
                                   exporter=TritonMetrics(pb_utils, labels), tools=tools, log=_log)
        self.max_seq = shape.max_seq
        self.name = args["model_name"]
        _log("model_ready", model=args["model_name"], kind=kind, device_id=device_id, **dataclasses.asdict(shape),
             **dataclasses.asdict(engine))

    def execute(self, requests: list) -> None:
        for request in requests:
            handle = Handle(request)

            def get(name: str, request=request):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                prompt, params, dropped_turns = parse_request(get, self.tokenizer, self.max_seq)
                stream, stops, force = parse_stream(get), parse_stops(get), parse_force(get)
            except RequestError as e:
                self.scheduler.reject(handle, e)
                continue
            if force is not None and (why := self.scheduler.cannot_force_why):
                _log("force_tool_ignored", model=self.name, tool=force.tool, why=why)
                force = None
            self.scheduler.submit(handle, prompt, params, dropped_turns, stream, stops, force)
        return None

    def is_ready(self) -> bool:
        """Triton asks this for the model's readiness where its Python backend supports user-defined readiness
        (python_backend#430); on older releases the BFF reads the nanochat_healthy gauge instead."""
        return self.scheduler.healthy

    def finalize(self) -> None:
        self.scheduler.close()
        stats = self.scheduler.stats
        _log("model_finalized", send_errors=stats.send_errors, export_errors=stats.export_errors,
             last_export_error=stats.last_export_error)


def _log(event: str, **fields) -> None:
    print(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}), file=sys.stderr, flush=True)
