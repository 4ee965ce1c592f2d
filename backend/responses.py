"""
The response thread: turns the step thread's tokens into responses, so the step loop keeps only nanochat's token
rules (vLLM keeps detokenizing out of its engine core for the same reason) and, on a GPU, this runs while the device
does. Per request it owns the text (detokenizing, stop strings, streaming) and the cancellation checks, flagging
requests for the step thread to let go.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from backend.metrics import EngineStats
from backend.protocol import OUTPUT, WIRE_FORMAT, wire_type


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str  # "" until the last response
    prompt_tokens: int
    completion_tokens: int
    device_id: int
    dropped_turns: int = 0  # the conversation's oldest turns left out to fit the context


def _array(name: str, values: Callable[[Output], list]) -> Callable[[Output], np.ndarray]:
    """An output's array builder, typed as backend/protocol.py declares the output (BYTES: Python bytes objects)."""
    wire = wire_type(OUTPUT[name].triton_type)
    dtype = np.dtype(np.object_) if wire == "BYTES" else np.dtype(WIRE_FORMAT[wire])
    return lambda o: np.array(values(o), dtype=dtype)


# Each output's array from the Output of one response, keyed by the protocol's output names.
OUTPUT_ARRAYS = {name: _array(name, values) for name, values in {
    "text": lambda o: [o.text.encode()],
    "text_output": lambda o: [o.text.encode()],
    "token_ids": lambda o: o.token_ids,
    "device_id": lambda o: [o.device_id],
    "finish_reason": lambda o: [o.finish_reason.encode()],
    "num_input_tokens": lambda o: [o.prompt_tokens],
    "num_output_tokens": lambda o: [len(o.token_ids)],
    "prompt_tokens": lambda o: [o.prompt_tokens],
    "completion_tokens": lambda o: [o.completion_tokens],
    "dropped_turns": lambda o: [o.dropped_turns],
}.items()}
assert OUTPUT_ARRAYS.keys() == OUTPUT.keys(), "an output of backend/protocol.py has no builder here"


class Sink(Protocol):
    """The Triton-specific part (backend/model.py; tests use a fake): each send is a blocking IPC call."""

    def send(self, handle: object, out: Output | None, error: str | None, final: bool) -> None:
        """Deliver one response (or an error, always final) to the request behind `handle`."""
        ...

    def is_cancelled(self, handle: object) -> bool: ...


_CLOSE = object()
# How often the clients of requests in flight are asked whether they cancelled, and the metrics exported: each ask
# is an IPC round trip into the server (about 100 µs), so at 256 streams a 50 ms sweep alone took a tenth of a core;
# a cancelled request is noticed within this, and its slot freed at the next step.
POLL_S = 0.25


