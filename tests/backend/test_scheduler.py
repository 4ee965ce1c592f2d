"""The scheduler without Triton: a fake Sink and the PyTorch runner on a tiny demo checkpoint."""

import itertools
import time

import pytest

from backend.model_config import EngineConfig
from backend.protocol import SHUTTING_DOWN
from backend.scheduler import Scheduler
from backend.stops import StopMatcher
from core.generation import SamplingParams
from core.gpt import TorchRunner
from core.tokenizer import Detokenizer
from tests.support.bffkit import wait_until
from tests.support.schedkit import MAX_SEQ, FakeSink, alone, prompts, start


def test_batched_requests_get_what_they_get_alone(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 4, MAX_SEQ), tok, sink, EngineConfig(max_queue=16, prefill_chunk=16))
    cases = []
    for i, prompt in enumerate(prompts(tok) * 2):
        params = SamplingParams(0.0, None, 20, 0) if i % 2 else SamplingParams(1.0, 50 if i % 3 else None, 24, seed=i)
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
    sched = Scheduler(TorchRunner(model, 1, MAX_SEQ), tok, sink, EngineConfig(max_queue=1))
    prompt = prompts(tok)[0]
    for h in ("a", "b", "c"):
        sched.submit(h, prompt, SamplingParams(0.0, None, 30, 0))
    sink.wait(3)
    sched.close()
    assert "queue full" in sink.result("c")[3]
    assert sink.result("a")[2].finish_reason and sink.result("b")[2].finish_reason


def test_cancel_frees_the_slot(demo):
    """A cancellation is noticed by the response thread's sweep (a step is held until it is, so the answer cannot
    end first), and the step thread then frees the slot."""
    _, tok = demo
    sched, runner, sink = start(demo, max_queue=0)
    prompt = prompts(tok)[0]
    sched.submit("long", prompt, SamplingParams(0.0, None, 100, 0))
    while not sink.responses.get("long"):
        time.sleep(0.01)
    runner.gate.clear()
    sink.cancelled.add("long")
    wait_until(lambda: sched.responses.flagged, "the cancellation was never noticed")
    runner.gate.set()
    sink.wait(1)
    tokens, _, last, _ = sink.result("long")
    assert last.finish_reason == "cancelled" and len(tokens) < 100
    sched.submit("next", prompt, SamplingParams(0.0, None, 5, 0))  # fits: the slot is free again
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
    sched.submit("toolong", list(range(MAX_SEQ)), SamplingParams(0.0, None, 5, 0))
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
    sched.submit("edge", list(range(MAX_SEQ - 3)), SamplingParams(0.0, None, 50, 0))
    sink.wait(1)
    sched.close()
    tokens, _, last, _ = sink.result("edge")
    assert last.finish_reason in ("length", "stop") and len(tokens) <= 3


def test_close_ends_running_requests_with_an_error(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 1, MAX_SEQ), tok, sink, EngineConfig(max_queue=4))
    for h in ("a", "b"):
        sched.submit(h, prompts(tok)[1], SamplingParams(0.0, None, 120, 0))
    sched.close()
    sink.wait(2, timeout=5)
    for h in ("a", "b"):
        last, error = sink.result(h)[2:]
        assert error is not None or last.finish_reason
        assert error is None or SHUTTING_DOWN in error  # a client reads it as "try again", not a failure
    sched.submit("late", prompts(tok)[1], SamplingParams(0.0, None, 5, 0))  # after close: refused, not dropped
    assert SHUTTING_DOWN in sink.result("late")[3]


def test_slow_client_gets_merged_pieces_with_the_same_text(demo):
    model, tok = demo
    sink = FakeSink(slow=0.02)
    sched = Scheduler(TorchRunner(model, 2, MAX_SEQ), tok, sink)
    prompt, params = prompts(tok)[3], SamplingParams(0.0, None, 40, 0)
    sched.submit("slow", prompt, params)
    sink.wait(1)
    sched.close()
    tokens, _, _, _ = sink.result("slow")
    assert tokens == alone(model, tok, prompt, params)
    assert len(sink.responses["slow"]) < len(tokens)


