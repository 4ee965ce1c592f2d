"""
One generation through Triton, for every surface that streams (the contract's /generate, OpenAI's chat
completions): admission against the stream limit, opening the stream on an endpoint that serves the model,
relaying its pieces with pings and a bound on Triton's silence, and the one log line when it ends.

Everything that can still become an HTTP status happens in `open` (the limit, the model, an endpoint, a short
wait for Triton's first response, so a full queue is a 503 and bad arguments a 400). After that a failure is
a TritonError for the surface to put in its own words.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import falcon

from bff.errors import BadRequest, Unavailable, UpstreamFailed
from bff.middleware import log_request
from bff.triton import Piece, Stream, TritonError

_WAITING = object()


def http_error(exc: TritonError) -> falcon.HTTPError:
    if exc.kind == "invalid":
        return BadRequest(exc.detail)
    if exc.kind in ("busy", "no_model", "down"):
        return Unavailable(exc.detail)
    return UpstreamFailed(exc.detail)


@dataclass
class Generation:
    """One admitted, opened stream and what its log line will say."""

    req: falcon.Request
    stream: Stream
    pending: object  # the first response if it came within the wait, else _WAITING
    started: float
    pieces: int = 0
    first_at: float | None = None
    final: Piece | None = None
    log: dict = field(default_factory=dict)  # extra fields for the log line


class Streams:
    """The generations of one BFF process."""

    def __init__(self, service) -> None:
        self.service = service
        self.settings = service.settings
        self.stats = service.stats
        # Streams admitted, counted at the check (not when the stream starts, after awaits): a burst cannot
        # pass the limit together. Released when the stream ends or fails to open.
        self.admitted = 0

    async def open(self, req: falcon.Request, params: dict, model: str | None = None) -> Generation:
        """Admit and open one generation of `model` (default: the one served), or raise an HTTP error."""
        s = self.settings
        if self.admitted >= s.max_streams:
            self.stats.error("stream_limit")
            raise Unavailable(f"{s.max_streams} streams are already running", retry_after=1)
        self.admitted += 1
        try:
            started = time.perf_counter()
            stream, first = await self._open(model or self.service.registry.serving(), params,
                                             req.context.request_id, follow_swaps=model is None)
        except BaseException:
            self.admitted -= 1
            raise
        self.stats.stream_started()  # end() counts it ended, whichever surface relays it
        return Generation(req, stream, first, started)

    async def _open(self, model: str, params: dict, request_id: str, follow_swaps: bool) -> tuple[Stream, object]:
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
            stream = pool.open(endpoint, model, request_id=request_id, **params)
            registry.streams[model] += 1
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
        if last.kind == "no_model" and follow_swaps and (now := await registry.refresh()) not in (None, model):
            return await self._open(now, params, request_id, follow_swaps=False)
        raise http_error(last)

    def _release(self, stream: Stream) -> None:
        stream.close()
        self.service.registry.streams[stream.model] -= 1

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
                        # a hung or unreachable Triton: the stream ends (end() cancels it)
                        raise TritonError("timeout", f"no response from Triton for "
                                                     f"{self.settings.stream_silence_s:g} s") from None
                    yield None
                    continue
            piece, g.pending = g.pending, _WAITING
            if piece is None:
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

    def end(self, g: Generation, reason: str, failure: str | None = None) -> None:
        """The generation is over (done, error or disconnect): cancel it in Triton if it still runs, release
        its admission, count it and write its log line. Never awaits: safe in a generator's finally."""
        self._release(g.stream)
        self.admitted -= 1
        self.stats.stream_ended(reason)
        if g.final is not None:
            g.log.update(finish_reason=g.final.finish_reason, **g.final.usage)
        ttft = None if g.first_at is None else round((g.first_at - g.started) * 1000, 2)
        log_request(g.req, 200, model=g.stream.model, endpoint=g.stream.endpoint.url, pieces=g.pieces, end=reason,
                    detail=failure, ttft_ms=ttft, **g.log)
