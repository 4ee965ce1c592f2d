"""Helpers for the scheduler tests: a fake Sink that records responses, prompts, nanochat's reference generation
loop for one request alone (what the batched scheduler must reproduce), and the PyTorch core behind a gate, so a
test decides when a step may run."""

from __future__ import annotations

import threading
import time

from backend.model_config import EngineConfig
from backend.scheduler import Scheduler
from core.device_sampling import DrawsOnHost
from core.generation import generate
from core.gpt import TorchRunner

MAX_SEQ = 128


class FakeSink:
    """Records responses per handle; `slow` makes every send take that long (a busy client)."""

    def __init__(self, slow: float = 0.0):
        self.responses: dict[str, list] = {}
        self.cancelled: set[str] = set()
        self.finals = threading.Semaphore(0)
        self.slow = slow

    def send(self, handle, out, error, final):
        time.sleep(self.slow)
        self.responses.setdefault(handle, []).append((out, error, final))
        if final:
            self.finals.release()

    def is_cancelled(self, handle):
        return handle in self.cancelled

    def wait(self, n: int, timeout: float = 60.0):
        for _ in range(n):
            assert self.finals.acquire(timeout=timeout), "a request never got its final response"

    def result(self, handle):
        rs = self.responses[handle]
        assert [final for _, _, final in rs] == [False] * (len(rs) - 1) + [True], "exactly one final, last"
        outs = [o for o, _, _ in rs if o is not None]
        return ([t for o in outs for t in o.token_ids], "".join(o.text for o in outs), rs[-1][0], rs[-1][1])


def alone(model, tok, prompt, params):
    runner = TorchRunner(model, 1, MAX_SEQ)
    tokens = [t for t, _ in generate(runner, tok, prompt, params)]
    return [t for t in tokens if t not in (tok.assistant_end, tok.bos)]


def prompts(tok):
    texts = ["hello", "What is the capital of France?", "2+3*4 =", "café ☕ 日本語", "a " * 40, "hi"]
    return [tok.render_for_completion([{"role": "user", "content": t}]) for t in texts]


class GatedRunner(DrawsOnHost):
    """TorchRunner whose forward waits for `gate` (open by default) and raises `fail` in the next call."""

    def __init__(self, model, max_slots: int) -> None:
        self.inner = TorchRunner(model, max_slots, MAX_SEQ)
        self.max_slots, self.max_seq, self.prev = max_slots, MAX_SEQ, self.inner.prev
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.fail: Exception | None = None
        self.calls = 0

    def forward(self, ids, positions, slots):
        self.calls += 1
        error, self.fail = self.fail, None  # taken on entry: set while a call is held, it fails the next one
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        if error is not None:
            raise error
        return self.inner.forward(ids, positions, slots)


def start(demo, max_slots: int = 1, sink=None, **engine) -> tuple[Scheduler, GatedRunner, FakeSink]:
    model, tok = demo
    runner, sink = GatedRunner(model, max_slots), sink or FakeSink()
    return Scheduler(runner, tok, sink, EngineConfig(**engine)), runner, sink
