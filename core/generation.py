"""
nanochat's generation rules for one request, independent of the model runtime. `Sequence` is nanochat Engine's
RowState with its sampling and stopping rules and both tool channels: nanochat's calculator, answered at once, or
samosaChaat's registry, whose call the caller runs and answers with give_result() while the row waits. `generate`
drives one Sequence through any `Runner`: the reference loop the backend's scheduler is tested against.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.calculator import use_calculator
from core.call_scanner import SPECIAL, CallScanner
from core.device_sampling import NOT_FINITE, BatchSampling, Drawn
from core.last_tokens import LastTokens
from core.sampling import Sampler, make_generator, sample_rows
from core.tokenizer import Tokenizer
from core.tool_calls import RESULT_END, RESULT_START, ToolCall, ToolRegistry, ToolResult, parse_call

MAX_TOOL_CALLS = 4  # registry calls one answer may make; later ones are answered with an error at once


class Runner(Protocol):
    """A model with a KV cache of `max_slots` rows by `max_seq` positions that it owns."""

    max_slots: int
    max_seq: int
    prev: LastTokens | None  # each row's last token, which G4's smear reads (core/last_tokens.py); None: KV alone

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Run ids (B, T) that start at positions (B,) in cache rows slots (B,); store their K/V in
        the cache and return the last position's logits (B, V) as float32."""
        ...

    def step(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, sampling: BatchSampling) -> Drawn:
        """forward(), then each row's token drawn where the logits are (core.device_sampling.draw): only the
        ids, and the logits of the rows sampling marks exact, come back to the host."""
        ...


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling, all given: the defaults a client gets are backend/protocol.py's."""

    temperature: float  # 0 is greedy
    top_k: int | None  # None: the whole vocabulary
    max_tokens: int
    seed: int | None = None  # None: the runner's batched draw; a seed: nanochat's exact, reproducible draw
    top_p: float = 1.0  # 1: off (nanochat has no top_p; with it off sampling is nanochat's to the token)
    min_tokens: int = 0  # vLLM's: no stop token (or stop string) before this many tokens
    ignore_eos: bool = False  # vLLM's: no stop token at all, so the answer runs to max_tokens

    @property
    def exact(self) -> bool:
        """Drawn on the host from the request's own generator: sampled with a seed."""
        return self.temperature > 0 and self.seed is not None


