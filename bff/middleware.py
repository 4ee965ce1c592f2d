"""
Request middleware: an id for every request (X-Request-ID, reused from the caller when given), one JSON
log line per request, and the X-Internal-API-Key check.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

import falcon

from bff.stats import BffStats

access = logging.getLogger("bff.access")
MAX_REQUEST_ID = 128


def log_request(req: falcon.Request, status: int | str, **fields) -> None:
    """The one log line of a request. Streams call it themselves when they end."""
    line = {
        "request_id": req.context.request_id,
        "method": req.method,
        "route": req.uri_template or req.path,
        "status": int(str(status)[:3]),
        "duration_ms": round((time.perf_counter() - req.context.started) * 1000, 2),
        **fields,
    }
    access.info(line)


class RequestId:
    def __init__(self, stats: BffStats) -> None:
        self.stats = stats

    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        given = req.get_header("X-Request-ID") or ""
        # a caller's id is kept when it is a sane one (it goes into every log line and back in the response)
        sane = 0 < len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable()
        req.context.request_id = given if sane else uuid.uuid4().hex

    async def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                               req_succeeded: bool) -> None:
        resp.set_header("X-Request-ID", req.context.request_id)
        self.stats.request(req.uri_template or "unmatched", int(str(resp.status)[:3]))
        if resp.sse is None:  # a stream logs itself when it ends
            detail = req.context.get("error_detail")  # why a 4xx or 5xx was answered
            log_request(req, resp.status, **({"detail": detail} if detail else {}))


class ApiKey:
    """401 unless X-Internal-API-Key, or `Authorization: Bearer <key>` as OpenAI clients send it, matches;
    resources with `public = True` (/health) are exempt."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    async def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object,
                               params: dict) -> None:
        if getattr(resource, "public", False):
            return
        given = req.get_header("X-Internal-API-Key")
        if given is None:
            scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), self.key):
            raise falcon.HTTPUnauthorized(description="missing or invalid X-Internal-API-Key (or Bearer key)")
