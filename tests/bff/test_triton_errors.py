"""How the BFF reads a Triton error (bff.wire.error_kind): the client's fault, try later, or a failure."""

import grpc
import pytest

from bff.streaming import http_error
from bff.wire import TritonError, error_kind


@pytest.mark.parametrize(("code", "message", "kind", "status"), [
    (None, "invalid request: prompt of 600 tokens does not fit the 512-token context", "invalid", 400),
    (grpc.StatusCode.INVALID_ARGUMENT, "unexpected inference input 'foo'", "invalid", 400),
    (None, "queue full: 1 slots busy and 1 requests waiting; retry later", "busy", 503),
    (None, "model is shutting down", "busy", 503),
    (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'x' is not found", "no_model", 503),
    # the server side failing is not the client's fault, even before the first piece
    (None, "Stub process 'demo_0_0' is not healthy.", "failed", 502),
    (grpc.StatusCode.INTERNAL, "inference failed: RuntimeError: boom", "failed", 502),
])
def test_error_kind(code, message, kind, status):
    assert error_kind(code, message) == kind
    assert http_error(TritonError(kind, message)).status.startswith(str(status))
