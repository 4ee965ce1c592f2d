"""
POST /generate, the contract's streaming route: validate, repair the history (bff/conversation.py), and relay
one generation (bff/streaming.py) as server-sent events. `done` is sent only after Triton's final response:
the answer is whole and the gateway saves it. A failure after the 200 is one error event and no `done`.
"""

from __future__ import annotations

import falcon
import orjson

from backend.protocol import FORCED_TOOLS
from bff.conversation import normalize
from bff.generation_params import GenerationParams
from bff.streaming import Generation
from bff.validation import check_generate, read_json
from bff.wire import Piece

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
        params = GenerationParams(
            messages=orjson.dumps(normalize(body["messages"])), temperature=body.get("temperature"),
            top_k=body.get("top_k"), max_tokens=body.get("max_tokens"),
            # the backend cuts a history longer than the context, oldest turns first
            min_answer_tokens=self.settings.min_answer_tokens,
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
        with streams.relay(g):
            async for piece in streams.pieces(g):
                if piece is None:
                    yield None  # `: ping`; also lets Falcon notice a client that left
                elif piece.text:
                    yield Event({"token": piece.text, "gpu": piece.gpu})
            yield done_event(g.final)  # pieces() ends a generation only after its final response
        if g.error is not None:
            yield Event({"error": g.error.kind, "detail": g.error.detail})  # and no done: the answer is not whole