def test_stream_interval_sends_the_first_token_then_groups_and_loses_nothing(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 4, MAX_SEQ), tok, sink, EngineConfig(stream_interval=4, stream_interval_ms=0))
    cases = [(f"r{n}", prompts(tok)[n % 6], SamplingParams(0.0, None, n, 0)) for n in (1, 2, 5, 22)]
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


def test_stream_interval_ms_sends_the_first_token_then_at_most_one_response_per_interval(demo):
    """An interval longer than the whole answer takes: the first token alone, then the final with the rest."""
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 2, MAX_SEQ), tok, sink, EngineConfig(stream_interval_ms=10_000))
    params = SamplingParams(0.0, None, 20, 0)
    sched.submit("r", prompts(tok)[1], params)
    sink.wait(1)
    sched.close()
    tokens, _, _, error = sink.result("r")
    assert error is None and tokens == alone(model, tok, prompts(tok)[1], params)
    assert [len(out.token_ids) for out, _, _ in sink.responses["r"]] == [1, len(tokens) - 1]


def test_max_responses_per_s_stretches_every_rows_interval_by_the_rows_running(demo):
    """Two rows and at most one response a second in all: each row's interval is two seconds, longer than its
    answer takes, so the first token goes alone and the final carries the rest; unbounded, a 1 ms interval sends
    many responses."""
    model, tok = demo
    counts = {}
    for rate in (1, 0):
        sink = FakeSink()
        sched = Scheduler(TorchRunner(model, 2, MAX_SEQ), tok, sink,
                          EngineConfig(stream_interval_ms=1, max_responses_per_s=rate))
        params = SamplingParams(0.0, None, 40, 0)
        for h in ("a", "b"):
            sched.submit(h, prompts(tok)[1], params)
        sink.wait(2)
        sched.close()
        for h in ("a", "b"):
            tokens, _, _, error = sink.result(h)
            assert error is None and tokens == alone(model, tok, prompts(tok)[1], params)
        counts[rate] = [len(out.token_ids) for out, _, _ in sink.responses["a"]]
    assert counts[1] == [1, 39], counts
    assert len(counts[0]) > 4, counts


def test_engine_settings_are_range_checked():
    with pytest.raises(ValueError, match="stream_interval must be an integer in"):
        EngineConfig(stream_interval=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        EngineConfig.from_parameters({"prefill_chunk": "lots"})


def test_stop_strings_end_the_answer_before_their_first_match_and_free_the_slot(demo):
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(TorchRunner(model, 1, MAX_SEQ), tok, sink)  # one slot: each request needs the last freed
    prompt, params = prompts(tok)[1], SamplingParams(0.0, None, 60, 0)
    sched.submit("whole", prompt, params)
    sink.wait(1)
    whole_ids, whole, last, _ = sink.result("whole")
    # a stop string across a token boundary, found at its first occurrence; one that never occurs
    first = Detokenizer(tok).push(whole_ids[0])
    span = whole[len(first) - 1: len(first) + 2]
    assert first and len(span) == 3, (first, whole)
    cut = whole.index(span)
    cases = {"span": ([span, "\x00never"], whole[:cut], "stop"), "absent": (["\x00never"], whole, last.finish_reason)}
    for handle, (stop, _, _) in cases.items():
        sched.submit(handle, prompt, params, stops=stop)
    sink.wait(len(cases))
    sched.close()
    for handle, (_, text, finish) in cases.items():
        ids, got, end, error = sink.result(handle)
        assert error is None and (got, end.finish_reason) == (text, finish), handle
        assert ids == whole_ids[: len(ids)] and end.completion_tokens == len(ids)
    assert len(sink.result("span")[0]) < len(whole_ids)  # it stopped generating, not only sending


def test_stop_matcher_holds_back_only_what_may_begin_a_stop_string():
    m = StopMatcher(["</end>", "STOP"])
    assert m.feed("hello <") == ("hello ", False)  # "<" may begin "</end>"
    assert m.feed("b> and ST") == ("<b> and ", False)
    assert m.feed("OP here") == ("", True)
    m = StopMatcher(["</end>"])
    assert m.feed("a </en") == ("a ", False) and m.flush() == "</en"
