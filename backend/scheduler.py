"""
Continuous batching over one Runner: the engine behind each Triton model instance, in plain Python.

One step thread owns the runner and its KV cache of max_slots rows. Each step:
  1. takes new requests (they join only here, at step boundaries) and drops cancelled ones;
  2. gives waiting requests the free slots, oldest first;
  3. decodes every row that has a token to feed, all in one batched runner call;
  4. prefills one chunk: rows still reading their prompt advance by the same T tokens in one call
     (T = the shortest remaining prompt part, capped so T x rows <= prefill_chunk), so a long prompt
     costs the others at most one chunk of latency per step instead of its whole length;
  5. each row takes its token: the runner draws every row at once where the logits are (runner.step,
     core/device_sampling.py) and hands back only ids, except for requests with a seed, whose logits come
     back and are drawn from their own generator as nanochat does (core.sampling.sample_rows); then each
     row's core.generation.Sequence rules (forced calculator tokens, stop tokens,
     limits) and its stop strings (backend/stops.py), so a seeded request's tokens never depend on the rest
     of the batch; a row whose draw or rules fail ends with an error of its own while the others go on.
Finished and cancelled rows free their slot in the same step. Requests beyond max_slots wait in a
bounded queue; one that does not fit is refused at once with an error.

A request's first token is sent at once; after that a response goes out when stream_interval tokens are
ready (vLLM's --stream-interval) and stream_interval_ms has passed since the request's last one: tokens
made in between travel together, and the last response carries whatever is left. Each response is a
blocking IPC round trip into the server and a gRPC message and SSE event that every hop relays, so the
number of messages grows with time instead of with tokens (on a GPU a step takes a millisecond or a few).

The step thread never blocks on clients: it puts outputs on a ResponseThread (backend/responses.py),
which sends them and reports cancellations back through Request.cancelled, checked once per step.
Every request ends with exactly one final output: finish_reason stop|length|cancelled, or an error.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from backend.metrics import EngineStats
from backend.model_config import EngineConfig
from backend.protocol import INVALID, QUEUE_FULL, SHUTTING_DOWN
from backend.responses import Output, ResponseThread, Sink
from backend.stops import StopMatcher
from core.device_sampling import NOT_FINITE
from core.generation import Runner, SamplingParams, Sequence, batch_sampling
from core.sampling import sample_rows
from core.tokenizer import Detokenizer, Tokenizer


@dataclass(eq=False)
class Request:
    handle: object  # what the Sink sends to (Triton: the request's response sender)
    seq: Sequence
    detok: Detokenizer
    arrived: float
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    emitted: int = 0  # tokens streamed so far (stop tokens are not streamed)
    last_token_at: float = 0.0
    cancelled: bool = False  # set by the ResponseThread, read by the step thread
    unsent_text: str = ""  # streamed tokens held back until stream_interval of them are ready and send_at has come
    send_at: float = 0.0  # monotonic time before which no further response goes out
    unsent_ids: list[int] = field(default_factory=list)
    dropped_turns: int = 0  # reported in the outputs: the conversation was cut to fit the context
    stream: bool = True  # false: no response before the final one, which carries the whole answer
    slotted: float = 0.0  # when it got its KV-cache slot (0: never)
    stops: StopMatcher | None = None  # the request's stop strings, if it has any


class Scheduler:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, sink: Sink, engine: EngineConfig | None = None,
                 device_id: int = 0, stats: EngineStats | None = None, exporter=None):
        self.runner, self.tok = runner, tokenizer
        engine = engine or EngineConfig()
        self.max_slots, self.max_queue, self.prefill_chunk = runner.max_slots, engine.max_queue, engine.prefill_chunk
        self.stream_interval, self.unhealthy_after = engine.stream_interval, engine.unhealthy_after
        self.stream_interval_s = engine.stream_interval_ms / 1000
        self.prefix_cache = bool(engine.prefix_cache)
        # a runner that keeps state of each row's last token (G4's smear) is exact only when a prompt continues
        # a row's whole content; otherwise any prefix of a row's tokens is its KV at those positions
        self.whole_rows = runner.prev is not None
        self.failed_steps = 0  # runner failures in a row
        self.device_id = device_id
        self.stats = stats or EngineStats()
        self.stats.max_slots = self.max_slots
        self.responses = ResponseThread(sink, self.stats, exporter=exporter)
        self._cv = threading.Condition()
        self._inbox: list[Request] = []
        self._outstanding = 0  # accepted and not finished: bounds slots + queue
        self._stopping = False
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._free = list(range(self.max_slots))
        self._held: list[list[int]] = [[] for _ in range(self.max_slots)]  # tokens whose KV each free slot holds
        self._last_used = [0] * self.max_slots  # when each slot was freed, for least-recently-used choices
        # each slot's request's sampling settings, set when it is placed: a step takes its rows' by slot index
        self._sampling = batch_sampling([SamplingParams(0.0, None, 1)] * self.max_slots)
        self._now = 0.0  # when the last step's tokens came back
        self._clock = 0
        self._thread = threading.Thread(target=self._run, name="nanochat-step", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """False after unhealthy_after runner failures in a row (a broken device, a corrupt engine): the model
        then reports not ready, so traffic goes elsewhere; requests that still come are tried, and the first
        step that succeeds makes it healthy again."""
        return self.failed_steps < self.unhealthy_after

    # --- called from Triton's execute() thread ---

    def submit(self, handle: object, prompt_ids: list[int], params: SamplingParams, dropped_turns: int = 0,
               stream: bool = True, stops: list[str] = ()) -> None:
        """Queue a request; any problem is answered with a final error response, never raised."""
        try:
            seq = Sequence(prompt_ids, self.tok, params, self.runner.max_seq)
        except ValueError as e:
            self.reject(handle, e)
            return
        req = Request(handle, seq, Detokenizer(self.tok), time.monotonic(), dropped_turns=dropped_turns, stream=stream,
                      stops=StopMatcher(stops) if stops else None)
        with self._cv:
            if self._stopping:
                refusal = SHUTTING_DOWN
            elif self._outstanding >= self.max_slots + self.max_queue:
                refusal = (f"{QUEUE_FULL}{self.max_slots} slots busy and {self.max_queue} requests waiting; "
                           "retry later")
            else:
                refusal = None
                self._outstanding += 1
                self.responses.open(req)  # before the step thread can see it, so its final comes after
                self._inbox.append(req)
                self._cv.notify()
        if refusal:
            self.stats.rejected += 1
            self.fail(handle, refusal)

    def reject(self, handle: object, error: ValueError) -> None:
        """End a request the client got wrong (bad input, a prompt longer than the context)."""
        self.fail(handle, INVALID + str(error))

    def fail(self, handle: object, message: str) -> None:
        """End a request that never reached a slot (bad input, refused) with an error."""
        with self._cv:  # the step thread counts its own endings too
            self.stats.finished["error"] += 1
        self.responses.put(None, handle, None, message)

    def close(self, timeout: float = 10.0) -> None:
        """Stop stepping: unfinished requests get a final error; then flush responses and join."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        self.responses.close(timeout)

    # --- the step thread ---

    def _run(self) -> None:
        step_cpu = time.thread_time()
        while True:
            with self._cv:
                while not (self._inbox or self._active or self._waiting or self._stopping):
                    self.stats.cpu["step"] += time.thread_time() - step_cpu
                    self._cv.wait()
                    step_cpu = time.thread_time()
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            if stopping:
                for req in [*self._active, *self._waiting]:
                    self._finish(req, error=f"{SHUTTING_DOWN}; request stopped")
                return
            try:
                self._step()
                if self.failed_steps:  # healthy again (nothing to do on the every-step path)
                    self.failed_steps, self.stats.healthy = 0, 1
            except Exception as e:  # a runner failure ends the requests in flight, not the backend
                self.failed_steps += 1
                self.stats.healthy = int(self.healthy)
                for req in list(self._active):  # their rows may be half written: nothing in them is reused
                    self._finish(req, error=f"inference failed: {type(e).__name__}: {e}", cached=False)
            now = time.thread_time()
            self.stats.cpu["step"] += now - step_cpu
            step_cpu = now

    def _step(self) -> None:
        for req in [r for r in (*self._active, *self._waiting) if r.cancelled]:
            self._finish(req, finish_reason="cancelled")
        admitted = [self._waiting.popleft() for _ in range(min(len(self._free), len(self._waiting)))]
        if self.prefix_cache and len(admitted) > 1:  # those with the most to reuse choose first: a miss must
            admitted.sort(key=self._best_reuse, reverse=True)  # not take a slot that another one continues
        for req in admitted:
            self._place(req)
            req.slotted = time.monotonic()
            self._active.append(req)
        self.stats.active, self.stats.waiting = len(self._active), len(self._waiting)
        decoding = [r for r in self._active if r.prefilled == len(r.seq.prompt)]
        prefilling = [r for r in self._active if r.prefilled < len(r.seq.prompt)]
        if decoding:
            ids = np.array([[r.seq.generated[-1]] for r in decoding], dtype=np.int64)
            self._run_rows(ids, [r.seq.length - 1 for r in decoding], decoding, decoding)
        if prefilling:
            T = min(self.prefill_chunk, *(len(r.seq.prompt) - r.prefilled for r in prefilling))
            rows = prefilling[: max(1, self.prefill_chunk // T)]
            ids = np.array([r.seq.prompt[r.prefilled: r.prefilled + T] for r in rows], dtype=np.int64)
            positions = [r.prefilled for r in rows]
            for req in rows:
                req.prefilled += T
            self.stats.prefilled_tokens += T * len(rows)
            done = [r for r in rows if r.prefilled == len(r.seq.prompt)]
            for req in done:
                self.stats.prompt_tokens += req.prefilled
            self._run_rows(ids, positions, rows, done)

    def _run_rows(self, ids: np.ndarray, positions: list[int], rows: list[Request], taking: list[Request]) -> None:
        """One runner step over `rows`; each request in `taking` (rows whose prompt is all read) takes its token:
        the runner's draw, or for a seeded request nanochat's draw on the host from the logits that come back."""
        slots = np.array([r.slot for r in rows], dtype=np.int64)
        sampling = self._sampling.rows(slots)
        if len(taking) < len(rows):
            sampling.exact &= np.isin(slots, [r.slot for r in taking])  # only rows that take a token need logits
        t0 = time.thread_time()
        drawn = self.runner.step(ids, np.array(positions, dtype=np.int64), slots, sampling)
        self.stats.cpu["model_call"] += time.thread_time() - t0
        self._now = time.monotonic()
        tokens = drawn.tokens.tolist()
        exact = [r for r in taking if r.seq.rng is not None]
        seeded = dict(zip(exact, sample_rows(drawn.exact_logits, [r.seq.sampler for r in exact]), strict=True)
                      ) if exact else {}
        at = {r.slot: i for i, r in enumerate(rows)} if len(taking) < len(rows) else None
        for i, req in enumerate(taking):
            token = seeded[req] if req in seeded else tokens[i if at is None else at[req.slot]]
            self._take(req, ValueError("the model's logits are not finite") if token == NOT_FINITE else token)

    def _place(self, req: Request) -> None:
        """Give a request the free slot whose cached tokens share the longest beginning with its prompt and start
        its prefill where they part: the KV at a position depends only on the tokens up to it. A slot counts
        only if the prompt shares at least half of what it holds, so a few common tokens (the chat template's
        start) never take another conversation's cache; otherwise the least recently used slot is taken (and
        whatever it shares is reused). At least the prompt's last token is prefilled, for its logits."""
        prompt = req.seq.prompt
        by_age = sorted(self._free, key=lambda s: (self._last_used[s], s))
        best, reuse = by_age[0], 0
        if self.prefix_cache:
            reuse = self._reusable(self._held[best], prompt)
            for slot in by_age[1:]:
                n = self._reusable(self._held[slot], prompt)
                if n > reuse and 2 * n >= len(self._held[slot]):
                    best, reuse = slot, n
        self._free.remove(best)
        self._held[best] = []
        req.slot, req.prefilled = best, reuse
        params, table = req.seq.params, self._sampling
        table.temperature[best], table.top_k[best] = params.temperature, params.top_k or 0
        table.top_p[best], table.exact[best] = params.top_p, params.exact
        if reuse:
            self.stats.prefix_hits += 1
            self.stats.reused_tokens += reuse

    def _best_reuse(self, req: Request) -> int:
        return max(self._reusable(self._held[slot], req.seq.prompt) for slot in self._free)

    def _reusable(self, held: list[int], prompt: list[int]) -> int:
        """How many of `held`'s tokens a prompt can start after: their common beginning, short of the prompt's last
        token (whole rows: all of `held` or nothing)."""
        n = 0
        for a, b in zip(held, prompt[: len(prompt) - 1], strict=False):  # zip stops at the shorter
            if a != b:
                break
            n += 1
        return 0 if self.whole_rows and n < len(held) else n

    def _take(self, req: Request, sampled: int | Exception) -> None:
        """A row's draw into its request. Whatever fails here (the draw, the calculator, detokenizing, the
        request's rules) is that request's failure alone: it ends with an error, the batch goes on."""
        try:
            if isinstance(sampled, Exception):
                raise sampled
            self._emit(req, sampled)
        except Exception as e:
            if req in self._active:  # not ended by _emit before it failed
                self._finish(req, error=f"generation failed: {type(e).__name__}: {e}")

    def _emit(self, req: Request, sampled: int) -> None:
        """Take a row's token and hand its piece of text to the ResponseThread when one is due."""
        seq = req.seq
        token, _ = seq.next_token(sampled)
        now = self._now
        if req.emitted == 0:
            self.stats.ttft.append(now - req.arrived)
        else:
            self.stats.itl.append(now - req.last_token_at)
        req.last_token_at = now
        self.stats.tokens += 1
        finish = seq.finish_reason
        if finish == "stop":  # a stop token ends the stream and is not part of the text
            text = req.detok.flush()
        else:
            req.emitted += 1
            req.unsent_ids.append(token)
            text = req.detok.push(token) + (req.detok.flush() if finish else "")
        if req.stops is not None:
            text, stopped = req.stops.feed(text)
            finish = "stop" if stopped else finish
            text += req.stops.flush() if finish and not stopped else ""
        if finish:
            self._finish(req, finish_reason=finish, text=text)
            return
        req.unsent_text += text
        if req.stream and (req.emitted == 1 or (len(req.unsent_ids) >= self.stream_interval and now >= req.send_at)):
            self.responses.put(req, req.handle, self._output(req, req.unsent_text, req.unsent_ids, ""), None)
            req.unsent_text, req.unsent_ids = "", []
            req.send_at = now + self.stream_interval_s

    def _output(self, req: Request, text: str, ids: list[int], finish_reason: str) -> Output:
        return Output(text, ids, finish_reason, len(req.seq.prompt), req.emitted, self.device_id, req.dropped_turns)

    def _finish(self, req: Request, finish_reason: str = "", text: str = "", error: str | None = None,
                cached: bool = True) -> None:
        """The request's one final output, with any tokens not yet sent; its slot is free for the next step,
        holding the KV of the tokens that went through the model (the last sampled token never did)."""
        if req.slot >= 0:
            self._active.remove(req)
            seq = req.seq
            if cached and self.prefix_cache:
                whole = req.prefilled == len(seq.prompt)
                self._held[req.slot] = seq.prompt[: req.prefilled] + (seq.generated[:-1] if whole else [])
            self._clock += 1
            self._last_used[req.slot] = self._clock
            self._free.append(req.slot)
            req.slot = -1
        else:
            self._waiting.remove(req)
        out = None if error else self._output(req, req.unsent_text + text, req.unsent_ids, finish_reason)
        self.responses.put(req, req.handle, out, error, final=True)
        now = time.monotonic()
        queued = (req.slotted or now) - req.arrived
        self.stats.requests.append((now - req.arrived, queued, len(req.seq.prompt), req.emitted))
        self.stats.active, self.stats.waiting = len(self._active), len(self._waiting)
        with self._cv:  # counted as ended last: the exporter's order (backend/metrics.py)
            self.stats.finished["error" if error else finish_reason] += 1
            self._outstanding -= 1
