"""
The BFF's streams to Triton: a pool of endpoints and one `ModelStreamInfer` stream per generation, sent to the
live endpoint with the fewest active streams. An endpoint is marked down when a call to it fails at the
transport level and up when the periodic probe gets an answer; streams on live servers are left alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Iterable, Set

import grpc
from tritonclient.grpc import service_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from backend.protocol import KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS
from bff.generation_params import GenerationParams
from bff.wire import Piece, TritonError, error_kind, request_message

log = logging.getLogger("bff.triton")

PROBE_TIMEOUT_S = 3.0
INT32_MAX = 2**31 - 1
# Passing channel_args replaces tritonclient's defaults, so its message sizes are repeated here. A local
# subchannel pool and short reconnect backoff: each endpoint's channel reconnects on its own and within
# seconds once a server that was down answers again (gRPC's default backoff grows to two minutes).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # a replica back under its name at a new address is looked up again within a second, not 30 s
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),  # Triton accepts these: TRITON_KEEPALIVE_FLAGS
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # what gRPC core enforces on an unanswered keepalive ping is the ping timeout (default 60 s), not the
    # keepalive timeout above (grpc/grpc#39239): measured 63 s to notice a frozen Triton without this line
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# In gRPC's error when the name did not resolve, whichever resolver ("errors resolving", "DNS resolution failed"):
# a replica whose pod is not Ready yet has no DNS record
UNRESOLVED = "resolv"
_END = object()
# Triton's stream RPC is bidirectional, but a generation sends exactly one request, so it is called as a
# server-streaming call: the headers, the request and the half-close leave in one batch instead of three,
# without tritonclient's per-request iterator and per-response wrappers (less CPU per request: README,
# benchmarks). On the wire it is the same HTTP/2 stream.
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


class Endpoint:
    """One Triton server: its aio client, the stream call, how many streams it carries, which models it
    serves and whether it is up; it alone writes those. Token streams have a channel (connection) of their
    own, apart from the control calls."""

    def __init__(self, url: str, metrics_url: str) -> None:
        self.url = url
        self.metrics_url = metrics_url
        self._connect()
        self.active = 0
        self.opened = 0  # streams ever started here
        self._serving: set[str] = set()  # the models READY here when Triton last said
        self.up = True
        self.why = ""  # what the last failed liveness probe said

    def _connect(self) -> None:
        self.client = InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        self.channel = grpc.aio.insecure_channel(self.url, options=CHANNEL_ARGS)
        self.stream_infer = self.channel.unary_stream(
            STREAM_METHOD, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString)

    @property
    def serving(self) -> Set[str]:
        return self._serving

    def serves(self, models: Iterable[str]) -> None:
        """What the repository index says is READY here now."""
        self._serving = set(models)

    def note(self, model: str, ready: bool) -> None:
        """One model found READY here or not (a readiness call, a load, a failed stream, a failing runner)."""
        (self._serving.add if ready else self._serving.discard)(model)

    def start(self, request: service_pb2.ModelInferRequest) -> grpc.aio.UnaryStreamCall:
        """Start one stream call here; `release()` when it is over."""
        self.active += 1
        self.opened += 1
        return self.stream_infer(request)

    def release(self) -> None:
        self.active -= 1

    async def alive(self) -> bool:
        try:
            live = bool(await self.client.is_server_live(client_timeout=PROBE_TIMEOUT_S))
            self.why = "" if live else "liveness probe: not live"
            return live
        except InferenceServerException as exc:
            self.why = f"liveness probe: {exc.message()}"
            # gRPC backs off a failed lookup per channel, up to two minutes, and no option shortens that: new
            # channels look the name up at the next probe. A channel whose name does not resolve carries no call.
            if UNRESOLVED in self.why and not self.active:
                stale = self.client, self.channel
                self._connect()  # before closing the old ones: a stream picked meanwhile gets the new channel
                await asyncio.gather(*(c.close() for c in stale))
            return False

    def mark(self, up: bool, why: str = "") -> None:
        if up != self.up:
            log.warning("triton endpoint %s is %s%s", self.url, "up" if up else "down", f" ({why})" if why else "")
        self.up = up

    async def close(self) -> None:
        await asyncio.gather(self.client.close(), self.channel.close())


class Stream:
    """One generation: a stream call read by a pump task into a deque, so that waiting for the next
    piece can time out (for pings) without cancelling the gRPC read underneath."""

    def __init__(self, endpoint: Endpoint, model: str, request: service_pb2.ModelInferRequest) -> None:
        self.endpoint = endpoint
        self.model = model
        self._loop = asyncio.get_running_loop()
        # What the pump read and next() has not returned yet, and next()'s future while it waits for more. Not an
        # asyncio.Queue read under asyncio.timeout: that is a timer made and cancelled per piece, and the queue's
        # own bookkeeping, for every SSE event (about 5% of the BFF's CPU at 256 streams, docs/benchmarks.md).
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._deadline = math.inf  # when the current wait gives up
        self._timer: asyncio.TimerHandle | None = None  # one per stream, re-armed only when it fires
        self._timer_at = math.inf
        self._call = endpoint.start(request)
        self._pump = asyncio.create_task(self._read())
        self._closed = False
        self._final = False

    async def _read(self) -> None:
        try:
            async for response in self._call:
                # Errors come in-band, not as the stream's gRPC status: Triton's `triton_grpc_error` mode
                # crashes the server (SIGSEGV, 2.51) when a client cancels a stream in that mode.
                if response.error_message:
                    message = response.error_message
                    self._put(TritonError(error_kind(None, message), message))
                    return
                piece = Piece.parse(response.infer_response)
                self._put(piece)
                if piece.final:
                    # The generation is over: its end goes out now, not after the stream's closing
                    # status, which still has to be read (a call dropped before it ends is cancelled).
                    self._final = True
                    self._put(_END)
            if not self._final:  # the answer may be cut short: never let it pass for a whole one
                self._put(TritonError("failed", "the Triton stream ended before the final response"))
        except grpc.aio.AioRpcError as exc:
            self._put(await self._classify(exc))
        except asyncio.CancelledError:
            self._put(TritonError("failed", "the Triton stream was cancelled"))
        except Exception as exc:  # a response it cannot read: end the stream, or the client gets pings forever
            why = f"reading Triton's stream failed: {type(exc).__name__}: {exc}"
            self._put(TritonError("failed", why))

    async def _classify(self, exc: grpc.aio.AioRpcError) -> TritonError:
        message = exc.details() or str(exc.code())
        kind = error_kind(exc.code(), message)
        # Any transport-level failure may mean the server died: check before the next stream picks it.
        if not await self.endpoint.alive():
            self.endpoint.mark(False, f"stream failed with {message}; {self.endpoint.why}")
            kind = "down"
        return TritonError(kind, message)

    def _put(self, item: object) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float | None = None) -> Piece | None:
        """The next piece; None when the generation is over. Raises TimeoutError after `timeout` seconds
        without one (the stream goes on), TritonError when Triton failed."""
        if not self._items:  # pieces often arrive faster than they are relayed: then no wait at all
            await self._wait(timeout)
        item = self._items.popleft()
        if item is _END:
            return None
        if isinstance(item, TritonError):
            raise item
        return item

    async def _wait(self, timeout: float | None) -> None:
        self._deadline = math.inf if timeout is None else self._loop.time() + timeout
        if self._deadline < self._timer_at:  # an earlier timer than the one armed (if any) is needed
            if self._timer is not None:
                self._timer.cancel()
            self._arm(self._deadline)
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if not self._items:
            raise TimeoutError

    def _arm(self, at: float) -> None:
        self._timer, self._timer_at = self._loop.call_at(at, self._expire, at), at

    def _expire(self, at: float) -> None:
        """The timer, armed for `at`: end the wait whose deadline that was, or wait on for a later one."""
        self._timer, self._timer_at = None, math.inf
        if self._waiter is None or self._waiter.done():
            return  # nobody waits: the next wait arms its own timer
        if self._deadline <= at:
            self._waiter.set_result(None)
        elif self._deadline < math.inf:
            self._arm(self._deadline)

    def close(self) -> None:
        """Cancel the Triton request if it is still running (frees its slot) and release the endpoint.
        Synchronous, so it is safe in a generator's `finally` during finalization."""
        if self._closed:
            return
        self._closed = True
        self.endpoint.release()
        if self._timer is not None:
            self._timer.cancel()
        if not self._pump.done() and not self._final:
            self._call.cancel()
            self._pump.cancel()