class ResponseThread:
    def __init__(self, sink: Sink, stats: EngineStats, stream_interval: int = 1, stream_interval_ms: int = 0,
                 max_responses_per_s: int = 0, device_id: int = 0, poll_interval: float = POLL_S, exporter=None):
        self.sink, self.stats, self.poll_interval = sink, stats, poll_interval
        self.stream_interval, self.stream_interval_s = stream_interval, stream_interval_ms / 1000
        self.response_s = 1 / max_responses_per_s if max_responses_per_s else 0.0  # each running row's share
        self.device_id = device_id
        self.exporter = exporter  # object with export(stats), e.g. backend.metrics.TritonMetrics
        self.flagged: collections.deque = collections.deque()  # requests cancelled or ended here: the step thread
        self._q: queue.SimpleQueue = queue.SimpleQueue()      # frees their slots (appended here, popped there)
        self._lock = threading.Lock()
        self._closed = False
        self._open: set = set()  # requests accepted and not yet final: swept for cancellation
        self._thread = threading.Thread(target=self._run, name="nanochat-responses", daemon=True)
        self._thread.start()

    # --- called from other threads ---

    def open(self, req) -> None:
        self._open.add(req)

    def tokens(self, now: float, events: list) -> None:
        """One step's tokens: (request, token, finish) with finish "" or the step thread's stop|length."""
        self._put((self._tokens, now, events))

    def preface(self, req, text: str, ids: list[int]) -> None:
        """Text the answer starts with that the model did not sample (a forced search's call and result)."""
        self._put((self._preface, req, text, ids))

    def end(self, req, finish_reason: str = "", error: str | None = None) -> None:
        """The step thread freed the request's slot (or dropped it from the queue) without a token: its final."""
        self._put((self._end, req, finish_reason, error))

    def refuse(self, handle: object, error: str) -> None:
        """A request that was never accepted: one final error."""
        self._put((self._refuse, handle, error))

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            self._q.put(_CLOSE)  # the last item: everything queued before it is still handled
        self._thread.join(timeout)

    def _put(self, item: tuple) -> None:
        with self._lock:
            if not self._closed:
                self._q.put(item)
                return
        item[0](*item[1:])  # after close() nobody drains the queue: handled on the caller's thread

    # --- this thread ---

    def _run(self) -> None:
        self._export()  # at once: a scrape right after the model loads sees its gauges (healthy 1), not defaults
        next_poll = time.monotonic() + self.poll_interval
        closing = False
        while not closing:
            cpu = time.thread_time()
            try:
                items = [self._q.get(timeout=self.poll_interval)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            if items and items[-1] is _CLOSE:
                closing = True
                items.pop()
            for handler, *args in items:
                handler(*args)
            if closing or time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_interval
                for req in list(self._open):
                    if not req.cancelled and self._cancelled(req.handle):
                        self._flag_cancelled(req)
                self._export()
            self.stats.cpu["send"] += time.thread_time() - cpu

    def _tokens(self, now: float, events: list) -> None:
        stats = self.stats
        for req, token, finish in events:
            if req.final_sent:
                if finish:
                    self._count(req, req.ended)  # ended here by a stop string; the step thread has now let it go
                continue
            if req.last_token_at:
                stats.itl.append(now - req.last_token_at)
            else:
                stats.ttft.append(now - req.arrived)
            req.last_token_at = now
            try:
                if finish == "stop":  # a stop token ends the stream and is not part of the text
                    text = req.detok.flush()
                else:
                    req.emitted += 1
                    req.unsent_ids.append(token)
                    text = req.detok.push(token) + (req.detok.flush() if finish else "")
                # with min_tokens, stop strings are matched from the token after it, so that many stay whole
                if req.stops is not None and req.emitted > req.seq.params.min_tokens:
                    text, stopped = req.stops.feed(text)
                    # the final goes out now and the step thread, which still runs it, is flagged to let it go
                    # (as vLLM's output processor aborts a request in the engine); counted when let go
                    if stopped and not finish:
                        req.unsent_text += text
                        self._final(req, "stop", None, count=False)
                        continue
                    text += "" if stopped or not finish else req.stops.flush()
                    finish = "stop" if stopped else finish
            except Exception as e:  # this request's text failed (a token the tokenizer lacks): it alone ends
                self._final(req, "", f"generation failed: {type(e).__name__}: {e}", count=not finish)
                continue
            req.unsent_text += text
            if finish:
                self._final(req, finish, None)
            # the first token at once, then every stream_interval tokens and stream_interval_ms, or longer when
            # more rows run than max_responses_per_s allows (those between travel together)
            elif req.stream and (req.emitted == 1 or (len(req.unsent_ids) >= self.stream_interval
                                                      and now >= req.send_at)):
                out = self._output(req, "")
                req.unsent_text, req.unsent_ids = "", []
                req.send_at = now + max(self.stream_interval_s, self.stats.active * self.response_s)
                self._send(req, out, None, False)

    def _preface(self, req, text: str, ids: list[int]) -> None:
        if req.final_sent:
            return
        req.unsent_text += text
        req.unsent_ids += ids
        if req.stream:  # at once: the client sees the search while the prompt is prefilled
            out = self._output(req, "")
            req.unsent_text, req.unsent_ids = "", []
            self._send(req, out, None, False)

    def _end(self, req, finish_reason: str, error: str | None) -> None:
        if req.final_sent:
            self._count(req, req.ended)
        else:
            self._final(req, finish_reason, error)

    def _refuse(self, handle: object, error: str) -> None:
        self.stats.finished["error"] += 1
        self._deliver(handle, None, error, True)

    def _final(self, req, finish_reason: str, error: str | None, count: bool = True) -> None:
        """The request's one final response, with whatever it has not sent; count=False: the step thread still
        runs it, so it is flagged, and counted as ended once the step thread lets it go."""
        req.final_sent = True
        req.ended = "error" if error else finish_reason
        self._open.discard(req)
        now = time.monotonic()
        self.stats.requests.append((now - req.arrived, (req.slotted or now) - req.arrived, len(req.seq.prompt),
                                    req.emitted))
        self._send(req, None if error else self._output(req, finish_reason), error, True)
        if count:
            self._count(req, req.ended)
        else:
            self.flagged.append(req)

    def _count(self, req, reason: str) -> None:
        if not req.counted:
            req.counted = True
            self.stats.finished[reason] += 1

    def _output(self, req, finish_reason: str) -> Output:
        return Output(req.unsent_text, req.unsent_ids, finish_reason, len(req.seq.prompt), req.emitted,
                      self.device_id, req.dropped_turns)

    def _send(self, req, out: Output | None, error: str | None, final: bool) -> None:
        if req.cancelled and not final:
            return  # its client is gone (a send failed) or cancelled: only the final response is still due
        delivered = self._deliver(req.handle, out, error, final)
        if not final and not delivered:
            self._flag_cancelled(req)

    def _deliver(self, handle: object, out: Output | None, error: str | None, final: bool) -> bool:
        try:
            self.sink.send(handle, out, error, final)
            return True
        except Exception as e:  # the client is gone or the server refused; nothing left to tell it
            self.stats.send_errors += 1
            self.stats.last_send_error = f"{type(e).__name__}: {e}"
            return False

    def _flag_cancelled(self, req) -> None:
        req.cancelled = True
        self.flagged.append(req)

    def _cancelled(self, handle) -> bool:
        try:
            return self.sink.is_cancelled(handle)
        except Exception:
            return True

    def _export(self) -> None:
        if self.exporter is None:
            return
        try:
            self.exporter.export(self.stats)
        except Exception as e:  # metrics must never stop responses
            self.stats.export_errors += 1
            self.stats.last_export_error = f"{type(e).__name__}: {e}"
