"""
Continuous batching over one Runner: the engine behind each Triton model instance. One step thread owns the runner
and its KV cache; requests join only at step boundaries, every decoding row advances in one batched call, and
prompts prefill by chunks, so a long prompt costs the others one chunk per step, not its whole length; so does a
tool result mid-answer. The step thread never blocks on clients: its tokens go to the response thread
(backend/responses.py) as one batch.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from backend import web_search
from backend.metrics import EngineStats
from backend.model_config import EngineConfig
from backend.protocol import INVALID, QUEUE_FULL, SHUTTING_DOWN
from backend.responses import POLL_S, ResponseThread, Sink
from backend.slots import Slots
from backend.stops import StopMatcher
from backend.tool_runs import Run, ToolRuns
from core.device_sampling import NOT_FINITE
from core.generation import Runner, SamplingParams, Sequence, batch_sampling
from core.sampling import sample_rows
from core.tokenizer import Detokenizer, Tokenizer
from core.tool_calls import ToolCall, ToolRegistry, forced_text


@dataclass(eq=False)
class Request:
    handle: object  # what the Sink sends to (Triton: the request's response sender)
    seq: Sequence
    detok: Detokenizer
    arrived: float
    dropped_turns: int = 0  # reported in the outputs: the conversation was cut to fit the context
    stream: bool = True  # false: no response before the final one, which carries the whole answer
    stops: StopMatcher | None = None  # the request's stop strings, if it has any
    force: ToolCall | None = None  # a call the answer starts with (a forced search), run before it queues
    run: Run | None = None  # the tool call it waits for
    # the step thread's
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    # answer tokens to put through the model before the row draws again (a tool result taken whole), from position
    # feed_at: [the last token drawn, the result's tokens but the last]
    feed: list[int] = field(default_factory=list)
    feed_at: int = 0
    slotted: float = 0.0  # when it got its KV-cache slot (0: never)
    done: bool = False  # its slot (or place in the queue) is given up
    # the response thread's (backend/responses.py); cancelled and ended are read by the step thread once flagged
    emitted: int = 0  # tokens streamed so far (stop tokens are not streamed)
    last_token_at: float = 0.0
    unsent_text: str = ""  # streamed tokens held back until a response is due
    unsent_ids: list[int] = field(default_factory=list)
    send_at: float = 0.0  # monotonic time before which no further response goes out
    cancelled: bool = False  # the client cancelled or is gone
    final_sent: bool = False
    ended: str = ""  # the finish reason of its final response (error for an error)
    counted: bool = False  # its ending is in EngineStats.finished


class Scheduler:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, sink: Sink, engine: EngineConfig | None = None,
                 device_id: int = 0, stats: EngineStats | None = None, exporter=None,
                 tools: ToolRegistry | None = None, log: Callable[..., None] = lambda event, **fields: None):
        """tools: the registry channel's tools (the model calls them as samosaChaat's models do); None: nanochat's
        calculator channel. log(event, **fields): the backend's JSON log line."""
        self.runner, self.tok = runner, tokenizer
        engine = engine or EngineConfig()
        self.max_slots, self.max_queue, self.prefill_chunk = runner.max_slots, engine.max_queue, engine.prefill_chunk
        self.unhealthy_after = engine.unhealthy_after
        self.prefix_cache = bool(engine.prefix_cache)
        self.slots = Slots(self.max_slots, self.prefix_cache)
        self.failed_steps = 0  # runner failures in a row
        self.device_id = device_id
        self.stats = stats or EngineStats()
        self.stats.max_slots = self.max_slots
        self.responses = ResponseThread(sink, self.stats, engine.stream_interval, engine.stream_interval_ms,
                                        engine.max_responses_per_s, device_id, exporter=exporter)
        self._cv = threading.Condition()
        self._inbox: list[Request] = []
        self._outstanding = 0  # accepted and not finished: bounds slots + queue
        self._stopping = False
        self._waiting: collections.deque[Request] = collections.deque()
        self._tool_done = False  # a tool call finished since the step thread last looked (under _cv)
        self._decoding: list[Request] = []  # rows whose prompt is all in the cache (kept, not rebuilt each step)
        self._prefilling: list[Request] = []  # rows still reading their prompt, oldest first
        self._calling: list[Request] = []  # waiting for a tool call: rows mid-answer, and forced searches
        self._feeding: list[Request] = []  # rows mid-answer putting a tool result through the model, oldest first
        self.log = log
        self.tools = None if tools is None else ToolRuns(tools, engine.tool_timeout_ms / 1000, self._wake)
        # each slot's request's sampling settings, set when it is placed: a step takes its rows' by slot index
        self._sampling = batch_sampling([SamplingParams(0.0, None, 1)] * self.max_slots, tokenizer)
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
               stream: bool = True, stops: list[str] = (), force: ToolCall | None = None) -> None:
        """Queue a request; any problem is answered with a final error response, never raised. `force`: a call
        the answer starts with (with the registry channel; its call and result are streamed first)."""
        try:
            seq = Sequence(prompt_ids, self.tok, params, self.runner.max_seq, registry_tools=self.tools is not None)
        except ValueError as e:
            self.reject(handle, e)
            return
        req = Request(handle, seq, Detokenizer(self.tok), time.monotonic(), dropped_turns=dropped_turns, stream=stream,
                      stops=StopMatcher(stops) if stops else None, force=force if self.tools is not None else None)
        with self._cv:
            if self._stopping:
                refusal = SHUTTING_DOWN
            elif self._outstanding >= self.max_slots + self.max_queue:  # a bounded queue: refused at once
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

    @property
    def cannot_force_why(self) -> str:
        """Why a forced search would be skipped here ("" when it would run)."""
        if self.tools is None:
            return "the model's tool channel is nanochat's calculator (export with TOOL_CHANNEL=registry)"
        return "" if self.tools.searches else web_search.NO_BACKEND

    def reject(self, handle: object, error: ValueError) -> None:
        """End a request the client got wrong (bad input, a prompt longer than the context)."""
        self.fail(handle, INVALID + str(error))

    def fail(self, handle: object, message: str) -> None:
        """End a request that never reached a slot (bad input, refused) with an error."""
        self.responses.refuse(handle, message)

    def close(self, timeout: float = 10.0) -> None:
        """Stop stepping: unfinished requests get a final error; then flush responses and join."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        if self.tools is not None:
            self.tools.close()
        self.responses.close(timeout)

    def _wake(self) -> None:
        """A tool call finished: the step thread looks at once."""
        with self._cv:
            self._tool_done = True
            self._cv.notify()

    # --- the step thread ---

    def _run(self) -> None:
        step_cpu = time.thread_time()
        while True:
            with self._cv:
                while not (self._inbox or self._decoding or self._prefilling or self._feeding or self._waiting
                           or self._stopping or self._tool_done):
                    self.stats.cpu["step"] += time.thread_time() - step_cpu
                    # rows waiting on a tool only: sleep until one is done (_wake), the first deadline, or the
                    # response thread's poll (a cancelled row is flagged there)
                    self._cv.wait(max(0.0, min(POLL_S, *(r.run.deadline - time.monotonic() for r in self._calling)))
                                  if self._calling else None)
                    step_cpu = time.thread_time()
                    if self._calling:
                        break
                self._tool_done = False
                inbox, self._inbox = self._inbox, []
                stopping = self._stopping
            for req in inbox:
                if req.force is not None:
                    req.run = self.tools.start(req.force)
                    self._calling.append(req)
                else:
                    self._waiting.append(req)
            if stopping:
                for req in [*self._decoding, *self._prefilling, *self._feeding, *self._waiting, *self._calling]:
                    self._finish(req, error=f"{SHUTTING_DOWN}; request stopped")
                return
            try:
                self._step()
                if self.failed_steps:  # healthy again (nothing to do on the every-step path)
                    self.failed_steps, self.stats.healthy = 0, 1
            except Exception as e:  # a runner failure ends the requests in flight, not the backend
                self.failed_steps += 1
                self.stats.healthy = int(self.healthy)
                for req in [*self._decoding, *self._prefilling, *self._feeding]:  # rows may be half written: nothing
                    # in them is reused
                    self._finish(req, error=f"inference failed: {type(e).__name__}: {e}", cached=False)
            now = time.thread_time()
            self.stats.cpu["step"] += now - step_cpu
            step_cpu = now

    def _step(self) -> None:
        """Let go of flagged rows, take tool results, give free slots to waiting requests (oldest first), decode
        every row with a token to feed in one call, then prefill one chunk, then feed one chunk of a tool result.
        Finished rows free their slot here."""
        flagged = self.responses.flagged  # cancelled, or ended by the response thread (a stop string)
        while flagged:
            req = flagged.popleft()
            if not req.done:
                self._finish(req, finish_reason="cancelled" if req.cancelled else req.ended)
        if self._calling:
            self._take_tool_results()
        admitted = [self._waiting.popleft() for _ in range(min(self.slots.free, len(self._waiting)))]
        if self.prefix_cache and len(admitted) > 1:
            # those with the most to reuse choose first: a miss must not take a slot that another one continues
            admitted.sort(key=lambda r: self.slots.best_reuse(r.seq.prompt), reverse=True)
        for req in admitted:
            self._place(req)
            req.slotted = time.monotonic()
            self._prefilling.append(req)
        self.stats.active, self.stats.waiting = self._active(), len(self._waiting)
        if self._decoding:
            rows = list(self._decoding)  # rows that finish leave the list during the step
            ids = np.array([r.seq.generated[-1] for r in rows], dtype=np.int64)[:, None]  # flat: 3x cheaper
            self._run_rows(ids, [r.seq.length - 1 for r in rows], rows, rows)
        if self._prefilling:
            rows, T = self._prefill_rows()
            ids = np.array([r.seq.prompt[r.prefilled: r.prefilled + T] for r in rows], dtype=np.int64)
            positions = [r.prefilled for r in rows]
            for req in rows:
                req.prefilled += T
            self.stats.prefilled_tokens += T * len(rows)
            done = [r for r in rows if r.prefilled == len(r.seq.prompt)]
            for req in done:
                self.stats.prompt_tokens += req.prefilled
                self._prefilling.remove(req)
                self._decoding.append(req)
            self._run_rows(ids, positions, rows, done)
        if self._feeding:
            req = self._feeding[0]
            chunk, req.feed = req.feed[: self.prefill_chunk], req.feed[self.prefill_chunk:]
            self._run_rows(np.array([chunk], dtype=np.int64), [req.feed_at], [req], [])  # no draw: forced tokens
            req.feed_at += len(chunk)
            if not req.feed:  # the result is in the cache: the row draws again, from the result's last token
                self._feeding.pop(0)
                self._decoding.append(req)

    def _prefill_rows(self) -> tuple[list[Request], int]:
        """The oldest rows still reading their prompt that advance T tokens together, T x rows <= prefill_chunk,
        T the shortest remaining part among them (at least one row, of at most prefill_chunk tokens)."""
        chunk = self.prefill_chunk
        T = chunk
        for i, req in enumerate(self._prefilling):
            t = min(T, len(req.seq.prompt) - req.prefilled)
            if i and t * (i + 1) > chunk:
                return self._prefilling[:i], T
            T = t
        return list(self._prefilling), T

    def _run_rows(self, ids: np.ndarray, positions: list[int], rows: list[Request], taking: list[Request]) -> None:
        """One runner step over `rows`; each request in `taking` (rows whose prompt is all read) takes its token:
        the runner's draw, or for a seeded request nanochat's draw on the host from the logits that come back, so
        its tokens never depend on the rest of the batch."""
        slots = np.array([r.slot for r in rows], dtype=np.int64)
        sampling = self._sampling.rows(slots)
        if len(taking) < len(rows):
            sampling.exact &= np.isin(slots, [r.slot for r in taking])  # only rows that take a token need logits
        t0, cpu0 = time.monotonic(), time.thread_time()
        drawn = self.runner.step(ids, np.array(positions, dtype=np.int64), slots, sampling)
        self.stats.cpu["model_call"] += time.thread_time() - cpu0
        now = time.monotonic()
        self.stats.runner_seconds += now - t0
        tokens = drawn.tokens.tolist()
        if len(taking) < len(rows):
            at = {r.slot: i for i, r in enumerate(rows)}
            tokens = [tokens[at[r.slot]] for r in taking]
        exact = [i for i, r in enumerate(taking) if r.seq.rng is not None]
        if exact:
            for i, token in zip(exact, sample_rows(drawn.exact_logits, [taking[i].seq.sampler for i in exact]),
                                strict=True):
                tokens[i] = token
        events = []
        for req, sampled in zip(taking, tokens, strict=True):
            # nanochat's rules for the row (forced tool tokens, stop tokens, limits); a failure ends it alone
            try:
                if isinstance(sampled, Exception):
                    raise sampled
                if sampled == NOT_FINITE:
                    raise ValueError("the model's logits are not finite")
                token, _ = req.seq.next_token(sampled)
            except Exception as e:
                self._finish(req, error=f"generation failed: {type(e).__name__}: {e}")
                continue
            finish = req.seq.finish_reason or ""
            if req.seq.hold_until:  # rarely set: no call per row otherwise
                self._release_hold(req)
            events.append((req, token, finish))
            if finish:
                self._finish(req, finish_reason=finish, by_token=True)
            elif req.seq.pending_call is not None:  # it sits out the steps until the call's result is in
                req.run = self.tools.start(req.seq.pending_call)
                self._decoding.remove(req)
                self._calling.append(req)
        self.stats.tokens += len(events)
        self.responses.tokens(now, events)

    def _take_tool_results(self) -> None:
        """Rows whose call is done (or past its deadline) go on: mid-answer with the result forced next, a forced
        search into the queue for a slot with its call and result after the prompt, streamed first."""
        now = time.monotonic()
        for req in list(self._calling):
            result = self.tools.result(req.run, now)
            if result is None:
                continue
            self._calling.remove(req)
            req.run = None
            if req.slot >= 0:
                req.seq.give_result(result)
                self._take_forced(req)
                continue
            text = forced_text(req.force, result)
            ids = self.tok.encode(text)
            if req.seq.preface(ids):
                self.responses.preface(req, text, ids)
            else:  # answered without it: the prompt and the search together leave no room for an answer
                self.log("force_tool_skipped", tool=req.force.tool, tokens=len(ids), prompt_tokens=len(req.seq.prompt),
                         max_seq=self.runner.max_seq)
            self._waiting.append(req)

    def _release_hold(self, req: Request) -> None:
        if req.seq.hold_until and not req.seq.holds_stop:  # min_tokens reached: it may stop from now on
            req.seq.hold_until = 0
            self._sampling.hold[req.slot] = False

    def _take_forced(self, req: Request) -> None:
        """A mid-answer row with a tool result to force. Drawn with the batch (no seed), it takes the result whole:
        streamed now and put through the model a prefill chunk a step (a 4 KB search result is about a thousand
        tokens, which a token a step would spend a thousand steps on). A seeded row takes it a token a step, as
        nanochat does: its generator draws at every step, forced or not, and its answer must stay nanochat's."""
        seq = req.seq
        if seq.rng is not None or len(seq.forced) < 2:
            self._decoding.append(req)
            return
        feed_at = seq.length - 1  # the last token drawn has not been through the model yet
        events = []
        while seq.forced and not seq.finished:
            token, _ = seq.next_token(-1)  # the forced token replaces the draw
            events.append((req, token, seq.finish_reason or ""))
        self._release_hold(req)
        self.stats.tokens += len(events)
        self.responses.tokens(time.monotonic(), events)
        if seq.finished:  # the result reached max_tokens or the context: the answer ends with it
            self._decoding.append(req)
            self._finish(req, finish_reason=seq.finish_reason, by_token=True)
            return
        req.feed, req.feed_at = seq.generated[feed_at - len(seq.prompt): -1], feed_at
        self._feeding.append(req)

    def _active(self) -> int:
        waiting_mid_answer = sum(r.slot >= 0 for r in self._calling)
        return len(self._decoding) + len(self._prefilling) + len(self._feeding) + waiting_mid_answer

    def _place(self, req: Request) -> None:
        """Give a request a slot (backend/slots.py) and start its prefill after what the slot already holds; at least
        the prompt's last token is prefilled, for its logits."""
        best, reuse = self.slots.take(req.seq.prompt)
        req.slot, req.prefilled = best, reuse
        if reuse and self.runner.prev is not None:  # G4: the row goes on after the prompt's token reuse - 1
            self.runner.prev.continue_after(best, req.seq.prompt[reuse - 1])
        params, table = req.seq.params, self._sampling
        table.temperature[best], table.top_k[best] = params.temperature, params.top_k or 0
        table.top_p[best], table.exact[best] = params.top_p, params.exact
        table.hold[best] = req.seq.holds_stop
        if reuse:
            self.stats.prefix_hits += 1
            self.stats.reused_tokens += reuse

    def _finish(self, req: Request, finish_reason: str = "", error: str | None = None, cached: bool = True,
                by_token: bool = False) -> None:
        """Let a request go: its slot is free for the next step, holding the KV of the tokens that went through the
        model (the last sampled token never did). Its one final response (stop, length, cancelled or an error) is the
        response thread's: with its last token (by_token), or from the reason or error given here."""
        if req.run is not None:  # waiting for a tool call: mid-answer, or a forced search before its queue
            self._calling.remove(req)
            req.run = None
        elif req in self._feeding:
            self._feeding.remove(req)
        elif req.slot >= 0:
            (self._decoding if req.prefilled == len(req.seq.prompt) else self._prefilling).remove(req)
        else:
            self._waiting.remove(req)
        if req.slot >= 0:
            seq = req.seq
            held = []
            if cached and self.prefix_cache:
                whole = req.prefilled == len(seq.prompt)
                in_cache = req.feed_at - len(seq.prompt) if req.feed else len(seq.generated) - 1
                held = seq.prompt[: req.prefilled] + (seq.generated[:in_cache] if whole else [])
            self.slots.give_back(req.slot, held)
            req.slot = -1
        req.done = True
        self.stats.active, self.stats.waiting = self._active(), len(self._waiting)
        with self._cv:
            self._outstanding -= 1
        if not by_token:
            self.responses.end(req, finish_reason, error)
