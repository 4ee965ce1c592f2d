"""
`python -m tools.serve` (what `make serve` and `make demo` run): a local Triton and the BFF from one command,
the printed curl line streams an answer, Triton runs at idle CPU priority (serve's default), and Ctrl-C stops
both, leaving no process behind. With a model exported with samosaChaat's tool channel and a search backend in
the environment, the gateway's Search toggle starts the answer with the search's call and result.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import psutil
import pytest

from tests.support.bffkit import is_done, wait_until
from tests.support.httpkit import LoopbackServer, json_reply, searxng_results
from tests.support.tritonkit import command_line
from tools.bff_client import parse_events, ready, text_of
from tools.local_triton import free_port, session_members
from tools.measure import SERVER_TIMEOUT_S

pytestmark = pytest.mark.triton


GATEWAY_SYSTEM = "You are samosaChaat, a helpful assistant."  # the gateway inlines it before a blank line
QUESTION = "Who won the match yesterday?"


@pytest.mark.parametrize(("workers", "model"), [(None, "demo_tools"), (2, "demo")],
                         ids=["uvicorn-search", "gunicorn-2-workers"])
def test_serve_streams_the_printed_request_and_ctrl_c_stops_everything(oracle_repository, demo_tools, workers, model):
    if model == "demo_tools":
        demo_tools()  # exported in the background since the session started
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INTERNAL_API_KEY", "BFF_", "TAVILY_", "SEARXNG_"))}
    search = LoopbackServer({"/search": json_reply(searxng_results(1))})  # its result fits the demo's context
    if model == "demo_tools":
        env["SEARXNG_URL"] = search.url("")  # read by the Triton backend serve starts
    # started with SIGINT ignored, as a background job of a non-interactive shell is: Ctrl-C must still stop it
    # (ignored by an interpreter that then becomes serve: a preexec_fn would run Python in a fork of this
    # process, whose gRPC threads may be busy)
    ignoring = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    cmd = [sys.executable, "-c", ignoring, sys.executable, "-m", "tools.serve", "--model", model,
           "--model-repository", str(oracle_repository), "--port", str(port),
           *(["--workers", str(workers)] if workers else [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)  # never blocks on a pipe
    reader.start()
    try:
        out = [proc.stdout.readline() for _ in range(3)]
        printed = re.search(r"using (\S+) for this run", out[0])  # no key set: a one-run key, not an open server
        assert printed, f"serve printed {out}; exit {proc.poll()}; its log:\n" + "".join(stderr[-40:])
        key = printed.group(1)
        curl = out[2].strip()
        assert curl.startswith(f"curl -N http://127.0.0.1:{port}/generate") and key in curl, out
        body = json.loads(re.search(r"-d '(.*)'$", curl).group(1))
        wait_until(lambda: ready(f"http://127.0.0.1:{port}"), "the BFF did not get ready", timeout=60)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/generate", json=body,
                          headers={"X-Internal-API-Key": key}, timeout=60) as r:
            assert r.status_code == 200
            events = parse_events(r.iter_lines())
        assert is_done(events[-1]) and text_of(events)
        if model == "demo_tools":
            forced_search_reaches_the_client(port, key, search)
        assert httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=SERVER_TIMEOUT_S).status_code == 401

        triton = next(json.loads(line)["pid"] for line in list(stderr) if '"triton_started"' in line)
        assert os.sched_getscheduler(triton) == os.SCHED_IDLE, "serve's default: the model yields the CPU to the BFF"
        children = psutil.Process(proc.pid).children(recursive=True)
        servers = [p for p in children if "gunicorn" in " ".join(command_line(p))]
        assert len(servers) == (1 + workers if workers else 0)  # the master and its workers
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            assert proc.wait(30) == 0, "".join(stderr[-60:])
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not stop within 30 s of Ctrl-C; its log ends:\n" + "".join(stderr[-60:]))
        reader.join(10)
        assert any('"triton_stopped"' in line for line in stderr)
        assert session_members(triton) == [], "Triton or a backend stub outlived serve"  # Triton leads its session
        assert not [p for p in servers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        search.close()
        if proc.poll() is None:  # a failed test leaves nothing behind either: Ctrl-C first, so serve stops its Triton
            proc.send_signal(signal.SIGINT)  # and removes the stubs' shared memory, which a kill would leave
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        if proc.poll() is None:  # gunicorn's workers outlive a killed serve
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait(10)


def forced_search_reaches_the_client(port: int, key: str, search: LoopbackServer) -> None:
    """The gateway's request with the Search toggle on: the search goes to the configured backend for the question
    (without the inlined system prompt), and its call and result markers stream before the model's answer."""
    body = {"messages": [{"role": "user", "content": f"{GATEWAY_SYSTEM}\n\n{QUESTION}"}], "temperature": 0.8,
            "max_tokens": 16, "top_k": 50, "force_web_search": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/generate", json=body, headers={"X-Internal-API-Key": key},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = parse_events(r.iter_lines())
    assert is_done(events[-1]), events[-3:]
    assert [s.query["q"] for s in search.requests] == [[QUESTION]]
    text = text_of(events)
    call = json.dumps({"arguments": {"query": QUESTION, "top_k": 3}, "tool": "web_search"}, separators=(",", ":"))
    assert text.startswith(f"<|python_start|>{call}<|python_end|><|output_start|>"), text[:300]
    result = json.loads(text.split("<|output_start|>")[1].split("<|output_end|>")[0])
    assert result["success"] is True and result["metadata"] == {"num_results": 1, "search_backend": "searxng"}
    assert [hit["url"] for hit in result["output"]["results"]] == ["https://r0.test/"]
    assert events[0]["token"] == text.split("<|output_end|>")[0] + "<|output_end|>\n"  # one event, before the answer
    assert events[-1]["usage"]["completion_tokens"] >= 1
