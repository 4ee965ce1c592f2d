"""
A Triton request's inputs -> prompt token ids and SamplingParams, with the checks the contract asks for.

Inputs are read through a `get(name) -> np.ndarray | None` function, so this runs without Triton.
Ranges are nanochat chat_web's (temperature 0..2, top_k 0..200, max_tokens 1..4096); values outside
them are refused, not clamped. Defaults are chat_web's too: temperature 0.8, top_k 50, max_tokens 512
and a random seed per request. top_k 0 means the whole vocabulary (SamplingParams.top_k None).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable

import numpy as np

from runtime.generation import SamplingParams
from runtime.tokenizer import ConversationError, Tokenizer

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


def _in_range(name: str, value, lo, hi) -> None:
    if not (lo <= value <= hi):
        raise RequestError(f"{name} must be in [{lo}, {hi}], got {value}")


def parse_params(get: Callable[[str], np.ndarray | None]) -> SamplingParams:
    temperature = _scalar(get, "temperature")
    temperature = 0.8 if temperature is None else float(temperature)
    if math.isnan(temperature):
        raise RequestError("temperature must be a number, got NaN")
    _in_range("temperature", temperature, 0.0, 2.0)
    top_k = _scalar(get, "top_k")
    top_k = 50 if top_k is None else int(top_k)
    _in_range("top_k", top_k, 0, 200)
    max_tokens = _scalar(get, "max_tokens")
    max_tokens = 512 if max_tokens is None else int(max_tokens)
    _in_range("max_tokens", max_tokens, 1, 4096)
    seed = _scalar(get, "seed")
    seed = secrets.randbelow(2**63) if seed is None else int(seed)
    if seed < 0:
        raise RequestError(f"seed must be >= 0, got {seed}")
    return SamplingParams(temperature=temperature, top_k=top_k or None, max_tokens=max_tokens, seed=seed)


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
    messages, prompt_ids = get("messages"), get("prompt_ids")
    if (messages is None) == (prompt_ids is None):
        raise RequestError("give exactly one of messages and prompt_ids")
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


def parse_request(get: Callable[[str], np.ndarray | None], tokenizer: Tokenizer,
                  max_seq: int) -> tuple[list[int], SamplingParams, int]:
    """Prompt ids, sampling parameters and dropped turns of one request; RequestError says what is wrong.

    With `min_answer_tokens`, a conversation longer than the context loses its oldest turns until
    min(max_tokens, min_answer_tokens) tokens fit after it (a chat client's history; the count comes
    back as `dropped_turns`); without it, as for raw prompt_ids, a prompt that does not fit is refused.
    """
    params = parse_params(get)
    min_answer = _scalar(get, "min_answer_tokens")
    if min_answer is not None:
        min_answer = int(min_answer)
        _in_range("min_answer_tokens", min_answer, 1, 4096)
    room = 1 if min_answer is None else min(params.max_tokens, min_answer)
    prompt, dropped = parse_prompt(get, tokenizer, max_seq - room, cut=min_answer is not None)
    if len(prompt) >= max_seq:
        raise RequestError(f"prompt of {len(prompt)} tokens does not fit the context of {max_seq} tokens "
                           "(at least one generated token must fit)")
    return prompt, params, dropped
