"""
The BFF's Triton messages, pure: the request one generation sends, the pieces its responses carry, and what a
Triton error means for the client. No I/O, so the BFF, the tools and the tests share it. Raw little-endian
contents are written and read by hand, typed by backend/protocol.py: per piece several times cheaper than
tritonclient's numpy round trip.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2

from backend.protocol import INPUT, INVALID, OUTPUT, QUEUE_FULL, SHUTTING_DOWN, USAGE_OUTPUTS, WIRE_FORMAT, wire_type
from bff.generation_params import GenerationParams

# Only what the SSE events need: three small tensors per piece, and the usage outputs, which the backend
# adds to the final response only.
OUTPUTS = ("text", "device_id", "finish_reason", *USAGE_OUTPUTS)
_LENGTH = struct.Struct(WIRE_FORMAT["UINT32"])  # a BYTES element's length prefix
_SCALARS = ("temperature", "top_k", "max_tokens", "min_answer_tokens", "top_p", "seed", "min_tokens", "ignore_eos")


def _element(triton_type: str) -> tuple[str, struct.Struct]:
    wire = wire_type(triton_type)
    return wire, struct.Struct(WIRE_FORMAT[wire])


_PACK = {name: _element(INPUT[name].triton_type) for name in (*_SCALARS, "stream")}
_UNPACK = {name: _element(OUTPUT[name].triton_type)[1] for name in ("device_id", *USAGE_OUTPUTS)}


class TritonError(Exception):
    """A failed Triton call. `kind` says what the BFF does about it:
    invalid (client's fault, 400), busy (retry later, 503), no_model (503), down (endpoint failed), failed."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class NoEndpoint(TritonError):
    def __init__(self) -> None:
        super().__init__("down", "no Triton endpoint is reachable")


def error_kind(code: grpc.StatusCode | None, message: str) -> str:
    """What a Triton error means for the client. The nanochat backend sends its refusals with a message
    and no code (backend.protocol): full queue or shutting down (try again later), or the client's own
    fault (e.g. a prompt longer than the context). Anything else, such as a backend stub that died, is
    a failure of the server side."""
    if QUEUE_FULL in message or SHUTTING_DOWN in message or code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "busy"
    if code == grpc.StatusCode.NOT_FOUND or "unknown model" in message or "no available versions" in message:
        return "no_model"
    if code == grpc.StatusCode.UNAVAILABLE:
        return "busy"  # a dead server gives the same code; Stream._classify probes to tell them apart
    if code == grpc.StatusCode.INVALID_ARGUMENT or INVALID in message:
        return "invalid"
    return "failed"


def request_message(model: str, request_id: str, params: GenerationParams, *,
                    outputs: tuple[str, ...] = OUTPUTS) -> service_pb2.ModelInferRequest:
    """One streamed generation as Triton's protobuf: what tritonclient builds from numpy arrays. Inputs given
    as None are not sent (the backend's defaults apply)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    strings = {"messages": [params.messages], "stop": [s.encode() for s in params.stop],
               "force_tool": [params.force_tool.encode()] if params.force_tool else []}
    for name, elements in strings.items():
        if elements:
            request.inputs.add(name=name, datatype="BYTES", shape=[len(elements)])
            request.raw_input_contents.append(b"".join(_LENGTH.pack(len(e)) + e for e in elements))
    scalars = {name: getattr(params, name) for name in _SCALARS}
    for name, value in {**scalars, "stream": True}.items():
        if value is None:
            continue
        wire, element = _PACK[name]
        request.inputs.add(name=name, datatype=wire, shape=[1])
        request.raw_input_contents.append(element.pack(value))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def raw_outputs(response: service_pb2.ModelInferResponse) -> dict[str, bytes]:
    """Each output's raw little-endian contents by name."""
    return dict(zip((o.name for o in response.outputs), response.raw_output_contents, strict=True))


def _scalar(raw: dict[str, bytes], name: str) -> int:
    return _UNPACK[name].unpack(raw[name])[0]


def _string(raw: bytes) -> str:
    return raw[_LENGTH.size:].decode("utf-8")  # one element: its length prefix, then the bytes


@dataclass
class Piece:
    """One Triton response of the nanochat backend."""

    text: str
    gpu: int
    finish_reason: str
    final: bool  # the request's last response (Triton's triton_final_response)
    usage: dict[str, int]  # prompt_tokens, completion_tokens, dropped_turns: in the final response only

    @classmethod
    def parse(cls, response: service_pb2.ModelInferResponse) -> Piece:
        """Each output here is one element."""
        raw = raw_outputs(response)
        flag = response.parameters.get("triton_final_response")
        final = flag is not None and flag.bool_param
        usage = {name: _scalar(raw, name) for name in USAGE_OUTPUTS if name in raw} if final else {}
        return cls(text=_string(raw["text"]), gpu=_scalar(raw, "device_id"),
                   finish_reason=_string(raw["finish_reason"]), final=final, usage=usage)
