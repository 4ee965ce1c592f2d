"""
A Triton request's inputs -> prompt token ids and SamplingParams, with the contract's checks. Inputs are read through
`get(name) -> np.ndarray | None`, so this runs without Triton. Defaults and ranges are backend/protocol.py's
(nanochat chat_web's), and a value outside its range is refused, not clamped.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from backend.protocol import FORCED_SEARCH_RESULTS, FORCED_TOOLS, INPUT, MAX_STOP_CHARS, MAX_STOPS, MIN_TEMPERATURE
from core.generation import SamplingParams
from core.tokenizer import ConversationError, Tokenizer
from core.tool_calls import ToolCall, search_query

ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the backend refuses; the message goes back to the client."""


def _scalar(get: Callable[[str], np.ndarray | None], name: str):
    value = get(name)
    if value is None:
        return None
    if value.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0].item()


def _number(get: Callable[[str], np.ndarray | None], name: str, kind: type) -> float | int | None:
    """An optional scalar input as `kind`, its protocol default when absent, refused outside its range."""
    spec = INPUT[name]
    value = _scalar(get, name)
    if value is None:
        return spec.default
    value = kind(value)
    if not (spec.low <= value <= spec.high):  # NaN fails this too
        raise RequestError(f"{name} must be in [{spec.low}, {spec.high}], got {value}")
    return value


def parse_params(get: Callable[[str], np.ndarray | None]) -> SamplingParams:
    seed = _number(get, "seed", int)
    temperature = _number(get, "temperature", float)
    temperature = MIN_TEMPERATURE if 0 < temperature < MIN_TEMPERATURE else temperature
    ignore_eos = _scalar(get, "ignore_eos")
    if (min_tokens := _number(get, "min_tokens", int)) > (max_tokens := _number(get, "max_tokens", int)):
        raise RequestError(f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})")
    return SamplingParams(temperature=temperature, top_k=_number(get, "top_k", int) or None,  # 0: the whole vocabulary
                          top_p=_number(get, "top_p", float),
                          max_tokens=max_tokens, seed=seed, min_tokens=min_tokens,
                          ignore_eos=INPUT["ignore_eos"].default if ignore_eos is None else bool(ignore_eos))


def parse_messages(raw: bytes | str) -> list[dict]:
    try:
        messages = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"messages is not valid JSON: {e}") from e
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty JSON array of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"message {i} must be an object with role and content")
        if m.get("role") not in ROLES:
            raise RequestError(f"message {i} has unknown role {m.get('role')!r}; expected one of {list(ROLES)}")
        if "content" not in m:
            raise RequestError(f"message {i} has no content")
    return messages


def parse_prompt(get: Callable[[str], np.ndarray | None], tokenizer: Tokenizer, max_prompt: int,
                 cut: bool) -> tuple[list[int], int]:
    """The prompt's ids and how many of the conversation's oldest turns were dropped to fit max_prompt
    tokens (only when `cut`; otherwise a prompt that does not fit is refused)."""
    messages, prompt_ids, text = get("messages"), get("prompt_ids"), get("text_input")
    if sum(x is not None for x in (messages, prompt_ids, text)) != 1:
        raise RequestError("give exactly one of messages, prompt_ids and text_input")
    if text is not None:
        if text.size != 1:
            raise RequestError("text_input must be one string")
        raw = text.reshape(-1)[0]
        try:
            return [tokenizer.bos, *tokenizer.encode(raw.decode() if isinstance(raw, bytes) else str(raw))], 0
        except UnicodeDecodeError as e:
            raise RequestError(f"text_input is not UTF-8: {e}") from e
    if prompt_ids is not None:
        ids = [int(t) for t in prompt_ids.reshape(-1)]
        if not ids:
            raise RequestError("prompt_ids is empty")
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise RequestError(f"prompt_ids outside the vocabulary [0, {tokenizer.vocab_size}): {bad[:5]}")
        return ids, 0
    if messages.size != 1:
        raise RequestError("messages must be one JSON string")
    conversation = parse_messages(messages.reshape(-1)[0])
    try:
        if cut:
            return tokenizer.render_to_fit(conversation, max_prompt)
        return tokenizer.render_for_completion(conversation), 0
    except ConversationError as e:
        raise RequestError(str(e)) from e


def parse_stream(get: Callable[[str], np.ndarray | None]) -> bool:
    """Whether the client wants pieces as they come (true) or one response with the whole answer."""
    value = _scalar(get, "stream")
    return INPUT["stream"].default if value is None else bool(value)


def parse_stops(get: Callable[[str], np.ndarray | None]) -> list[str]:
    """The request's stop strings (empty ones ignored)."""
    value = get("stop")
    if value is None:
        return []
    if value.size > MAX_STOPS:
        raise RequestError(f"stop holds {value.size} strings; at most {MAX_STOPS}")
    try:
        stops = [s.decode() if isinstance(s, bytes) else str(s) for s in value.reshape(-1)]
    except UnicodeDecodeError as e:
        raise RequestError(f"stop is not UTF-8: {e}") from e
    if long := [s for s in stops if len(s) > MAX_STOP_CHARS]:
        raise RequestError(f"stop strings are at most {MAX_STOP_CHARS} characters, got one of {len(long[0])}")
    return [s for s in stops if s]


def parse_force(get: Callable[[str], np.ndarray | None]) -> ToolCall | None:
    """The call the answer must start with (`force_tool`), on the conversation's last user message."""
    value = get("force_tool")
    if value is None:
        return None
    if value.size != 1:
        raise RequestError(f"force_tool must be one string, got shape {list(value.shape)}")
    raw = value.reshape(-1)[0]
    name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    if name not in FORCED_TOOLS:
        raise RequestError(f"force_tool must be one of {list(FORCED_TOOLS)}, got {name!r}")
    messages = get("messages")
    if messages is None:
        raise RequestError("force_tool needs `messages` (it searches for the last user message)")
    query = search_query(parse_messages(messages.reshape(-1)[0]))
    return ToolCall(name, {"query": query, "top_k": FORCED_SEARCH_RESULTS}) if query else None


def parse_request(get: Callable[[str], np.ndarray | None], tokenizer: Tokenizer,
                  max_seq: int) -> tuple[list[int], SamplingParams, int]:
    """Prompt ids, sampling parameters and dropped turns of one request; RequestError says what is wrong.

    With `min_answer_tokens`, a conversation longer than the context loses its oldest turns until
    min(max_tokens, min_answer_tokens) tokens fit after it (a chat client's history; the count comes
    back as `dropped_turns`); without it, as for raw prompt_ids, a prompt that does not fit is refused.
    """
    params = parse_params(get)
    min_answer = _number(get, "min_answer_tokens", int)
    room = 1 if min_answer is None else min(params.max_tokens, min_answer)
    prompt, dropped = parse_prompt(get, tokenizer, max_seq - room, cut=min_answer is not None)
    if len(prompt) >= max_seq:
        raise RequestError(f"prompt of {len(prompt)} tokens does not fit the context of {max_seq} tokens "
                           "(at least one generated token must fit)")
    return prompt, params, dropped
