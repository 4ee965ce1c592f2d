"""The BFF's own Triton protobufs (bff.wire): the request it writes and the responses it reads."""

from dataclasses import replace

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2
from tritonclient.grpc._utils import _get_inference_request

from bff.generation_params import GenerationParams
from bff.triton import Stream
from bff.wire import OUTPUTS, Piece, TritonError, request_message


def test_request_message_is_what_tritonclient_builds():
    messages = '[{"role": "user", "content": "héllo"}]'.encode()
    stop = ["\n\n", "fín"]
    inputs = []
    for name, value, dtype in (("messages", np.array([messages], dtype=np.object_), "BYTES"),
                               ("stop", np.array([s.encode() for s in stop], dtype=np.object_), "BYTES"),
                               ("temperature", np.array([0.7], dtype=np.float32), "FP32"),
                               ("top_k", np.array([50], dtype=np.int32), "INT32"),
                               ("max_tokens", np.array([512], dtype=np.int32), "INT32"),
                               ("min_answer_tokens", np.array([128], dtype=np.int32), "INT32"),
                               ("stream", np.array([True], dtype=np.bool_), "BOOL")):
        x = InferInput(name, list(value.shape), dtype)
        x.set_data_from_numpy(value)
        inputs.append(x)

    def built(given: list) -> service_pb2.ModelInferRequest:
        return _get_inference_request(
            model_name="head", inputs=given, model_version="", request_id="r1",
            outputs=[InferRequestedOutput(n) for n in OUTPUTS], sequence_id=0, sequence_start=False,
            sequence_end=False, priority=0, timeout=None, parameters=None)

    params = GenerationParams(messages, 0.7, 50, 512, 128)
    assert request_message("head", "r1", replace(params, stop=tuple(stop))) == built(inputs)
    assert request_message("head", "r1", params) == built(inputs[:1] + inputs[2:])  # no stop


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


class FakeCall:
    """A ModelStreamInfer call that yields the given stream responses, then ends."""

    def __init__(self, responses: list) -> None:
        self.responses = responses

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for r in self.responses:
            yield r

    def cancel(self) -> None:
        pass


class FakeEndpoint:
    def __init__(self, responses: list) -> None:
        self.responses = responses

    def start(self, request) -> FakeCall:
        return FakeCall(self.responses)

    def release(self) -> None:
        pass


def read_all(responses: list, timeout: float = 2.0) -> list:
    """Every piece of a Stream over these responses, or the exception that ended it."""
    import asyncio

    async def go():
        stream, out = Stream(FakeEndpoint(responses), "head", service_pb2.ModelInferRequest()), []
        try:
            while (piece := await stream.next(timeout)) is not None:
                out.append(piece)
        except (TritonError, TimeoutError) as exc:
            out.append(exc)
        stream.close()
        return out

    return asyncio.run(go())


def stream_response(infer: service_pb2.ModelInferResponse) -> service_pb2.ModelStreamInferResponse:
    return service_pb2.ModelStreamInferResponse(infer_response=infer)


def test_a_stream_ends_at_its_final_response():
    out = read_all([stream_response(response("a", 0, "", False)), stream_response(response("", 0, "stop", True))])
    assert [p.text for p in out] == ["a", ""] and out[-1].final


def test_an_unreadable_response_ends_the_stream_with_an_error():
    # Before: only gRPC errors and cancellation were caught, the reading task died silently, and the client
    # got `: ping` forever (here: the wait for the next piece timed out instead of ending).
    broken = service_pb2.ModelInferResponse(model_name="head")  # no outputs at all
    out = read_all([stream_response(response("a", 0, "", False)), stream_response(broken)])
    assert out[0].text == "a" and isinstance(out[1], TritonError) and out[1].kind == "failed"
    assert "reading Triton's stream failed: KeyError" in out[1].detail


def test_a_stream_that_ends_without_its_final_response_is_an_error():
    out = read_all([stream_response(response("a", 0, "", False))])
    assert isinstance(out[-1], TritonError) and "before the final response" in out[-1].detail



class SlowCall(FakeCall):
    """A call that waits before each response: (seconds, response) pairs."""

    async def _gen(self):
        import asyncio

        for delay, r in self.responses:
            await asyncio.sleep(delay)
            yield r


class SlowEndpoint(FakeEndpoint):
    def start(self, request) -> SlowCall:
        return SlowCall(self.responses)


def test_a_wait_that_times_out_leaves_the_stream_going():
    """Waits that time out (the BFF's pings) lose and reorder no piece, and each times out on its own deadline
    whatever the waits before it armed: a shorter one after a longer one a piece ended early, a longer one than
    the timer still armed."""
    import asyncio
    import time

    piece = lambda text: stream_response(response(text, 0, "", False))
    # a at 0.3 s, b at 0.6, c at 1.2, then the final response
    responses = [(0.3, piece("a")), (0.3, piece("b")), (0.6, piece("c")),
                 (0.0, stream_response(response("", 0, "stop", True)))]

    async def go():
        stream, got = Stream(SlowEndpoint(responses), "head", service_pb2.ModelInferRequest()), []
        for timeout in (0.2, 0.05, 1.0, 0.1, 0.5, 0.35, None, None, None):
            start = time.monotonic()
            try:
                p = await stream.next(timeout)
                got.append(None if p is None else p.text)
            except TimeoutError:
                got.append(("timeout", timeout, time.monotonic() - start))
        stream.close()
        return got

    got = asyncio.run(asyncio.wait_for(go(), 10))  # a wait that never ends fails here, not by hanging
    assert [g[:2] if isinstance(g, tuple) else g for g in got] == [
        ("timeout", 0.2), ("timeout", 0.05), "a", ("timeout", 0.1), "b", ("timeout", 0.35), "c", "", None]
    for _, timeout, waited in (g for g in got if isinstance(g, tuple)):
        assert timeout - 0.002 <= waited < timeout + 0.1, (timeout, waited)
