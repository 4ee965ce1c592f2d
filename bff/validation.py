"""
Request validation, compiled once from bff/openapi.yaml's request schemas (the document the service publishes),
plus the two rules JSON Schema cannot say: a system message only first, and a bound on a conversation's
characters. Unknown top-level fields of /generate are ignored, as the gateway's reference service ignores them.
jsonschema-rs says whether a body is valid; jsonschema words what is wrong with one that is not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import falcon
import jsonschema_rs
import orjson
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from bff.errors import BadRequest

OPENAPI_PATH = Path(__file__).parent / "openapi.yaml"
OPENAPI_TEXT = OPENAPI_PATH.read_text(encoding="utf-8")
COMPONENTS = yaml.safe_load(OPENAPI_TEXT)["components"]
MAX_TOTAL_CHARS = 32_000
MAX_DEPTH = 16  # JSON nesting: the schemas need 4; jsonschema recurses once per level (1,000 levels overflow)
log = logging.getLogger("bff.validation")


class Schema:
    """One request schema, compiled twice: every request takes the valid path, which jsonschema-rs checks in
    microseconds (jsonschema took 1.1 ms for a ten-turn history of 600-word messages, docs/benchmarks.md); a body
    it refuses goes to jsonschema, whose best match names the violation, and which alone may refuse it."""

    def __init__(self, name: str) -> None:
        # "$ref" into the document's own components keeps OpenAPI's "#/components/schemas/..." refs resolvable.
        schema = {"$ref": f"#/components/schemas/{name}", "components": COMPONENTS}
        self.is_valid = jsonschema_rs.Draft202012Validator(schema).is_valid
        self.words = Draft202012Validator(schema)


GENERATE = Schema("GenerateRequest")
GENERATE_FIELDS = frozenset(COMPONENTS["schemas"]["GenerateRequest"]["properties"])
SWAP = Schema("SwapRequest")
OPENAI_CHAT = Schema("ChatCompletionRequest")
_ignored: set[str] = set()  # unknown fields already logged by this process
MAX_IGNORED = 256  # names a client chooses: the set stays bounded


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
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if _too_deep(body):
        raise BadRequest(f"body is nested more than {MAX_DEPTH} levels deep")
    return body


def _too_deep(value: object) -> bool:
    """Whether arrays and objects nest deeper than MAX_DEPTH, found without recursion."""
    level = [value]
    for _ in range(MAX_DEPTH + 1):
        level = [v for x in level if isinstance(x, list | dict) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return False
    return True


def violation(validator: Schema, body: object) -> tuple[str, str | None] | None:
    """The most relevant schema violation: (message naming where, the top-level field it is in), or None."""
    if validator.is_valid(body):
        return None
    error = best_match(validator.words.iter_errors(body))
    if error is None:
        return None
    field = str(error.absolute_path[0]) if error.absolute_path else None
    return f"{_location(error.absolute_path)}: {error.message}", field


def check(validator: Schema, body: object) -> None:
    """Raise BadRequest naming the most relevant schema violation."""
    if (found := violation(validator, body)) is not None:
        raise BadRequest(found[0])


def check_generate(body: object) -> None:
    check(GENERATE, body)
    # the gateway adds fields of its own (force_web_search): a line per name per process, not one per request
    for name in sorted(body.keys() - GENERATE_FIELDS - _ignored)[: MAX_IGNORED - len(_ignored)]:
        _ignored.add(name)
        log.info({"event": "unknown_field_ignored", "field": name[:100]})
    messages = body["messages"]
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise BadRequest(f"body.messages[{i}].role: 'system' is only allowed as the first message")
    total = sum(len(m["content"]) for m in messages)
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"body.messages: {total} characters in total, more than {MAX_TOTAL_CHARS}")
