"""
The BFF's error types and the one place they are serialized: `{"detail": "..."}`, the shape the
gateway reads from the current inference service, and OpenAI's `{"error": {...}}` on the /v1 routes.
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


class Conflict(falcon.HTTPConflict):
    """A swap that a newer one (another worker's or replica's) won over."""

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


class OpenAIError(falcon.HTTPError):
    """An error in OpenAI's shape (bff/errors.py serializes it for the /v1 routes)."""

    def __init__(self, status: str, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(status, description=message, headers={"Retry-After": str(retry_after)} if retry_after
                         else None)
        self.openai = {"message": message, "type": kind, "param": param, "code": code}


def openai_error(exc: falcon.HTTPError) -> dict:
    """Any error raised on a /v1 route, in OpenAI's shape."""
    if isinstance(exc, OpenAIError):
        return {"error": exc.openai}
    status = int(str(exc.status)[:3])
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 503: "service_unavailable_error"}.get(status, "server_error")
    message = exc.description or exc.title
    code = "context_length_exceeded" if status == 400 and "does not fit the context" in message else None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def serialize(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Every error body is `{"detail": ...}`, the description if there is one, else the status title; on
    OpenAI's routes (/v1/...) it is OpenAI's `{"error": {...}}`. The detail is kept for the access log line."""
    detail = exc.description or exc.title
    req.context.error_detail = detail
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(openai_error(exc) if req.path.startswith("/v1/") else {"detail": detail})
