"""The scheduler without Triton: a fake Sink and the PyTorch runner on a tiny demo checkpoint."""

import itertools
import threading
import time

import pytest

from runtime.checkpoint import find_checkpoint, open_checkpoint
from runtime.demo import make_checkpoint
from runtime.generation import SamplingParams, generate
from runtime.gpt import TorchRunner, build_gpt
from runtime.refusals import SHUTTING_DOWN
from runtime.scheduler import Scheduler
from runtime.tokenizer import Detokenizer

MAX_SEQ = 128


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    make_checkpoint(base, "G4", depth=2, n_embd=64, sequence_len=MAX_SEQ)
    loaded, tok = open_checkpoint(find_checkpoint("sft", nanochat_base=base))
    return build_gpt(loaded.config, loaded.state_dict), tok


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


def test_batched_requests_get_what_they_get_alone(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 4, MAX_SEQ), tok, sink, max_queue=16, prefill_chunk=16)
    cases = []
    for i, prompt in enumerate(prompts(tok) * 2):
        params = SamplingParams(0.0, None, 20) if i % 2 else SamplingParams(1.0, 50 if i % 3 else None, 24, seed=i)
        cases.append((f"r{i}", prompt, params))
        sched.submit(f"r{i}", prompt, params)
    sink.wait(len(cases))
    sched.close()
    for handle, prompt, params in cases:
        tokens, text, last, error = sink.result(handle)
        assert error is None and last.finish_reason in ("stop", "length")
        assert tokens == alone(model, tok, prompt, params), handle
        detok = Detokenizer(tok)
        assert text == "".join(detok.push(t) for t in tokens) + detok.flush()
        assert last.prompt_tokens == len(prompt) and last.completion_tokens == len(tokens)


def test_full_queue_is_refused_and_others_still_run(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 1, MAX_SEQ), tok, sink, max_queue=1)
    prompt = prompts(tok)[0]
    for h in ("a", "b", "c"):
        sched.submit(h, prompt, SamplingParams(0.0, None, 30))
    sink.wait(3)
    sched.close()
    assert "queue full" in sink.result("c")[3]
    assert sink.result("a")[2].finish_reason and sink.result("b")[2].finish_reason


def test_cancel_frees_the_slot(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 1, MAX_SEQ), tok, sink, max_queue=0)
    prompt = prompts(tok)[0]
    sched.submit("long", prompt, SamplingParams(0.0, None, 100))
    while not sink.responses.get("long"):
        time.sleep(0.01)
    sink.cancelled.add("long")
    sink.wait(1)
    tokens, _, last, _ = sink.result("long")
    assert last.finish_reason == "cancelled" and len(tokens) < 100
    sched.submit("next", prompt, SamplingParams(0.0, None, 5))  # fits: the slot is free again
    sink.wait(1)
    sched.close()
    next_reason = sink.result("next")[2].finish_reason
    assert next_reason in ("stop", "length")
    assert sched.stats.active == 0
    assert sched.stats.finished == {"stop": 0, "length": 0, "cancelled": 1, "error": 0, next_reason: 1}


def test_errors_are_final_responses(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 2, MAX_SEQ), tok, sink)
    sched.submit("toolong", list(range(MAX_SEQ)), SamplingParams(0.0, None, 5))
    sched.fail("bad", "messages is not valid JSON")
    sink.wait(2)
    sched.close()
    assert "does not fit" in sink.result("toolong")[3]
    assert sink.result("bad")[3] == "messages is not valid JSON"
    assert sched.stats.finished["error"] == 2


def test_context_limit_ends_with_length(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 1, MAX_SEQ), tok, sink)
    sched.submit("edge", list(range(MAX_SEQ - 3)), SamplingParams(0.0, None, 50))
    sink.wait(1)
    sched.close()
    tokens, _, last, _ = sink.result("edge")
    assert last.finish_reason in ("length", "stop") and len(tokens) <= 3


def test_close_ends_running_requests_with_an_error(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 1, MAX_SEQ), tok, sink, max_queue=4)
    for h in ("a", "b"):
        sched.submit(h, prompts(tok)[1], SamplingParams(0.0, None, 120))
    sched.close()
    sink.wait(2, timeout=5)
    for h in ("a", "b"):
        last, error = sink.result(h)[2:]
        assert error is not None or last.finish_reason
        assert error is None or SHUTTING_DOWN in error  # a client reads it as "try again", not a failure
    sched.submit("late", prompts(tok)[1], SamplingParams(0.0, None, 5))  # after close: refused, not dropped
    assert SHUTTING_DOWN in sink.result("late")[3]


def test_slow_client_gets_merged_pieces_with_the_same_text(demo):
    model, tok = demo
    sink = FakeSink(slow=0.02)
    sched = Scheduler(TorchRunner(model, 2, MAX_SEQ), tok, sink)
    prompt, params = prompts(tok)[3], SamplingParams(0.0, None, 40)
    sched.submit("slow", prompt, params)
    sink.wait(1)
    sched.close()
    tokens, _, _, _ = sink.result("slow")
    assert tokens == alone(model, tok, prompt, params)
    assert len(sink.responses["slow"]) < len(tokens)


def test_stream_interval_sends_the_first_token_then_groups_and_loses_nothing(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 4, MAX_SEQ), tok, sink, stream_interval=4)
    cases = [(f"r{n}", prompts(tok)[n % 6], SamplingParams(0.0, None, n)) for n in (1, 2, 5, 22)]
    for handle, prompt, params in cases:
        sched.submit(handle, prompt, params)
    sink.wait(len(cases))
    sched.close()
    for handle, prompt, params in cases:
        tokens, text, last, error = sink.result(handle)
        assert error is None and last.completion_tokens == len(tokens)
        assert tokens == alone(model, tok, prompt, params), handle
        detok = Detokenizer(tok)
        assert text == "".join(detok.push(t) for t in tokens) + detok.flush()
        # the first token goes out alone, then groups of 4, and the final response carries the rest; the
        # response thread may merge consecutive responses further, which only removes boundaries
        ends = list(itertools.accumulate(len(out.token_ids) for out, _, _ in sink.responses[handle]))
        assert ends[-1] == len(tokens) and all(e % 4 == 1 for e in ends[:-1]), ends
        assert len(ends) <= 1 + -(-(len(tokens) - 1) // 4), ends


def test_stream_interval_must_be_positive(demo):
    model, tok = demo
    with pytest.raises(ValueError, match="stream_interval"):
        Scheduler(TorchRunner(model, 1, MAX_SEQ), tok, FakeSink(), stream_interval=0)
