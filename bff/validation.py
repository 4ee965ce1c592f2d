"""
Request validation, compiled once from the request schemas in bff/openapi.yaml (the document the service
publishes), plus the two rules JSON Schema cannot say: a system message only first, and a bound on the
total characters of a conversation.
"""

from __future__ import annotations

from pathlib import Path

import falcon
import orjson
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from bff.errors import BadRequest

OPENAPI_PATH = Path(__file__).parent / "openapi.yaml"
OPENAPI_TEXT = OPENAPI_PATH.read_text(encoding="utf-8")
MAX_TOTAL_CHARS = 32_000


def _validator(name: str) -> Draft202012Validator:
    # "$ref" into the document's own components keeps OpenAPI's "#/components/schemas/..." refs resolvable.
    components = yaml.safe_load(OPENAPI_TEXT)["components"]
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components})


GENERATE = _validator("GenerateRequest")
SWAP = _validator("SwapRequest")


def _location(path) -> str:
    out = "body"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


async def read_json(req: falcon.Request, max_bytes: int) -> object:
    """The request body as JSON, read with a size bound (413 above it, 400 if it is not JSON)."""
    if req.content_length is not None and req.content_length > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"body is larger than {max_bytes} bytes")
    raw = await req.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"body is larger than {max_bytes} bytes")
    if not raw:
        raise BadRequest("body: a JSON object is required")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def check(validator: Draft202012Validator, body: object) -> None:
    """Raise BadRequest naming the most relevant schema violation."""
    error = best_match(validator.iter_errors(body))
    if error is not None:
        raise BadRequest(f"{_location(error.absolute_path)}: {error.message}")


def check_generate(body: object) -> None:
    check(GENERATE, body)
    messages = body["messages"]
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise BadRequest(f"body.messages[{i}].role: 'system' is only allowed as the first message")
    total = sum(len(m["content"]) for m in messages)
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"body.messages: {total} characters in total, more than {MAX_TOTAL_CHARS}")
