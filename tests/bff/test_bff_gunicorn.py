"""
The production server: gunicorn with bff/gunicorn_conf.py (uvicorn workers) in front of the real Triton.
On SIGTERM it stops taking connections and lets live streams finish within BFF_GRACEFUL_TIMEOUT_S; a
stream still running at that bound is cut and its Triton request cancelled. Two workers export one set
of metrics: a scrape counts every worker's streams.

The model is paused (its stub SIGSTOPped) from the first token until the server is shutting down, so the
stream is surely live when SIGTERM lands, however fast or slow this machine is. Safe only because no new
request reaches the stub meanwhile (Triton declares a stopped stub unhealthy when it hands it one).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket

import httpx
import pytest

from tests.support.bffkit import assert_cancelled_and_freed, finished, is_done, wait_until
from tests.support.tritonkit import long_answers, stub_process
from tools import measure
from tools.bff_client import AUTH, bff_process, generate, parse_events, text_of, triton_settings

pytestmark = pytest.mark.triton
BODY = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "max_tokens": 64}
LONG = {**BODY, "max_tokens": 4096}  # 20 s or more of tests.support.tritonkit.long_answers


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


def hold_streams(url: str, n: int) -> float:
    """`n` streams open at once, each on a fresh connection (so either worker may take it): the streams in
    flight that one scrape reports meanwhile."""
    with httpx.Client(headers=AUTH, timeout=60) as client, contextlib.ExitStack() as streams:
        for _ in range(n):
            r = streams.enter_context(client.stream("POST", url + "/generate", json=LONG))
            assert r.status_code == 200  # the BFF counts a stream in flight before it commits the 200
        return measure.metric(url + "/metrics", "bff_streams_active")


def stream_pids(proc) -> set[int]:
    """The workers that logged a finished /generate."""
    lines = (json.loads(line) for line in proc.log_tail(10**7).splitlines() if line.startswith("{"))
    return {line["pid"] for line in lines if line.get("route") == "/generate"}


def test_two_workers_export_one_set_of_metrics(triton_server):
    with long_answers(triton_server) as model:
        settings = triton_settings(triton_server, model=model, workers=2, metrics_open=True)
        with bff_process(gunicorn=True, **settings) as (proc, url):
            requests = lambda: measure.metric(url + "/metrics", "bff_requests_total", route="/generate")
            sent = 0
            for _ in range(8):  # rounds until both workers served streams: the kernel picks who accepts
                assert hold_streams(url, 4) == 4  # the gauge sums over workers, whichever took each stream
                sent += 4
                if len(stream_pids(proc)) == 2:
                    break
            wait_until(lambda: len(stream_pids(proc)) == 2, "one worker served every stream")
            wait_until(lambda: measure.metric(url + "/metrics", "bff_streams_active") == 0,
                       "cut streams still counted in flight")
            assert requests() == sent  # every worker's streams, not the answering worker's share
            ended = measure.metric(url + "/metrics", "bff_stream_ends_total")
            assert ended == sent, ended


def test_sigterm_lets_a_live_stream_finish(triton_server):
    stub = stub_process(triton_server, "head")
    settings = triton_settings(triton_server, model="head", workers=1, graceful_timeout_s=30)
    with bff_process(gunicorn=True, **settings) as (proc, url):
        _, reference = generate(url, BODY)
        assert [p.name.startswith("bff-metrics-") for p in proc.tmpdir.iterdir() if p.is_dir()] == [True]
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
        assert not [p for p in proc.tmpdir.iterdir() if p.is_dir()]  # the master removed its metrics directory
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
