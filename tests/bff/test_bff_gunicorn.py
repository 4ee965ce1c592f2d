"""
The production server: gunicorn with bff/gunicorn_conf.py (uvicorn workers) in front of the real Triton.
On SIGTERM it stops taking connections and lets live streams finish within BFF_GRACEFUL_TIMEOUT_S; a
stream still running at that bound is cut and its Triton request cancelled.

The model is paused (its stub SIGSTOPped) from the first token until the server is shutting down, so the
stream is surely live when SIGTERM lands, however fast or slow this machine is. Safe only because no new
request reaches the stub meanwhile (Triton declares a stopped stub unhealthy when it hands it one).
"""

from __future__ import annotations

import contextlib
import signal
import socket

import httpx
import pytest

from tests.support.bffkit import assert_cancelled_and_freed, finished, is_done, wait_until
from tests.support.tritonkit import long_answers, stub_process
from tools.bff_client import AUTH, bff_process, generate, parse_events, text_of, triton_settings

pytestmark = pytest.mark.triton
BODY = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "max_tokens": 64}
LONG = {**BODY, "max_tokens": 4096}  # 20 s or more of tests.support.tritonkit.long_answers


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


def test_sigterm_lets_a_live_stream_finish(triton_server):
    stub = stub_process(triton_server, "head")
    settings = triton_settings(triton_server, model="head", workers=1, graceful_timeout_s=30)
    with bff_process(gunicorn=True, **settings) as (proc, url):
        _, reference = generate(url, BODY)
        lines = []
        try:
            with httpx.stream("POST", url + "/generate", json=BODY, headers=AUTH, timeout=60) as r:
                stream = r.iter_lines()
                for line in stream:
                    lines.append(line)
                    if line.startswith("data:"):
                        break
                stub.suspend()
                proc.send_signal(signal.SIGTERM)
                wait_until(lambda: refuses_connections(url), "gunicorn still takes connections after SIGTERM")
                stub.resume()
                lines.extend(stream)
        finally:
            stub.resume()
        assert proc.wait(30) == 0, proc.log_tail()
        # the worker probed Triton (its metrics too) before it was ready: httpx's line per request stays quiet
        assert '"logger":"httpx"' not in proc.log_tail(10**7)
    events = parse_events(lines)
    assert is_done(events[-1]) and not any("error" in e for e in events)
    assert text_of(events) == text_of(reference)  # greedy: the whole answer, not a cut one


def test_a_stream_past_the_graceful_bound_is_cut_and_its_request_cancelled(triton_server):
    with long_answers(triton_server) as model:
        settings = triton_settings(triton_server, model=model, workers=1, graceful_timeout_s=1)
        with bff_process(gunicorn=True, **settings) as (proc, url):
            before = finished(triton_server, model)
            lines = []
            with httpx.stream("POST", url + "/generate", json=LONG, headers=AUTH, timeout=60) as r:
                stream = r.iter_lines()
                lines.append(next(line for line in stream if line.startswith("data:")))
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(httpx.HTTPError):  # the server closes the connection mid-body
                    lines.extend(stream)
            assert proc.wait(30) == 0, proc.log_tail()
            assert not any("done" in e for e in parse_events(lines))
            assert_cancelled_and_freed(triton_server, model, before)
