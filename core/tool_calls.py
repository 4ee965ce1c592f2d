"""
The tool channel of samosaChaat's models (the `registry` channel): a call is JSON {"tool", "arguments"} between
<|python_start|> and <|python_end|>, and its result compact JSON between <|output_start|> and <|output_end|>. A tool
that fails gives success false and its error, never an exception. nanochat's own models keep nanochat's channel
(core/calculator.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

CALL_START, CALL_END = "<|python_start|>", "<|python_end|>"
RESULT_START, RESULT_END = "<|output_start|>", "<|output_end|>"
MAX_PAYLOAD_CHARS = 4096  # samosaChaat's bound on a result's JSON, and on a call's
ELLIPSIS = "..."



class ToolError(Exception):
    """A tool's failure, reported to the model as success false with this message."""


@dataclass(frozen=True)
class ToolCall:
    tool: str
    arguments: dict


@dataclass(frozen=True)
class ToolResult:
    tool: str
    success: bool
    output: object = None
    error: str | None = None
    metadata: dict = field(default_factory=dict)

    def payload(self) -> str:
        """The compact, sorted JSON the model reads, shortened to MAX_PAYLOAD_CHARS by its longest strings: still valid
        JSON, so the client's result card parses (samosaChaat's server cuts the text, leaving broken JSON)."""
        body = {"error": self.error, "metadata": self.metadata, "output": self.output, "success": self.success,
                "tool": self.tool}
        text = _dumps(body)
        while len(text) > MAX_PAYLOAD_CHARS:
            if not _shorten_longest(body, len(text) - MAX_PAYLOAD_CHARS):
                return _dumps({**body, "output": None, "error": "result too long"})
            text = _dumps(body)
        return text


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), sort_keys=True)


def _shorten_longest(obj: object, excess: int) -> bool:
    """Cut the longest string inside obj (dicts and lists, in place) by excess characters or to half; False when no
    string is left to cut."""
    best: tuple[int, object, object] | None = None  # (length, container, key)
    stack = [obj]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, str) and len(value) > len(ELLIPSIS) and (best is None or len(value) > best[0]):
                best = (len(value), node, key)
            elif isinstance(value, dict | list):
                stack.append(value)
    if best is None:
        return False
    length, node, key = best
    keep = max(0, min(length - excess - len(ELLIPSIS), length // 2))  # escapes make the JSON longer than the text
    node[key] = node[key][:keep] + ELLIPSIS
    return True


def parse_call(payload: str) -> ToolCall:
    """A call from the text between the call markers: JSON naming a tool, or else a calculator expression."""
    text = payload.strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        name = data.get("tool") or data.get("tool_name") or data.get("name")
        arguments = data.get("arguments") or data.get("args") or {}
        if isinstance(name, str) and isinstance(arguments, dict):
            return ToolCall(name, arguments)
    return ToolCall("calculator", {"expression": text})


def call_text(call: ToolCall) -> str:
    """A call as the model writes it (between the call markers)."""
    return _dumps({"arguments": call.arguments, "tool": call.tool})


def forced_text(call: ToolCall, result: ToolResult) -> str:
    """A call and its result written out as text, as the answer starts with them when a search is forced."""
    return f"{CALL_START}{call_text(call)}{CALL_END}{RESULT_START}{result.payload()}{RESULT_END}\n"


def search_query(messages: list[dict]) -> str:
    """What a forced search looks up: the last user message after its last blank line (the gateway puts its
    system prompt before one, in the first user message)."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    content = last.get("content") if last else None
    return content.rsplit("\n\n", 1)[-1].strip() if isinstance(content, str) else ""


Tool = Callable[[dict], object]  # arguments -> output, or (output, metadata); raises ToolError on failure


class ToolRegistry:
    """The tools a model may call, by name."""

    def __init__(self, tools: dict[str, Tool]) -> None:
        self.tools = dict(tools)

    def execute(self, call: ToolCall) -> ToolResult:
        """Run a call; every failure (a ToolError, bad arguments, a bug) is a result with success false."""
        tool = self.tools.get(call.tool)
        if tool is None:
            return ToolResult(call.tool, False, error=f"Unknown tool: {call.tool}")
        try:
            out = tool(call.arguments)
        except ToolError as e:
            return ToolResult(call.tool, False, error=str(e))
        except Exception as e:  # a tool's bug or unexpected arguments: the model reads it, the request goes on
            return ToolResult(call.tool, False, error=f"{type(e).__name__}: {e}"[:500])
        output, metadata = out if isinstance(out, tuple) else (out, {})
        return ToolResult(call.tool, True, output, metadata=metadata)
