"""
What one generation asks of the backend: the wire inputs, typed, built by each surface from its request body.
Unset sampling values are filled from the BFF's settings in one step (`with_defaults`, as vLLM's request
converts itself to sampling params), so /generate and the OpenAI surface cannot disagree on a default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bff.settings import Settings


@dataclass(frozen=True)
class GenerationParams:
    """The inputs of backend/protocol.py that the BFF sends; None: not sent (the backend's default applies)."""

    messages: bytes  # the conversation as JSON
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    min_answer_tokens: int | None = None  # /generate's: cut the oldest turns of a conversation that does not fit
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    force_tool: str | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None

    def with_defaults(self, settings: Settings) -> GenerationParams:
        """Temperature, top_k and max_tokens from the settings where the request left them out. float() and
        int(): JSON Schema's "integer" admits 1.0, which a packed INT32 or INT64 does not."""
        given = lambda value, kind: None if value is None else kind(value)
        return replace(
            self,
            temperature=float(settings.temperature if self.temperature is None else self.temperature),
            top_k=int(settings.top_k if self.top_k is None else self.top_k),
            max_tokens=int(settings.max_tokens if self.max_tokens is None else self.max_tokens),
            top_p=given(self.top_p, float), seed=given(self.seed, int), min_tokens=given(self.min_tokens, int))
