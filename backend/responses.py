"""
The response thread: sends the scheduler's outputs so the step loop never waits on a client.

Triton's response_sender.send() is a blocking IPC call into the server process (vLLM's backend moved
it to its own thread for the same reason). The step thread only appends to a queue; this thread:
  - drains everything queued and merges consecutive pieces of one request into one response, so a
    slow send costs fewer sends instead of a growing backlog (text and token_ids concatenate; the
    last piece's finish_reason, counts and FINAL flag win);
  - after each send, and every poll interval for requests still waiting for a slot, asks the Sink
    whether the client cancelled, and sets Request.cancelled for the step thread to act on;
  - pushes the EngineStats to the metrics exporter every poll interval.

`Sink` is the Triton-specific part (backend/model.py); tests use a fake one.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from backend.metrics import EngineStats
from backend.protocol import OUTPUT


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str  # "" until the last response
    prompt_tokens: int
    completion_tokens: int
    device_id: int
    dropped_turns: int = 0  # the conversation's oldest turns left out to fit the context


# Each output's array from the Output of one response, keyed by the protocol's output names.
OUTPUT_ARRAYS = {
    "text": lambda o: np.array([o.text.encode()], dtype=np.object_),
    "text_output": lambda o: np.array([o.text.encode()], dtype=np.object_),
    "token_ids": lambda o: np.array(o.token_ids, dtype=np.int64),
    "device_id": lambda o: np.array([o.device_id], dtype=np.int32),
    "finish_reason": lambda o: np.array([o.finish_reason.encode()], dtype=np.object_),
    "num_input_tokens": lambda o: np.array([o.prompt_tokens], dtype=np.uint32),
    "num_output_tokens": lambda o: np.array([len(o.token_ids)], dtype=np.uint32),
    "prompt_tokens": lambda o: np.array([o.prompt_tokens], dtype=np.int32),
    "completion_tokens": lambda o: np.array([o.completion_tokens], dtype=np.int32),
    "dropped_turns": lambda o: np.array([o.dropped_turns], dtype=np.int32),
}
assert OUTPUT_ARRAYS.keys() == OUTPUT.keys(), "an output of backend/protocol.py has no builder here"


class Sink(Protocol):
    def send(self, handle: object, out: Output | None, error: str | None, final: bool) -> None:
        """Deliver one response (or an error, always final) to the request behind `handle`."""
        ...

    def is_cancelled(self, handle: object) -> bool: ...


_CLOSE = object()


class ResponseThread:
    def __init__(self, sink: Sink, stats: EngineStats, poll_interval: float = 0.05, exporter=None):
        self.sink, self.stats, self.poll_interval = sink, stats, poll_interval
        self.exporter = exporter  # object with export(stats), e.g. backend.metrics.TritonMetrics
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._open: set = set()  # requests accepted and not yet final: swept for cancellation
        self._thread = threading.Thread(target=self._run, name="nanochat-responses", daemon=True)
        self._thread.start()

    def open(self, req) -> None:
        self._open.add(req)

    def put(self, req, handle: object, out: Output | None, error: str | None, final: bool = False) -> None:
        """Queue a response. `req` is None for requests refused before they were accepted."""
        item = (req, handle, out, error, final or error is not None)
        with self._lock:
            if not self._closed:
                self._q.put(item)
                return
        self._send(*item)  # after close() nobody drains the queue: answer on the caller's thread

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            self._q.put(_CLOSE)  # the last item: everything queued before it is still sent
        self._thread.join(timeout)

    def _run(self) -> None:
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
            for req, handle, out, error, final in _coalesce(items):
                self._send(req, handle, out, error, final)
            if closing or time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_interval
                for req in list(self._open):
                    if not req.cancelled and self._cancelled(req.handle):
                        req.cancelled = True
                self._export()
            self.stats.cpu["send"] += time.thread_time() - cpu

    def _export(self) -> None:
        if self.exporter is None:
            return
        try:
            self.exporter.export(self.stats)
        except Exception as e:  # metrics must never stop responses
            self.stats.export_errors += 1
            self.stats.last_export_error = f"{type(e).__name__}: {e}"

    def _send(self, req, handle, out, error, final) -> None:
        if req is not None and req.cancelled and not final:
            return  # its client is gone (a send failed) or cancelled: only the final response is still due
        try:
            self.sink.send(handle, out, error, final)
        except Exception as e:  # the client is gone or the server refused; nothing left to tell it
            self.stats.send_errors += 1
            if req is not None and not final:
                req.cancelled = True
            self.stats.last_send_error = f"{type(e).__name__}: {e}"
        if req is None:
            return
        if final:
            self._open.discard(req)
        elif not req.cancelled and self._cancelled(handle):
            req.cancelled = True

    def _cancelled(self, handle) -> bool:
        try:
            return self.sink.is_cancelled(handle)
        except Exception:
            return True


def _coalesce(items: list) -> list:
    """Merge each request's consecutive pieces; an error is sent after the pieces before it."""
    merged: dict[int, list] = {}
    for item in items:
        req, handle, out, _, final = item
        group = merged.setdefault(id(handle), [])
        last = group[-1] if group else None
        if last is not None and last[2] is not None and out is not None and not last[4]:
            prev = last[2]
            group[-1] = (req, handle, Output(prev.text + out.text, prev.token_ids + out.token_ids,
                                             out.finish_reason, out.prompt_tokens, out.completion_tokens,
                                             out.device_id, out.dropped_turns), None, final)
        else:
            group.append(item)
    return [item for group in merged.values() for item in group]
