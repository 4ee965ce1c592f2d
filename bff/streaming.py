"""
One generation through Triton, shared by every surface that streams (/generate, OpenAI's chat completions):
admission, opening the stream, relaying its pieces with pings, and its end. Whatever can still be an HTTP
status happens in `open`, before the 200; after it a failure is a TritonError each surface words itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import falcon

from bff.errors import BadRequest, Unavailable, UpstreamFailed
from bff.generation_params import GenerationParams
from bff.middleware import log_request
from bff.triton import Stream
from bff.wire import Piece, TritonError

_WAITING = object()


def http_error(exc: TritonError) -> falcon.HTTPError:
    """A failure before the 200, as the HTTP status it is."""
    if exc.kind == "invalid":
        return BadRequest(exc.detail)
    if exc.kind in ("busy", "no_model", "down"):
        return Unavailable(exc.detail)
    return UpstreamFailed(exc.detail)


@dataclass
class Generation:
    """One admitted, opened stream, how it ended and what its log line will say."""

    req: falcon.Request
    stream: Stream
    pending: object  # the first response if it came within the wait, else _WAITING
    started: float
    pieces: int = 0
    first_at: float | None = None
    final: Piece | None = None
    log: dict = field(default_factory=dict)  # extra fields for the log line
    end_reason: str = "disconnect"  # until pieces() sees the final response, or relay() a TritonError
    error: TritonError | None = None  # what ended it, for the surface to put in its own words


class Streams:
    """The generations of one BFF process."""

    def __init__(self, service) -> None:
        self.service = service
        self.settings = service.settings
        self.stats = service.stats
        # Streams admitted, counted at the check (not when the stream starts, after awaits): a burst cannot
        # pass the limit together. Released when the stream ends or fails to open.
        self.admitted = 0

    async def open(self, req: falcon.Request, params: GenerationParams, model: str | None = None) -> Generation:
        """Admit and open one generation of `model` (default: the one served), or raise an HTTP error. Unset
        sampling values get the settings' defaults here, whichever surface asks."""
        s = self.settings
        if self.admitted >= s.max_streams:
            self.stats.error("stream_limit")
            raise Unavailable(f"{s.max_streams} streams are already running", retry_after=1)
        self.admitted += 1
        try:
            started = time.perf_counter()
            stream, first = await self._open(model or self.service.registry.serving(), params.with_defaults(s),
                                             req.context.request_id, follow_swaps=model is None)
        except BaseException:
            self.admitted -= 1
            raise
        self.stats.stream_started()  # relay() counts it ended
        return Generation(req, stream, first, started)

    async def _open(self, model: str, params: GenerationParams, request_id: str,
                    follow_swaps: bool) -> tuple[Stream, object]:
        """Open the Triton stream and wait briefly for its first response. An endpoint that is dead or does
        not serve the model (a replica back with only its default) is skipped for another one: nothing has
        been sent to the client yet. The prober loads the model there (Registry.probe). When no endpoint has
        the model and `follow_swaps`, another worker or replica swapped it since the last probe: Triton is
        read again and the stream goes to the model it serves now."""
        pool, registry = self.service.pool, self.service.registry
        tried: tuple = ()
        last = TritonError("down", "no Triton endpoint is reachable")
        while (endpoint := pool.pick(model, tried)) is not None:
            tried += (endpoint,)
            stream = pool.open(endpoint, model, request_id, params)
            registry.stream_opened(model)
            try:
                return stream, await stream.next(self.settings.first_response_wait_s)
            except TimeoutError:
                return stream, _WAITING  # queued or prefilling: commit the 200 and ping meanwhile
            except TritonError as exc:
                self._release(stream)
                self.stats.error(exc.kind)
                if exc.kind not in ("down", "no_model"):
                    raise http_error(exc) from None
                endpoint.note(model, False)
                last = exc
        if last.kind == "no_model" and follow_swaps and (now := await registry.refresh()) not in (None, model):
            return await self._open(now, params, request_id, follow_swaps=False)
        raise http_error(last)

    def _release(self, stream: Stream) -> None:
        stream.close()
        self.service.registry.stream_closed(stream.model)

    async def pieces(self, g: Generation) -> AsyncIterator[Piece | None]:
        """The generation's pieces in order, and None whenever BFF_PING_INTERVAL_S passes without one (a
        ping for the client; it also lets the server notice a client that left). Ends after Triton's final
        response; raises TritonError on a failure, and when Triton is silent past BFF_STREAM_SILENCE_S."""
        stats, heard, last = self.stats, time.monotonic(), None
        while True:
            if g.pending is _WAITING:
                try:
                    g.pending = await g.stream.next(self.settings.ping_interval_s)
                    heard = time.monotonic()
                except TimeoutError:
                    if time.monotonic() - heard > self.settings.stream_silence_s:
                        # a hung or unreachable Triton: the stream ends (relay() cancels it)
                        raise TritonError("timeout", f"no response from Triton for "
                                                     f"{self.settings.stream_silence_s:g} s") from None
                    yield None
                    continue
            piece, g.pending = g.pending, _WAITING
            if piece is None:
                g.end_reason = "done"  # the answer is whole
                return
            if piece.final:
                g.final = piece
            if piece.text:
                now = time.perf_counter()
                if last is None:
                    g.first_at = now
                    stats.first_token(now - g.started)
                stats.piece(None if last is None else now - last)
                last = now
                g.pieces += 1
            yield piece

    @contextlib.contextmanager
    def relay(self, g: Generation) -> Iterator[Generation]:
        """Relay `g` in this block; however it is left (done, a TritonError, the client gone, a shutdown), the
        stream ends. A TritonError is counted and kept in g.error, not raised. Synchronous: it never awaits, so
        it is safe while a disconnected client's generator is finalized."""
        try:
            yield g
        except TritonError as exc:
            g.end_reason, g.error = "error", exc
            self.stats.error(exc.kind)
        finally:
            self._end(g)

    def _end(self, g: Generation) -> None:
        """Cancel the generation in Triton if it still runs, release its admission, count it and log it."""
        self._release(g.stream)
        self.admitted -= 1
        self.stats.stream_ended(g.end_reason)
        if g.final is not None:
            g.log.update(finish_reason=g.final.finish_reason, **g.final.usage)
        ttft = None if g.first_at is None else round((g.first_at - g.started) * 1000, 2)
        log_request(g.req, 200, model=g.stream.model, endpoint=g.stream.endpoint.url, pieces=g.pieces,
                    end=g.end_reason, detail=None if g.error is None else g.error.detail, ttft_ms=ttft, **g.log)
