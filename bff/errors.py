"""
The BFF's error types and the one place they are serialized: `{"detail": "..."}`, the shape the
gateway reads from the current inference service.
"""

from __future__ import annotations

import falcon
import orjson


class BadRequest(falcon.HTTPBadRequest):
    def __init__(self, detail: str) -> None:
        super().__init__(description=detail)


class Unavailable(falcon.HTTPServiceUnavailable):
    """No model ready, a swap in progress, the stream limit reached or Triton's queue full."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(description=detail, retry_after=retry_after)


class NotFound(falcon.HTTPNotFound):
    def __init__(self, detail: str) -> None:
        super().__init__(description=detail)


class UpstreamFailed(falcon.HTTPBadGateway):
    """Triton answered with a failure the client cannot fix (e.g. a model load error)."""

    def __init__(self, detail: str) -> None:
        super().__init__(description=detail)


class UpstreamTimeout(falcon.HTTPGatewayTimeout):
    """Triton did not finish in time (a model load past BFF_MODEL_LOAD_TIMEOUT_S)."""

    def __init__(self, detail: str) -> None:
        super().__init__(description=detail)


def serialize(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Every error body is `{"detail": ...}`; the description if there is one, else the status title.
    The detail is kept on the request for its access log line."""
    detail = exc.description or exc.title
    req.context.error_detail = detail
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"detail": detail})