class Sequence:
    """One request's tokens and state between model steps."""

    def __init__(self, prompt_ids: list[int], tokenizer: Tokenizer, params: SamplingParams, max_seq: int,
                 registry_tools: bool = False):
        """registry_tools: the model calls tools through samosaChaat's registry (core/tool_calls.py), not nanochat's
        calculator."""
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
        self.rng = make_generator(params.seed) if params.exact else None
        self.generated: list[int] = []
        self.length = len(self.prompt)  # tokens in context so far (prompt + generated); an attribute: read per step
        self._end = min(len(self.prompt) + params.max_tokens, max_seq)  # the length at which it stops
        # generated tokens before which a stop token may not be drawn (0: none; the draw masks them until then)
        self.hold_until = max_seq if params.ignore_eos else params.min_tokens
        self._special = tokenizer.special_set
        self.forced: deque[int] = deque()
        self.in_python = False
        self.expr: list[int] = []
        self.scanner = CallScanner(tokenizer) if registry_tools else None
        self._scan = self.scanner is not None  # every sampled token is looked at, for calls written as text
        self.pending_call: ToolCall | None = None  # a registry call waiting for give_result()
        self._call_form = ""
        self.tool_calls = 0
        self.finish_reason: str | None = None  # stop | length once finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def holds_stop(self) -> bool:
        """Whether the next draw must not give a stop token (min_tokens not reached, or ignore_eos)."""
        return len(self.generated) < self.hold_until

    @property
    def sampler(self) -> Sampler:
        """What sampling.sample_rows needs for this row."""
        return self.rng, self.params.temperature, self.params.top_k, self.params.top_p

    def next_token(self, sampled: int) -> tuple[int, bool]:
        """Take this step's token; `sampled` is the row's draw from sampling.sample_rows. Returns
        (token, forced): nanochat draws every step, even when a forced token (a calculator result)
        replaces the draw, so the generator advances the same way."""
        if not (self.forced or self.in_python or self._scan or sampled in self._special):  # the common case
            self.generated.append(sampled)
            self.length += 1
            if self.length >= self._end:
                self.finish_reason = "length"
            return sampled, False
        forced = bool(self.forced)
        token = self.forced.popleft() if forced else sampled
        self._advance(token, forced)
        return token, forced

    def preface(self, ids: list[int]) -> bool:
        """Put ids after the prompt before anything is generated (a forced start of the answer); False, and nothing
        changed, when they would leave no room for an answer."""
        if self.generated or len(self.prompt) + len(ids) >= self.max_seq:
            return False
        self.prompt += ids
        self.length = len(self.prompt)
        self._end = min(self.length + self.params.max_tokens, self.max_seq)
        return True

    def give_result(self, result: ToolResult) -> None:
        """Answer the pending registry call: its result is forced next, in the form the call was written in."""
        t, payload = self.tok, result.payload()
        if self._call_form == SPECIAL:
            self.forced.extend([t.output_start, *t.encode(payload), t.output_end])
        else:
            self.forced.extend(t.encode(RESULT_START + payload + RESULT_END))
        self.pending_call = None

    def _advance(self, token: int, forced: bool) -> None:
        """nanochat's rules for a token that is forced, special or inside a tool call."""
        t = self.tok
        self.generated.append(token)
        self.length += 1
        if self._scan:
            if not forced and (found := self.scanner.push(token)) is not None:
                self._call_form, call = found[0], parse_call(found[1])
                self.tool_calls += 1
                if self.tool_calls > MAX_TOOL_CALLS:
                    self.give_result(ToolResult(call.tool, False, error=f"more than {MAX_TOOL_CALLS} tool calls "
                                                                        "in one answer"))
                else:
                    self.pending_call = call
        elif token == t.python_start:
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
        elif self.length >= self._end:
            self.finish_reason = "length"

    def is_stop_token(self, token: int) -> bool:
        return token in (self.tok.assistant_end, self.tok.bos)


def generate(runner: Runner, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             slot: int = 0, tools: ToolRegistry | None = None) -> Iterator[tuple[int, bool]]:
    """Stream (token, forced) for one prompt, nanochat Engine style, through a runner's cache row; with `tools`, the
    registry channel, each call answered before the next step."""
    seq = Sequence(prompt_ids, tokenizer, params, runner.max_seq, registry_tools=tools is not None)
    one = np.array([slot], dtype=np.int64)
    sampling = batch_sampling([params], tokenizer)
    step = runner.step(np.array([prompt_ids], dtype=np.int64), np.array([0], dtype=np.int64), one, sampling)
    while True:
        drawn = sample_rows(step.exact_logits, [seq.sampler])[0] if params.exact else int(step.tokens[0])
        if isinstance(drawn, Exception):
            raise drawn
        if drawn == NOT_FINITE:
            raise ValueError("the model's logits are not finite")
        token, forced = seq.next_token(drawn)
        yield token, forced
        if seq.finished:
            return
        if seq.pending_call is not None:
            seq.give_result(tools.execute(seq.pending_call))
        sampling.hold[0] = seq.holds_stop
        position = np.array([seq.length - 1], dtype=np.int64)
        step = runner.step(np.array([[token]], dtype=np.int64), position, one, sampling)


def batch_sampling(params: list[SamplingParams], tokenizer: Tokenizer) -> BatchSampling:
    """The settings of requests in batch order, as the runner's draw takes them (before any token)."""
    return BatchSampling(np.array([p.temperature for p in params], dtype=np.float32),
                         np.array([p.top_k or 0 for p in params], dtype=np.int64),
                         np.array([p.top_p for p in params], dtype=np.float32),
                         np.array([p.exact for p in params], dtype=bool),
                         np.array([p.ignore_eos or p.min_tokens > 0 for p in params], dtype=bool),
                         (tokenizer.assistant_end, tokenizer.bos))