class TritonPool:
    """All Triton endpoints the BFF knows; they serve the same model repository."""

    def __init__(self, urls: tuple[str, ...], metrics_urls: tuple[str, ...]) -> None:
        self.endpoints = [Endpoint(u, m) for u, m in zip(urls, metrics_urls, strict=True)]

    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.up]

    def pick(self, model: str, exclude: tuple[Endpoint, ...] = ()) -> Endpoint | None:
        """The least busy live endpoint that serves `model` (as the last probe saw), not one already tried.
        With every endpoint marked down, still try them: a probe can be wrong (a slow answer on a busy
        host), and a dead server fails fast."""
        candidates = [e for e in self.live() or self.endpoints if e not in exclude]
        serving = [e for e in candidates if model in e.serving] or candidates
        return min(serving, key=lambda e: e.active) if serving else None

    def open(self, endpoint: Endpoint, model: str, request_id: str, params: GenerationParams) -> Stream:
        """Start one generation on this endpoint."""
        return Stream(endpoint, model, request_message(model, request_id, params))

    async def probe(self) -> None:
        """Mark each endpoint up or down by whether it answers."""
        states = await asyncio.gather(*(e.alive() for e in self.endpoints))
        for endpoint, up in zip(self.endpoints, states, strict=True):
            endpoint.mark(up, endpoint.why)

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.endpoints), return_exceptions=True)
