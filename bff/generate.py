"""
POST /generate: validate, open one Triton stream, and relay its pieces as server-sent events.

Everything that can still become an HTTP status happens before the 200 is committed: validation, the
stream limit, picking a model and an endpoint, and a short wait for Triton's first response (so a full
queue is a 503 with Retry-After and bad arguments a 400). After that, failures become one error event
followed by the done event, and a client that goes away gets its Triton request cancelled.
"""

from __future__ import annotations

import time

import falcon
import orjson

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


DONE = Event({"done": True})


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
            messages=orjson.dumps(body["messages"]),
            temperature=s.temperature if body.get("temperature") is None else float(body["temperature"]),
            top_k=s.top_k if body.get("top_k") is None else int(body["top_k"]),
            max_tokens=s.max_tokens if body.get("max_tokens") is None else int(body["max_tokens"]),
        )
        if self.stats.active >= s.max_streams:
            self.stats.error("stream_limit")
            raise Unavailable(f"{s.max_streams} streams are already running", retry_after=1)
        model = self.registry.serving()
        started = time.perf_counter()
        stream, first = await self._open(model, params, req.context.request_id)
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        resp.sse = self._events(req, stream, first, started)

    async def _open(self, model: str, params: dict, request_id: str) -> tuple[Stream, object]:
        """Open the Triton stream and wait briefly for its first response. A dead endpoint is retried on
        another one: nothing has been sent to the client yet."""
        for _ in self.pool.endpoints:
            try:
                stream = self.pool.open(model, request_id=request_id, **params)
            except TritonError as exc:
                self.stats.error(exc.kind)
                raise http_error(exc) from None
            self.registry.streams[model] += 1
            try:
                return stream, await stream.next(self.settings.first_response_wait_s)
            except TimeoutError:
                return stream, _WAITING  # queued or prefilling: commit the 200 and ping meanwhile
            except TritonError as exc:
                self._release(stream)
                self.stats.error(exc.kind)
                if exc.kind != "down":
                    raise http_error(exc) from None
        raise Unavailable("no Triton endpoint is reachable")

    def _release(self, stream: Stream) -> None:
        stream.close()
        self.registry.streams[stream.model] -= 1

    async def _events(self, req: falcon.Request, stream: Stream, pending: object, started: float):
        stats = self.stats
        stats.stream_started()
        reason, finish, pieces, first_at, last = "disconnect", "", 0, None, None
        try:
            try:
                while True:
                    if pending is _WAITING:
                        try:
                            pending = await stream.next(self.settings.ping_interval_s)
                        except TimeoutError:
                            yield None  # `: ping`; also lets Falcon notice a client that left
                            continue
                    piece, pending = pending, _WAITING
                    if piece is None:
                        break
                    assert isinstance(piece, Piece)
                    finish = piece.finish_reason or finish
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
            except TritonError as exc:
                reason = "error"
                stats.error(exc.kind)
                yield Event({"error": exc.kind, "detail": exc.detail})
            yield DONE
        finally:
            # Runs on normal end, on error, and when the generator is closed after a disconnect or
            # cancelled by a graceful shutdown; never yields, so it is safe during finalization.
            self._release(stream)
            stats.stream_ended(reason)
            log_request(req, 200, model=stream.model, endpoint=stream.endpoint.url, pieces=pieces,
                        end=reason, finish_reason=finish,
                        ttft_ms=None if first_at is None else round((first_at - started) * 1000, 2))
