"""
The BFF's only door to Triton: a pool of endpoints (a tritonclient.grpc.aio client each for the model
control calls) and one `ModelStreamInfer` stream per /generate request.

New streams go to the live endpoint with the fewest active streams. An endpoint is marked down when a
call to it fails at the transport level and back up when the periodic probe gets an answer, so no stream
started after a failure is sent to a dead server while streams on live servers are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from dataclasses import dataclass

import grpc
import httpx
from tritonclient.grpc import service_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from backend.protocol import (
    INPUT,
    INVALID,
    KEEPALIVE_MS,
    KEEPALIVE_TIMEOUT_MS,
    METRIC_HEALTHY,
    QUEUE_FULL,
    SHUTTING_DOWN,
    USAGE_OUTPUTS,
    wire_type,
)

log = logging.getLogger("bff.triton")

# Errors come in-band (a response with an error message), not as the stream's gRPC status: Triton's
# `triton_grpc_error` mode crashes the server (SIGSEGV) when a client cancels a stream in that mode
# (seen with 2.51, the local server); the backend's messages say enough to classify them.
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
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),  # Triton accepts these: TRITON_KEEPALIVE_FLAGS
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # what gRPC core enforces on an unanswered keepalive ping is the ping timeout (default 60 s), not the
    # keepalive timeout above (grpc/grpc#39239): measured 63 s to notice a frozen Triton without this line
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_END = object()
# Only what the SSE events need: three small tensors per piece, and the usage outputs, which the backend
# adds to the final response only.
OUTPUTS = ("text", "device_id", "finish_reason", *USAGE_OUTPUTS)
# Triton's stream RPC is bidirectional, but a generation sends exactly one request, so it is called as a
# server-streaming call: the headers, the request and the half-close leave in one batch instead of three,
# without tritonclient's per-request iterator and per-response wrappers (less CPU per request: README,
# benchmarks). On the wire it is the same HTTP/2 stream.
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
ADMIN_HEADER = "triton-admin-key"  # the header Triton's restricted repository API checks (docker/, k8s)


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
        """Each output here is one element, so a BYTES tensor is a 4-byte length and the bytes, an INT32
        four bytes (per piece this is several times cheaper than tritonclient's InferResult.as_numpy)."""
        raw = raw_outputs(response)
        flag = response.parameters.get("triton_final_response")
        final = flag is not None and flag.bool_param
        usage = {name: _int32(raw[name]) for name in USAGE_OUTPUTS if name in raw} if final else {}
        return cls(text=raw["text"][4:].decode("utf-8"), gpu=_int32(raw["device_id"]),
                   finish_reason=raw["finish_reason"][4:].decode("utf-8"), final=final, usage=usage)


def _int32(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def raw_outputs(response: service_pb2.ModelInferResponse) -> dict[str, bytes]:
    """Each output's raw little-endian contents by name."""
    return dict(zip((o.name for o in response.outputs), response.raw_output_contents, strict=True))


class Endpoint:
    """One Triton server: its aio client, the stream call, how many streams it carries, and whether it
    is up. Token streams have a channel (connection) of their own, apart from the control calls."""

    def __init__(self, url: str, metrics_url: str) -> None:
        self.url = url
        self.metrics_url = metrics_url
        self.client = InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.channel = grpc.aio.insecure_channel(url, options=CHANNEL_ARGS)
        self.stream_infer = self.channel.unary_stream(
            STREAM_METHOD, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        self.active = 0
        self.opened = 0  # streams ever started here
        self.serving: set[str] = set()  # the models READY here when the last probe looked
        self.up = True
        self.why = ""  # what the last failed liveness probe said

    async def alive(self) -> bool:
        try:
            live = bool(await self.client.is_server_live(client_timeout=PROBE_TIMEOUT_S))
            self.why = "" if live else "liveness probe: not live"
            return live
        except InferenceServerException as exc:
            self.why = f"liveness probe: {exc.message()}"
            return False

    def mark(self, up: bool, why: str = "") -> None:
        if up != self.up:
            log.warning("triton endpoint %s is %s%s", self.url, "up" if up else "down", f" ({why})" if why else "")
        self.up = up

    async def close(self) -> None:
        await asyncio.gather(self.client.close(), self.channel.close())


_PACK = {"FP32": "<f", "INT32": "<i", "INT64": "<q", "BOOL": "<?"}  # one element, little-endian, by wire type


def request_message(model: str, request_id: str, messages: bytes, temperature: float, top_k: int,
                    max_tokens: int, min_answer_tokens: int | None = None, top_p: float | None = None,
                    seed: int | None = None, stop: list[str] = (), force_tool: str | None = None,
                    min_tokens: int | None = None, ignore_eos: bool | None = None, *,
                    outputs: tuple[str, ...] = OUTPUTS) -> service_pb2.ModelInferRequest:
    """One generation as Triton's protobuf. Each input is raw little-endian contents (a BYTES element is a
    4-byte length and the bytes): what tritonclient builds from numpy arrays. Inputs given as None are not
    sent (the backend's defaults apply). min_answer_tokens makes the backend cut a conversation longer than
    the context (oldest turns first); the backend ends the answer at the first of the `stop` strings; force_tool
    (web_search) makes the answer start with that call and its result."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    strings = {"messages": [messages], "stop": [s.encode() for s in stop],
               "force_tool": [force_tool.encode()] if force_tool else []}
    for name, elements in strings.items():
        if elements:
            request.inputs.add(name=name, datatype="BYTES", shape=[len(elements)])
            request.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in elements))
    scalars = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens, min_answer_tokens=min_answer_tokens,
                   top_p=top_p, seed=seed, min_tokens=min_tokens, ignore_eos=ignore_eos, stream=True)
    for name, value in scalars.items():
        if value is None:
            continue
        wire = wire_type(INPUT[name].triton_type)
        request.inputs.add(name=name, datatype=wire, shape=[1])
        request.raw_input_contents.append(struct.pack(_PACK[wire], value))
    for name in outputs:
        request.outputs.add(name=name)
    return request


class Stream:
    """One generation: a stream call read by a pump task into a queue, so that waiting for the next
    piece can time out (for pings) without cancelling the gRPC read underneath."""

    def __init__(self, endpoint: Endpoint, model: str, request: service_pb2.ModelInferRequest) -> None:
        self.endpoint = endpoint
        self.model = model
        self._queue: asyncio.Queue = asyncio.Queue()
        endpoint.active += 1
        endpoint.opened += 1
        self._call = endpoint.stream_infer(request)
        self._pump = asyncio.create_task(self._read())
        self._closed = False
        self._final = False

    async def _read(self) -> None:
        try:
            async for response in self._call:
                if response.error_message:
                    message = response.error_message
                    self._queue.put_nowait(TritonError(error_kind(None, message), message))
                    return
                piece = Piece.parse(response.infer_response)
                self._queue.put_nowait(piece)
                if piece.final:
                    # The generation is over: its end goes out now, not after the stream's closing
                    # status, which still has to be read (a call dropped before it ends is cancelled).
                    self._final = True
                    self._queue.put_nowait(_END)
            if not self._final:  # the answer may be cut short: never let it pass for a whole one
                self._queue.put_nowait(TritonError("failed", "the Triton stream ended before the final response"))
        except grpc.aio.AioRpcError as exc:
            self._queue.put_nowait(await self._classify(exc))
        except asyncio.CancelledError:
            self._queue.put_nowait(TritonError("failed", "the Triton stream was cancelled"))
        except Exception as exc:  # a response it cannot read: end the stream, or the client gets pings forever
            why = f"reading Triton's stream failed: {type(exc).__name__}: {exc}"
            self._queue.put_nowait(TritonError("failed", why))

    async def _classify(self, exc: grpc.aio.AioRpcError) -> TritonError:
        message = exc.details() or str(exc.code())
        kind = error_kind(exc.code(), message)
        # Any transport-level failure may mean the server died: check before the next stream picks it.
        if not await self.endpoint.alive():
            self.endpoint.mark(False, f"stream failed with {message}; {self.endpoint.why}")
            kind = "down"
        return TritonError(kind, message)

    async def next(self, timeout: float | None = None) -> Piece | None:
        """The next piece; None when the generation is over. Raises TimeoutError after `timeout` seconds
        without one (the stream goes on), TritonError when Triton failed."""
        try:
            item = self._queue.get_nowait()  # pieces often arrive faster than they are relayed
        except asyncio.QueueEmpty:
            async with asyncio.timeout(timeout):  # no task per wait, unlike asyncio.wait_for
                item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, TritonError):
            raise item
        return item

    def close(self) -> None:
        """Cancel the Triton request if it is still running (frees its slot) and release the endpoint.
        Synchronous, so it is safe in a generator's `finally` during finalization."""
        if self._closed:
            return
        self._closed = True
        self.endpoint.active -= 1
        if not self._pump.done() and not self._final:
            self._call.cancel()
            self._pump.cancel()


class TritonPool:
    """All Triton endpoints the BFF knows; they serve the same model repository."""

    def __init__(self, urls: tuple[str, ...], metrics_urls: tuple[str, ...], admin_key: str | None = None) -> None:
        self.endpoints = [Endpoint(u, m) for u, m in zip(urls, metrics_urls, strict=True)]
        self.http = httpx.AsyncClient(timeout=PROBE_TIMEOUT_S)  # Triton's metrics ports
        # Triton started with --grpc-restricted-protocol=model-repository:<ADMIN_HEADER>=<key> answers the
        # repository API (index, load, unload) only to calls that carry the key: only the BFF has it. Over
        # gRPC Triton reads it from the metadata key prefixed "triton-grpc-protocol-".
        self.admin = {f"triton-grpc-protocol-{ADMIN_HEADER}": admin_key} if admin_key else None

    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.up]

    def pick(self, model: str, exclude: tuple[Endpoint, ...] = ()) -> Endpoint | None:
        """The least busy live endpoint that serves `model` (as the last probe saw), not one already tried.
        With every endpoint marked down, still try them: a probe can be wrong (a slow answer on a busy
        host), and a dead server fails fast."""
        candidates = [e for e in self.live() or self.endpoints if e not in exclude]
        serving = [e for e in candidates if model in e.serving] or candidates
        return min(serving, key=lambda e: e.active) if serving else None

    def open(self, endpoint: Endpoint, model: str, request_id: str, **inputs) -> Stream:
        """Start one generation on this endpoint; inputs as request_message takes them."""
        return Stream(endpoint, model, request_message(model, request_id, **inputs))

    async def probe(self) -> None:
        """Mark each endpoint up or down by whether it answers."""
        states = await asyncio.gather(*(e.alive() for e in self.endpoints))
        for endpoint, up in zip(self.endpoints, states, strict=True):
            endpoint.mark(up, endpoint.why)

    async def _each_live(self, call) -> list:
        live = self.live()
        if not live:
            raise NoEndpoint()
        results = await asyncio.gather(*(call(e.client) for e in live), return_exceptions=True)
        for endpoint, result in zip(live, results, strict=True):
            if isinstance(result, InferenceServerException) and "UNAVAILABLE" in str(result.status()):
                endpoint.mark(False, result.message())
        for result in results:
            if isinstance(result, InferenceServerException):
                timed_out = "DEADLINE_EXCEEDED" in str(result.status()) or "Deadline Exceeded" in result.message()
                raise TritonError("timeout" if timed_out else "failed", result.message())
            if isinstance(result, Exception):
                raise result
        return results

    async def index(self) -> list[dict]:
        """Triton's repository index (name, state, reason) from the first live endpoint."""
        for endpoint in self.live():
            try:
                index = await endpoint.client.get_model_repository_index(
                    headers=self.admin, as_json=True, client_timeout=PROBE_TIMEOUT_S * 5)
                return index.get("models", [])
            except InferenceServerException as exc:
                endpoint.mark(False, f"repository index: {exc.message()}")
        raise NoEndpoint()

    async def ready_models(self) -> dict[str, list[Endpoint]]:
        """Each model READY on a live endpoint -> those endpoints, from every live endpoint's repository index;
        notes on each endpoint what it serves."""
        live = self.live()
        indexes = await self._each_live(lambda c: c.get_model_repository_index(
            headers=self.admin, as_json=True, client_timeout=PROBE_TIMEOUT_S))
        out: dict[str, list[Endpoint]] = {}
        for endpoint, index in zip(live, indexes, strict=True):
            endpoint.serving = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
            for name in endpoint.serving:
                out.setdefault(name, []).append(endpoint)
        return out

    async def config(self, model: str, endpoint: Endpoint) -> dict:
        """The model's config as `endpoint` loaded it (JSON)."""
        try:
            answer = await endpoint.client.get_model_config(model, as_json=True, client_timeout=PROBE_TIMEOUT_S)
        except InferenceServerException as exc:
            raise TritonError("failed", exc.message()) from None
        return answer.get("config", {})

    async def ready(self, model: str) -> bool:
        """True when the model is READY on every live endpoint; notes on each which serve it."""
        live = self.live()
        try:
            states = await self._each_live(lambda c: c.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S))
        except TritonError:
            return False
        for endpoint, state in zip(live, states, strict=True):
            (endpoint.serving.add if state else endpoint.serving.discard)(model)
        return all(states)

    async def reconcile(self, model: str, timeout_s: float, config: str | None = None) -> list[str]:
        """Load `model` (with `config`, the JSON of Triton's config override) on every live endpoint that lacks
        it (a replica that restarted or was added comes back with only its default model); the URLs it loaded
        it on. Failures wait for the next probe."""
        loaded = []
        for endpoint in self.live():
            if model in endpoint.serving:
                continue
            try:
                if not await endpoint.client.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S):
                    await endpoint.client.load_model(model, headers=self.admin, config=config,
                                                     client_timeout=timeout_s)
                    loaded.append(endpoint.url)
                endpoint.serving.add(model)
            except InferenceServerException as exc:
                log.warning("loading %s on %s failed: %s", model, endpoint.url, exc.message())
        return loaded

    async def load(self, model: str, timeout_s: float, config: str | None = None) -> None:
        """Load on every live endpoint (with `config`, the JSON of Triton's config override); returns when
        loaded, raises TritonError with Triton's reason (kind timeout past timeout_s)."""
        await self._each_live(lambda c: c.load_model(model, headers=self.admin, config=config,
                                                      client_timeout=timeout_s))

    async def unload(self, model: str, timeout_s: float) -> None:
        """Ask every live endpoint to unload (Triton finishes in-flight requests first, asynchronously)."""
        await self._each_live(lambda c: c.unload_model(model, headers=self.admin, client_timeout=timeout_s))

    async def statistics(self) -> dict[str, list]:
        """Triton's per-model inference statistics, per endpoint."""
        out = {}
        for endpoint in self.live():
            try:
                stats = await endpoint.client.get_inference_statistics(as_json=True,
                                                                        client_timeout=PROBE_TIMEOUT_S)
                out[endpoint.url] = stats.get("model_stats", [])
            except InferenceServerException as exc:
                out[endpoint.url] = [{"error": exc.message()}]
        return out

    async def metrics_text(self, endpoints: list[Endpoint] | None = None) -> dict[str, str]:
        """The raw Prometheus text of each endpoint's /metrics (default: the live ones); "" where it fails."""
        async def one(endpoint: Endpoint) -> str:
            try:
                return (await self.http.get(endpoint.metrics_url)).text
            except httpx.HTTPError:
                return ""

        endpoints = self.live() if endpoints is None else endpoints
        texts = await asyncio.gather(*(one(e) for e in endpoints))
        return {e.url: text for e, text in zip(endpoints, texts, strict=True)}

    async def unhealthy(self, model: str, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Of `endpoints`, those where `model` reports METRIC_HEALTHY 0: its runner failed step after step. Its
        is_ready() says so to Triton releases that ask the Python backend; this works on every release."""
        texts = await self.metrics_text(endpoints)
        sick = re.compile(rf'^{METRIC_HEALTHY}{{[^}}]*model="{re.escape(model)}"[^}}]*}} 0(\.0)?$', re.M)
        return [e for e in endpoints if sick.search(texts[e.url])]

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.endpoints), self.http.aclose(), return_exceptions=True)
