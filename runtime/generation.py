"""
nanochat's generation semantics for one request, independent of the model runtime.

`Sequence` is nanochat Engine's per-row state (RowState) together with its sampling and stopping
rules: a seeded generator consumed once per token, forced tokens after a calculator call, stop at
<|assistant_end|> or <|bos|>, max_tokens counting forced tokens, and the context limit. The Triton
backend's scheduler drives many Sequences in one batch; `generate` drives one Sequence through any
`Runner` and is the reference loop the backend is tested against.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from runtime.calculator import use_calculator
from runtime.sampling import make_generator, sample_next_token
from runtime.tokenizer import Tokenizer


class Runner(Protocol):
    """A model with a KV cache of `max_slots` rows by `max_seq` positions that it owns."""

    max_slots: int
    max_seq: int

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Run ids (B, T) that start at positions (B,) in cache rows slots (B,); store their K/V in
        the cache and return the last position's logits (B, V) as float32."""
        ...


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    max_tokens: int = 256
    seed: int = 42


class Sequence:
    """One request's tokens and state between model steps."""

    def __init__(self, prompt_ids: list[int], tokenizer: Tokenizer, params: SamplingParams, max_seq: int):
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= max_seq:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {max_seq} tokens "
                "(at least one generated token must fit)"
            )
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self.prompt = list(prompt_ids)
        self.tok = tokenizer
        self.params = params
        self.max_seq = max_seq
        self.rng = make_generator(params.seed) if params.temperature > 0 else None
        self.generated: list[int] = []
        self.forced: deque[int] = deque()
        self.in_python = False
        self.expr: list[int] = []
        self.finish_reason: str | None = None  # stop | length once finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in context so far (prompt + generated)."""
        return len(self.prompt) + len(self.generated)

    def next_token(self, logits: np.ndarray, argmax: int | None = None) -> tuple[int, bool]:
        """Choose the next token from this row's logits (V,); returns (token, forced). A caller that
        took the argmax of a whole batch at once passes this row's: greedy rows need nothing else."""
        # nanochat samples every step, even when a forced token replaces the sample, so the
        # generator advances the same way; at temperature 0 no RNG is involved and we can skip it.
        sampled = None
        if self.rng is not None:
            p = self.params
            sampled = int(sample_next_token(torch.from_numpy(logits[None]), self.rng, p.temperature, p.top_k))
        elif not self.forced:
            # numpy's argmax, like torch's, returns the first maximal index; per row through torch it
            # costs ~15x more here (op dispatch), which is most of a small model's per-token work
            sampled = int(logits.argmax()) if argmax is None else argmax
        forced = bool(self.forced)
        token = self.forced.popleft() if forced else sampled
        self._advance(token)
        return token, forced

    def _advance(self, token: int) -> None:
        t = self.tok
        self.generated.append(token)
        if token == t.python_start:
            self.in_python, self.expr = True, []
        elif token == t.python_end and self.in_python:
            self.in_python = False
            if self.expr:
                result = use_calculator(t.decode(self.expr))
                if result is not None:
                    self.forced.extend([t.output_start, *t.encode(str(result)), t.output_end])
            self.expr = []
        elif self.in_python:
            self.expr.append(token)
        if token in (t.assistant_end, t.bos):
            self.finish_reason = "stop"
        elif len(self.generated) >= self.params.max_tokens or self.length >= self.max_seq:
            self.finish_reason = "length"

    def is_stop_token(self, token: int) -> bool:
        return token in (self.tok.assistant_end, self.tok.bos)


def generate(runner: Runner, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             slot: int = 0) -> Iterator[tuple[int, bool]]:
    """Stream (token, forced) for one prompt, nanochat Engine style, through a runner's cache row."""
    seq = Sequence(prompt_ids, tokenizer, params, runner.max_seq)
    one = np.array([slot], dtype=np.int64)
    logits = runner.forward(np.array([prompt_ids], dtype=np.int64), np.array([0], dtype=np.int64), one)
    while True:
        token, forced = seq.next_token(logits[0])
        yield token, forced
        if seq.finished:
            return
        position = np.array([seq.length - 1], dtype=np.int64)
        logits = runner.forward(np.array([[token]], dtype=np.int64), position, one)
