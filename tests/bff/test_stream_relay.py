"""bff.triton.Stream alone, with a fake tritonclient stream: pieces that arrived together are taken
together, and the end or an error behind them still reaches next()."""

import asyncio
import struct

from tritonclient.grpc import service_pb2

from bff.triton import Piece, Stream, TritonError


def response(text: str, finish: str = "") -> service_pb2.ModelInferResponse:
    r = service_pb2.ModelInferResponse()
    for name in ("text", "device_id", "finish_reason"):
        r.outputs.add().name = name
    blob = lambda s: struct.pack("<I", len(s.encode())) + s.encode()
    r.raw_output_contents.extend([blob(text), struct.pack("<i", 0), blob(finish)])
    return r


class Result:
    def __init__(self, r):
        self.r = r

    def get_response(self):
        return self.r


class FakeCall:
    """Yields its items once `release` is set, all at once, as a burst off the wire would arrive."""

    def __init__(self, items):
        self.items, self.release = items, asyncio.Event()

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        await self.release.wait()
        for item in self.items:
            yield item

    def cancel(self):
        pass


class FakeEndpoint:
    def __init__(self, items):
        self.active = self.opened = 0
        self.call = FakeCall(items)
        self.client = self

    def stream_infer(self, requests):
        return self.call


class Error:
    def message(self):
        return "model is shutting down"


def run_stream(items) -> list:
    async def go():
        endpoint = FakeEndpoint(items)
        stream = Stream(endpoint, "m", [], "req")
        endpoint.call.release.set()
        seen = [await stream.next(5)]
        seen.append(stream.received())
        try:
            seen.append(await stream.next(5))
        except TritonError as exc:
            seen.append(exc)
        stream.close()
        assert endpoint.active == 0
        return seen

    return asyncio.run(go())


def test_a_burst_is_taken_at_once_and_the_end_is_kept_for_next():
    first, burst, end = run_stream([(Result(response(t)), None) for t in ("a", "b", "c")])
    assert first == Piece("a", 0, "") and [p.text for p in burst] == ["b", "c"] and end is None


def test_an_error_after_a_burst_is_raised_by_next():
    items = [(Result(response("a")), None), (Result(response("b")), None), (None, Error())]
    first, burst, error = run_stream(items)
    assert first.text == "a" and [p.text for p in burst] == ["b"]
    assert isinstance(error, TritonError) and "shutting down" in error.detail


def test_nothing_waiting_means_an_empty_burst():
    async def go():
        endpoint = FakeEndpoint([(Result(response("a", "stop")), None)])
        stream = Stream(endpoint, "m", [], "req")
        assert stream.received() == []  # nothing has arrived yet
        endpoint.call.release.set()
        piece = await stream.next(5)
        stream.close()
        return piece

    assert asyncio.run(go()).finish_reason == "stop"

