"""The BFF's own Triton protobufs (bff.triton): the request it writes and the responses it reads."""

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2
from tritonclient.grpc._utils import _get_inference_request

from bff.triton import OUTPUTS, Piece, request_message


def test_request_message_is_what_tritonclient_builds():
    messages = '[{"role": "user", "content": "héllo"}]'.encode()
    inputs = []
    for name, value, dtype in (("messages", np.array([messages], dtype=np.object_), "BYTES"),
                               ("temperature", np.array([0.7], dtype=np.float32), "FP32"),
                               ("top_k", np.array([50], dtype=np.int32), "INT32"),
                               ("max_tokens", np.array([512], dtype=np.int32), "INT32"),
                               ("min_answer_tokens", np.array([128], dtype=np.int32), "INT32")):
        x = InferInput(name, [1], dtype)
        x.set_data_from_numpy(value)
        inputs.append(x)
    expected = _get_inference_request(
        model_name="head", inputs=inputs, model_version="", request_id="r1",
        outputs=[InferRequestedOutput(n) for n in OUTPUTS], sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, parameters=None)
    assert request_message("head", "r1", messages, 0.7, 50, 512, 128) == expected


def response(text: str, device: int, finish: str, final: bool | None, **usage: int) -> service_pb2.ModelInferResponse:
    """A response as Triton's gRPC stream carries the nanochat backend's outputs."""
    out = service_pb2.ModelInferResponse(model_name="head", id="r1")
    int32 = lambda n: n.to_bytes(4, "little", signed=True)
    for name, datatype, raw in (("text", "BYTES", len(text.encode()).to_bytes(4, "little") + text.encode()),
                                ("device_id", "INT32", int32(device)),
                                ("finish_reason", "BYTES", len(finish).to_bytes(4, "little") + finish.encode()),
                                *((name, "INT32", int32(n)) for name, n in usage.items())):
        out.outputs.add(name=name, datatype=datatype, shape=[1])
        out.raw_output_contents.append(raw)
    if final is not None:
        out.parameters["triton_final_response"].bool_param = final
    return out


def test_piece_parse_reads_outputs_and_the_final_flag():
    assert Piece.parse(response("dragón ", 3, "", False)) == Piece("dragón ", 3, "", final=False, usage={})
    usage = {"prompt_tokens": 300, "completion_tokens": 7, "dropped_turns": 2}
    assert Piece.parse(response("", 0, "stop", True, **usage)) == Piece("", 0, "stop", final=True, usage=usage)
    # a response without the flag is not the last one
    assert Piece.parse(response("x", -1, "", None)) == Piece("x", -1, "", final=False, usage={})
