"""
One streamed request to a nanochat model over Triton's gRPC stream API (tritonclient.grpc.aio).

Used by the backend tests and the benchmark. One request per stream_infer call: the response
iterator ends by itself after the request's FINAL response (see the Triton notes, section 4.7).
`cancel_when(result)` returning True after a response cancels the stream, as a client that goes
away would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as grpcclient

from backend.protocol import INPUT, WIRE_FORMAT, wire_type


@dataclass
class StreamResult:
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str | None = None
    finals: int = 0  # responses flagged triton_final_response
    responses: int = 0
    device_ids: set[int] = field(default_factory=set)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped_turns: int = 0
    times: list[float] = field(default_factory=list)  # arrival of each response with tokens
    sent_at: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.texts)


def make_inputs(messages: list[dict] | None = None, prompt_ids: list[int] | None = None,
                raw_messages: str | None = None, stream: bool = True, **params) -> list[grpcclient.InferInput]:
    """A request's inputs; pieces stream as they come unless stream=False (one response, the whole answer)."""
    params["stream"] = stream
    inputs = []
    if messages is not None or raw_messages is not None:
        text = raw_messages if raw_messages is not None else json.dumps(messages)
        x = grpcclient.InferInput("messages", [1], "BYTES")
        x.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        inputs.append(x)
    if prompt_ids is not None:
        wire = wire_type(INPUT["prompt_ids"].triton_type)
        x = grpcclient.InferInput("prompt_ids", [len(prompt_ids)], wire)
        x.set_data_from_numpy(np.array(prompt_ids, dtype=WIRE_FORMAT[wire]))
        inputs.append(x)
    for name, value in params.items():
        if value is None:
            continue
        wire = wire_type(INPUT[name].triton_type)
        x = grpcclient.InferInput(name, [1], wire)
        x.set_data_from_numpy(np.array([value], dtype=WIRE_FORMAT[wire]))  # numpy reads struct's codes
        inputs.append(x)
    return inputs


async def stream(client: grpcclient.InferenceServerClient, model: str, inputs: list, request_id: str = "",
                 cancel_when: Callable[[StreamResult], bool] | None = None,
                 outputs: list[str] | None = None) -> StreamResult:
    """`outputs`: the outputs to ask for (default all); fields of outputs not asked for stay unset."""
    result = StreamResult(sent_at=time.perf_counter())
    request = {"model_name": model, "inputs": inputs, "request_id": request_id}
    if outputs:
        request["outputs"] = [grpcclient.InferRequestedOutput(name) for name in outputs]

    async def one_request():
        yield request

    responses = client.stream_infer(one_request())
    async for response, error in responses:
        result.responses += 1
        if error is not None:
            result.error = str(error)
            result.finals += 1  # an error response is the request's last
            break
        now = time.perf_counter()
        params = response.get_response().parameters
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            result.finals += 1
        ids = response.as_numpy("token_ids")
        if ids is not None and ids.size:
            result.token_ids += ids.tolist()
            result.times.append(now)
        text = response.as_numpy("text")
        if text is not None:
            result.texts.append(text[0].decode())
        if (finish := response.as_numpy("finish_reason")) is not None:
            result.finish_reason = finish[0].decode()
        if (device := response.as_numpy("device_id")) is not None:
            result.device_ids.add(int(device[0]))
        if (prompt := response.as_numpy("prompt_tokens")) is not None:
            result.prompt_tokens = int(prompt[0])
        if (completion := response.as_numpy("completion_tokens")) is not None:
            result.completion_tokens = int(completion[0])
        if (dropped := response.as_numpy("dropped_turns")) is not None:
            result.dropped_turns = int(dropped[0])
        if cancel_when is not None and cancel_when(result):
            responses.cancel()
            break
    return result
