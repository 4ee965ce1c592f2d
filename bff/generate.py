"""
POST /generate: validate, open one Triton stream, and relay its pieces as server-sent events.

Everything that can still become an HTTP status happens before the 200 is committed: validation, the
history repaired into a conversation (bff/conversation.py), the stream limit, picking a model and an
endpoint, and a short wait for Triton's first response (so a full queue is a 503 with Retry-After and bad
arguments a 400). The backend cuts a history longer than the context, oldest turns first.

`done` means the answer is whole (the gateway then saves it): it is sent only after Triton's final
response, with the finish reason, the token counts and how many turns were cut. A failure after the 200
is one error event and the end of the stream, without `done`, so the client can tell an interrupted
answer from a finished one. A client that goes away gets its Triton request cancelled.
"""

from __future__ import annotations

import time

import falcon
import orjson

from bff.conversation import normalize
from bff.errors import BadRequest, Unavailable, UpstreamFailed
from bff.middleware import log_request
from bff.registry import Registry
from bff.triton import Piece, Stream, TritonError, TritonPool
from bff.validation import check_generate, read_json

_WAITING = object()


class Event:
    """A pre-serialized SSE event: Falcon's SSE loop only needs `serialize()`, and prebuilt bytes skip
    its per-event JSON handler lookup."""

    __slots__ = ("data",)

    def __init__(self, payload: dict) -> None:
        self.data = b"data: " + orjson.dumps(payload) + b"\n\n"

    def serialize(self, handler: object = None) -> bytes:
        return self.data


def done_event(piece: Piece) -> Event:
    """The last event of a whole answer: what the backend's final response knows about it."""
    usage = piece.usage
    return Event({"done": True, "finish_reason": piece.finish_reason,
                  "usage": {"prompt_tokens": usage.get("prompt_tokens", 0),
                            "completion_tokens": usage.get("completion_tokens", 0)},
                  "dropped_turns": usage.get("dropped_turns", 0)})


def http_error(exc: TritonError) -> falcon.HTTPError:
    if exc.kind == "invalid":
        return BadRequest(exc.detail)
    if exc.kind in ("busy", "no_model", "down"):
        return Unavailable(exc.detail)
    return UpstreamFailed(exc.detail)


class Generate:
    def __init__(self, service) -> None:
        self.service = service
        self.settings = service.settings
        self.stats = service.stats
        # Streams admitted, counted at the check (not when the stream starts, after awaits): a burst cannot
        # pass the limit together. Released when the stream ends or fails to open.
        self.admitted = 0

    @property
    def pool(self) -> TritonPool:
        return self.service.pool

    @property
    def registry(self) -> Registry:
        return self.service.registry

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = await read_json(req, self.settings.max_body_bytes)
        check_generate(body)
        s = self.settings
        # int(): JSON Schema's "integer" admits 1.0
        params = dict(
            messages=orjson.dumps(normalize(body["messages"])),
            temperature=s.temperature if body.get("temperature") is None else float(body["temperature"]),
            top_k=s.top_k if body.get("top_k") is None else int(body["top_k"]),
            max_tokens=s.max_tokens if body.get("max_tokens") is None else int(body["max_tokens"]),
            min_answer_tokens=s.min_answer_tokens,
        )
        if self.admitted >= s.max_streams:
            self.stats.error("stream_limit")
            raise Unavailable(f"{s.max_streams} streams are already running", retry_after=1)
        self.admitted += 1
        try:
            model = self.registry.serving()
            started = time.perf_counter()
            stream, first = await self._open(model, params, req.context.request_id)
        except BaseException:
            self.admitted -= 1
            raise
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        # This model has no web search: a request for one is answered without it, and the log says so.
        resp.sse = self._events(req, stream, first, started, bool(body.get("force_web_search")))

    async def _open(self, model: str, params: dict, request_id: str) -> tuple[Stream, object]:
        """Open the Triton stream and wait briefly for its first response. An endpoint that is dead or does
        not serve the model (a replica back with only its default) is skipped for another one: nothing has
        been sent to the client yet. The prober loads the model there (Registry.probe)."""
        tried: tuple = ()
        last = TritonError("down", "no Triton endpoint is reachable")
        while (endpoint := self.pool.pick(model, tried)) is not None:
            tried += (endpoint,)
            stream = self.pool.open(endpoint, model, request_id=request_id, **params)
            self.registry.streams[model] += 1
            try:
                return stream, await stream.next(self.settings.first_response_wait_s)
            except TimeoutError:
                return stream, _WAITING  # queued or prefilling: commit the 200 and ping meanwhile
            except TritonError as exc:
                self._release(stream)
                self.stats.error(exc.kind)
                if exc.kind not in ("down", "no_model"):
                    raise http_error(exc) from None
                endpoint.serving.discard(model)
                last = exc
        raise http_error(last)

    def _release(self, stream: Stream) -> None:
        stream.close()
        self.registry.streams[stream.model] -= 1

    def _end(self, stream: Stream) -> None:
        """A stream that was admitted and opened is over."""
        self._release(stream)
        self.admitted -= 1

    async def _events(self, req: falcon.Request, stream: Stream, pending: object, started: float,
                      web_search: bool):
        stats = self.stats
        stats.stream_started()
        reason, pieces, first_at, last, final, failure = "disconnect", 0, None, None, None, None
        try:
            try:
                heard = time.monotonic()  # Triton's last response (or the request's start)
                while True:
                    if pending is _WAITING:
                        try:
                            pending = await stream.next(self.settings.ping_interval_s)
                            heard = time.monotonic()
                        except TimeoutError:
                            if time.monotonic() - heard > self.settings.stream_silence_s:
                                # a hung or unreachable Triton: end the stream (finally cancels it)
                                raise TritonError("timeout", f"no response from Triton for "
                                                             f"{self.settings.stream_silence_s:g} s") from None
                            yield None  # `: ping`; also lets Falcon notice a client that left
                            continue
                    piece, pending = pending, _WAITING
                    if piece is None:
                        break
                    assert isinstance(piece, Piece)
                    if piece.final:
                        final = piece
                    if piece.text:
                        now = time.perf_counter()
                        if last is None:
                            first_at = now
                            stats.first_token(now - started)
                        stats.piece(None if last is None else now - last)
                        last = now
                        pieces += 1
                        yield Event({"token": piece.text, "gpu": piece.gpu})
                reason = "done"
                yield done_event(final)  # Stream ends a generation only after its final response
            except TritonError as exc:
                reason, failure = "error", exc.detail
                stats.error(exc.kind)
                yield Event({"error": exc.kind, "detail": exc.detail})  # and no done: the answer is not whole
        finally:
            # Runs on normal end, on error, and when the generator is closed after a disconnect or
            # cancelled by a graceful shutdown; never yields, so it is safe during finalization.
            self._end(stream)
            stats.stream_ended(reason)
            extra = {"force_web_search": True} if web_search else {}
            if final is not None:
                extra.update(finish_reason=final.finish_reason, **final.usage)
            log_request(req, 200, model=stream.model, endpoint=stream.endpoint.url, pieces=pieces, end=reason,
                        detail=failure, ttft_ms=None if first_at is None else round((first_at - started) * 1000, 2),
                        **extra)
