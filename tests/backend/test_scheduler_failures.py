"""
The scheduler's failure paths, each made to happen on purpose with an exact outcome: close() with requests
running and queued, a runner that raises mid-batch, a queued request cancelled, a send or a cancellation
check that fails, a metrics export that fails, and a full queue. The runner is the PyTorch core behind a
gate, so a test decides when a step may run.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from backend.protocol import QUEUE_FULL, SHUTTING_DOWN
from backend.scheduler import Scheduler
from core.generation import SamplingParams
from tests.support.bffkit import wait_until
from tests.support.schedkit import FakeSink, GatedRunner, alone, prompts, start

GREEDY = SamplingParams(0.0, None, 30, 0)


def test_close_ends_the_running_and_the_queued_request_with_shutting_down(demo):
    sched, runner, sink = start(demo)
    hold_prompt = prompts(demo[1])[1]
    runner.gate.clear()
    sched.submit("running", hold_prompt, GREEDY)
    sched.submit("queued", hold_prompt, GREEDY)
    assert runner.entered.wait(10)
    closer = threading.Thread(target=sched.close)
    closer.start()  # stopping is seen at the next step boundary: after the forward call that is held now
    runner.gate.set()
    closer.join(20)
    sink.wait(2, timeout=5)
    for handle in ("running", "queued"):
        _, _, last, error = sink.result(handle)
        assert last is None and error == f"{SHUTTING_DOWN}; request stopped", (handle, error)
    assert sched.stats.finished == {"stop": 0, "length": 0, "cancelled": 0, "error": 2}


def test_a_runner_failure_ends_the_batch_and_the_queue_goes_on(demo):
    model, tok = demo
    sched, runner, sink = start(demo, max_slots=1, max_queue=4)
    p = prompts(tok)
    runner.gate.clear()
    sched.submit("running", p[1], GREEDY)
    assert runner.entered.wait(10)  # its prefill is held
    sched.submit("queued", p[0], GREEDY)  # waits for the slot from the next step on
    runner.fail = RuntimeError("device lost (injected)")  # the next step's decode fails
    runner.gate.set()
    sink.wait(2)
    sched.close()
    assert sink.result("running")[3] == "inference failed: RuntimeError: device lost (injected)"
    tokens, _, _, error = sink.result("queued")  # it was waiting in the scheduler's queue, untouched
    assert error is None and tokens == alone(model, tok, p[0], GREEDY)
    assert sched.stats.finished["error"] == 1 and sched.stats.active == 0 and sched.stats.waiting == 0


def test_repeated_runner_failures_make_it_unhealthy_until_a_step_succeeds(demo):
    model, tok = demo
    sched, runner, sink = start(demo, unhealthy_after=2)
    p = prompts(tok)
    for n, handle in enumerate(("first", "second"), start=1):
        runner.fail = RuntimeError("device lost (injected)")
        sched.submit(handle, p[0], GREEDY)
        sink.wait(1)
        assert sink.result(handle)[3].startswith("inference failed")
        assert sched.healthy == (n < 2) and sched.stats.healthy == int(n < 2)
    sched.submit("recovered", p[0], GREEDY)  # an unhealthy model still tries what reaches it
    sink.wait(1)
    sched.close()
    tokens, _, _, error = sink.result("recovered")
    assert error is None and tokens == alone(model, tok, p[0], GREEDY)
    assert sched.healthy and sched.stats.healthy == 1


def test_a_queued_request_cancelled_by_its_client_ends_cancelled_without_a_token(demo):
    model, tok = demo
    sched, runner, sink = start(demo, max_queue=4)
    p = prompts(tok)
    runner.gate.clear()
    sched.submit("running", p[1], GREEDY)
    assert runner.entered.wait(10)
    sched.submit("queued", p[2], GREEDY)
    sink.cancelled.add("queued")  # the response thread's sweep flags it; the step thread ends it
    wait_until(lambda: sched.responses.flagged, "the sweep never flagged the cancelled request")
    runner.gate.set()
    sink.wait(2)
    sched.close()
    assert sink.responses["queued"] == [(sink.responses["queued"][0][0], None, True)]
    tokens, _, last, _ = sink.result("queued")
    assert tokens == [] and last.finish_reason == "cancelled" and last.completion_tokens == 0
    assert sink.result("running")[0] == alone(model, tok, p[1], GREEDY)


class FailingSink(FakeSink):
    """send() or is_cancelled() raise for the handles named."""

    def __init__(self, send_fails: set = frozenset(), check_fails: set = frozenset()):
        super().__init__()
        self.send_fails, self.check_fails = send_fails, check_fails

    def send(self, handle, out, error, final):
        if handle in self.send_fails:
            self.responses.setdefault(handle, []).append(("lost", error, final))
            if final:
                self.finals.release()
            raise ConnectionError("client gone (injected)")
        super().send(handle, out, error, final)

    def is_cancelled(self, handle):
        if handle in self.check_fails:
            raise RuntimeError("cannot ask (injected)")
        return super().is_cancelled(handle)


def test_a_failing_send_cancels_only_its_request(demo):
    model, tok = demo
    sink = FailingSink(send_fails={"gone"})
    sched, _, sink = start(demo, max_slots=2, sink=sink)
    p = prompts(tok)
    sched.submit("gone", p[1], SamplingParams(0.0, None, 100, 0))
    sched.submit("fine", p[2], GREEDY)
    sink.wait(2)
    sched.close()
    assert [final for _, _, final in sink.responses["gone"]] == [False, True]  # the first send failed: cancelled
    assert sched.stats.send_errors == 2 and "client gone (injected)" in sched.stats.last_send_error
    assert sched.stats.finished["cancelled"] == 1
    assert sink.result("fine")[0] == alone(model, tok, p[2], GREEDY)


def test_a_failing_cancellation_check_counts_as_cancelled(demo):
    sink = FailingSink(check_fails={"unknowable"})
    sched, runner, sink = start(demo, sink=sink)
    runner.gate.clear()  # no step until the sweep has asked (and failed to learn) whether the client cancelled
    sched.submit("unknowable", prompts(demo[1])[1], SamplingParams(0.0, None, 100, 0))
    wait_until(lambda: sched.responses.flagged, "the failed check was never taken as a cancellation")
    runner.gate.set()
    sink.wait(1)
    sched.close()
    tokens, _, last, _ = sink.result("unknowable")
    assert last.finish_reason == "cancelled" and tokens == []


def test_a_failing_metrics_export_is_counted_and_harms_nothing(demo):
    model, tok = demo

    class Broken:
        def export(self, stats):
            raise ValueError("metrics backend down (injected)")

    runner, sink = GatedRunner(model, 1), FakeSink()
    sched = Scheduler(runner, tok, sink, exporter=Broken())
    sched.submit("r", prompts(tok)[0], GREEDY)
    sink.wait(1)
    sched.close()
    assert sink.result("r")[0] == alone(model, tok, prompts(tok)[0], GREEDY)
    assert sched.stats.export_errors >= 1 and sched.stats.last_export_error == \
        "ValueError: metrics backend down (injected)"


@pytest.mark.parametrize("max_queue", [0, 1])
def test_a_full_queue_refuses_at_once_and_counts_it(demo, max_queue):
    sched, runner, sink = start(demo, max_queue=max_queue)
    p = prompts(demo[1])
    runner.gate.clear()
    for i in range(max_queue + 1):
        sched.submit(f"in{i}", p[1], GREEDY)
    assert runner.entered.wait(10)
    sched.submit("refused", p[0], GREEDY)
    sink.wait(1, timeout=5)  # answered while the slot is still busy: nothing waited
    error = sink.result("refused")[3]
    assert error == f"{QUEUE_FULL}1 slots busy and {max_queue} requests waiting; retry later"
    assert sched.stats.rejected == 1 and sched.stats.finished["error"] == 1
    runner.gate.set()
    sink.wait(max_queue + 1)
    sched.close()
    assert sched.stats.finished["error"] == 1


class RowRunner(GatedRunner):
    """Rewrites the logits of the row in `slot`: NaN (`poison`), or a script of tokens to force, one a call."""

    def __init__(self, model, max_slots: int, slot: int, poison: bool = False, script: list[int] = ()) -> None:
        super().__init__(model, max_slots)
        self.slot, self.poison, self.script = slot, poison, list(script)

    def forward(self, ids, positions, slots):
        logits = super().forward(ids, positions, slots)
        for row, slot in enumerate(slots.tolist()):
            if slot == self.slot and self.poison:
                logits[row] = np.nan
            elif slot == self.slot and self.script:
                logits[row] = -30.0
                logits[row, self.script.pop(0)] = 30.0
        return logits


def run_beside_three(demo, runner, odd: SamplingParams) -> tuple[FakeSink, Scheduler]:
    """The odd request in slot 0 (it arrives first), three normal ones beside it."""
    model, tok = demo
    sink = FakeSink()
    sched = Scheduler(runner, tok, sink)
    p = prompts(tok)
    sched.submit("odd", p[0], odd)
    for i in (1, 2, 3):
        sched.submit(f"n{i}", p[i], GREEDY)
    sink.wait(4)
    sched.close()
    for i in (1, 2, 3):  # the others decode on, token for token what they get alone
        tokens, _, _, error = sink.result(f"n{i}")
        assert error is None and tokens == alone(model, tok, p[i], GREEDY), i
    return sink, sched


def test_a_row_whose_draw_fails_ends_alone(demo):
    # not finite logits make torch.multinomial raise: before, the scheduler's catch-all ended the whole batch
    sink, sched = run_beside_three(demo, RowRunner(demo[0], 4, slot=0, poison=True), SamplingParams(1.0, 50, 30, 1))
    error = sink.result("odd")[3]
    assert error.startswith("generation failed: RuntimeError") and "probability tensor" in error
    assert sched.stats.finished["error"] == 1 and sched.stats.active == 0


def test_a_calculator_bomb_forces_nothing_and_harms_no_one(demo):
    tok = demo[1]
    bomb = [tok.python_start, *tok.encode("'a'.ljust(1000000000).count(' ')"), tok.python_end, tok.assistant_end]
    sink, _ = run_beside_three(demo, RowRunner(demo[0], 4, slot=0, script=bomb), SamplingParams(0.0, None, 60, 0))
    tokens, _, last, error = sink.result("odd")
    assert error is None and last.finish_reason == "stop"
    assert tokens == bomb[:-1]  # refused: no <|output_start|> result forced after <|python_end|>
