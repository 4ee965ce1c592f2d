"""
POST /generate: the contract's streaming route. Validate, repair the history into a conversation
(bff/conversation.py), open one Triton stream (bff/streaming.py) and relay its pieces as server-sent events.
The backend cuts a history longer than the context, oldest turns first.

`done` means the answer is whole (the gateway then saves it): it is sent only after Triton's final
response, with the finish reason, the token counts and how many turns were cut. A failure after the 200
is one error event and the end of the stream, without `done`, so the client can tell an interrupted
answer from a finished one. A client that goes away gets its Triton request cancelled.
"""

from __future__ import annotations

import falcon
import orjson

from backend.protocol import FORCED_TOOLS
from bff.conversation import normalize
from bff.streaming import Generation
from bff.triton import Piece, TritonError
from bff.validation import check_generate, read_json

FORCED_SEARCH = FORCED_TOOLS[0]  # web_search


class Event:
    """A pre-serialized SSE event: Falcon's SSE loop only needs `serialize()`, and prebuilt bytes skip
    its per-event JSON handler lookup."""

    __slots__ = ("data",)

    def __init__(self, payload: dict | bytes) -> None:
        self.data = payload if isinstance(payload, bytes) else b"data: " + orjson.dumps(payload) + b"\n\n"

    def serialize(self, handler: object = None) -> bytes:
        return self.data


def done_event(piece: Piece) -> Event:
    """The last event of a whole answer: what the backend's final response knows about it."""
    usage = piece.usage
    return Event({"done": True, "finish_reason": piece.finish_reason,
                  "usage": {"prompt_tokens": usage.get("prompt_tokens", 0),
                            "completion_tokens": usage.get("completion_tokens", 0)},
                  "dropped_turns": usage.get("dropped_turns", 0)})


def stream_headers(resp: falcon.Response) -> None:
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")


class Generate:
    def __init__(self, service) -> None:
        self.service = service
        self.settings = service.settings

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
            # the Search toggle: the backend starts the answer with a search (or, without the registry channel or
            # a search backend, serves it as a plain turn and logs why)
            force_tool=FORCED_SEARCH if body.get("force_web_search") else None,
        )
        g = await self.service.streams.open(req, params)
        if body.get("force_web_search"):
            g.log["force_web_search"] = True
        stream_headers(resp)
        resp.sse = self._events(g)

    async def _events(self, g: Generation):
        streams = self.service.streams
        reason, failure = "disconnect", None
        try:
            try:
                async for piece in streams.pieces(g):
                    if piece is None:
                        yield None  # `: ping`; also lets Falcon notice a client that left
                    elif piece.text:
                        yield Event({"token": piece.text, "gpu": piece.gpu})
                reason = "done"
                yield done_event(g.final)  # pieces() ends a generation only after its final response
            except TritonError as exc:
                reason, failure = "error", exc.detail
                streams.stats.error(exc.kind)
                yield Event({"error": exc.kind, "detail": exc.detail})  # and no done: the answer is not whole
        finally:
            # Runs on normal end, on error, and when the generator is closed after a disconnect or
            # cancelled by a graceful shutdown; never yields, so it is safe during finalization.
            streams.end(g, reason, failure)
