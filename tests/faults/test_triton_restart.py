"""
Triton killed mid-stream and started again, with only its default model (as a restarted pod comes back), behind
one BFF that had swapped to another model: the stream ends with an error event within 10 s and no done, /health
says not ready within a probe interval, and the BFF, without a restart of its own, loads the model it served
on the new server and serves it again.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.support.bffkit import is_done, model_ready, wait_until
from tools.bff_client import AUTH, generate, health, parse_events, run_bff, triton_settings
from tools.local_triton import LocalTriton, derive_model
from tools.measure import SERVER_TIMEOUT_S

pytestmark = pytest.mark.triton
BODY = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "max_tokens": 200}


def test_a_killed_triton_ends_its_streams_and_a_restarted_one_gets_the_served_model_back(oracle_repository):
    derive_model(oracle_repository, "demo_1slot", "demo_1slot_b")
    first = LocalTriton(oracle_repository, load=["demo_1slot"]).start()
    ports = dict(grpc_port=first.grpc_port, http_port=first.http_port, metrics_port=first.metrics_port)
    try:
        with run_bff(**triton_settings(first, stream_silence_s=30)) as url:
            assert httpx.post(url + "/models/swap", json={"model_tag": "demo_1slot_b"}, headers=AUTH,
                              timeout=SERVER_TIMEOUT_S).status_code == 202
            lines = []
            with httpx.stream("POST", url + "/generate", json=BODY, headers=AUTH, timeout=60) as r:
                stream = r.iter_lines()
                lines.append(next(line for line in stream if line.startswith("data:")))
                os.killpg(first.process.pid, signal.SIGKILL)  # the server and its stubs, mid-answer
                lines.extend(stream)
            events = parse_events(lines)
            assert "error" in events[-1] and not any(is_done(e) for e in events), events[-1]
            assert events[-1]["error"] != "timeout", events[-1]  # ended by the broken channel, not the silence bound
            wait_until(lambda: health(url)["ready"] is False, "still ready with Triton dead")
            first.stop()

            with LocalTriton(oracle_repository, load=["demo_1slot"], **ports) as second:
                wait_until(lambda: health(url) == {"status": "ok", "ready": True, "current_model": "demo_1slot_b"},
                           f"the BFF did not serve demo_1slot_b again: {health(url)}", timeout=60)
                assert model_ready(second, "demo_1slot_b")
                r, events = generate(url, {**BODY, "max_tokens": 8})
                assert r.status_code == 200 and is_done(events[-1]), events[-1:]
    finally:
        first.stop()
