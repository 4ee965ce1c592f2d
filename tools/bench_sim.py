"""
`make bench-sim`: what the host costs per token at GPU speed, without a GPU. The runner (backend/sim_runner.py)
sleeps each step's time on a GPU profile and returns one id per row. Two layers, at 64 and 256 streams, greedy and
sampled as the gateway samples: `scheduler` (backend.scheduler alone) and `triton` (the real Triton, the BFF and SSE
clients). Prints the profile's ceiling, delivered tokens/s and host CPU µs per token of each thread and process.

    python -m tools.bench_sim [--profile d20-h100] [--layers scheduler triton] [--rows 64 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from backend.model_config import EngineConfig
from backend.protocol import TOKENIZER_FILE
from backend.scheduler import Scheduler
from backend.sim_runner import SimRunner, text_ids, write_sim_model
from core.generation import SamplingParams
from core.random_checkpoint import CORPUS, train_tokenizer, write_tokenizer
from core.roofline import PROFILES
from core.tokenizer import Tokenizer
from tools.bench_backend import backend_counters
from tools.local_triton import LocalTriton, session_members
from tools.measure import SERVER_TIMEOUT_S, metrics_once_ended

SAMPLING = {"greedy": dict(temperature=0.0, top_k=0), "sampled": dict(temperature=0.8, top_k=50)}
MAX_SEQ = 2048
WARM_UP = 4  # requests before the measured ones


def d20_tokenizer(directory: Path) -> Tokenizer:
    """A tokenizer of a d20's size (65,536), trained here on the demo corpus (tokens past its merges are fillers)."""
    write_tokenizer(train_tokenizer(PROFILES["d20-h100"].model["vocab_size"]), directory)
    return Tokenizer.load(directory / TOKENIZER_FILE)


def prompt_texts(n: int, words: int) -> list[str]:
    """n user messages of about `words` words each, cut from the corpus at different places."""
    corpus = CORPUS.read_text(encoding="utf-8").split()
    return [" ".join(corpus[(i * 97 + j) % len(corpus)] for j in range(words)) for i in range(n)]


class Counter:
    """A scheduler Sink that counts finals and hands each finished handle to the client thread."""

    def __init__(self) -> None:
        self.done: queue.SimpleQueue = queue.SimpleQueue()

    def send(self, handle, out, error, final) -> None:
        if error is not None:
            raise SystemExit(f"request {handle} failed: {error}")
        if final:
            self.done.put(handle)

    def is_cancelled(self, handle) -> bool:
        return False


def scheduler_layer(profile: str, rows: int, sampling: str, tok: Tokenizer, prompts: list[list[int]],
                    per_stream: int, max_tokens: int, engine: EngineConfig) -> dict:
    runner = SimRunner(PROFILES[profile], rows, MAX_SEQ, tok.vocab_size, text_ids(tok))
    sink = Counter()
    sched = Scheduler(runner, tok, sink, engine)
    params = SamplingParams(max_tokens=max_tokens, top_p=1.0, **{k: v or None if k == "top_k" else v
                                                                  for k, v in SAMPLING[sampling].items()})
    client_cpu = [0.0]

    def client() -> None:  # `rows` streams, each sending its next request when its last one ends
        cpu = time.thread_time()
        sent = 0
        for _ in range(rows):
            sched.submit(sent, prompts[sent % len(prompts)], params)
            sent += 1
        for _ in range(rows * per_stream):
            sink.done.get(timeout=SERVER_TIMEOUT_S)
            if sent < rows * per_stream:
                sched.submit(sent, prompts[sent % len(prompts)], params)
                sent += 1
        client_cpu[0] = time.thread_time() - cpu

    start = time.perf_counter()
    thread = threading.Thread(target=client)
    thread.start()
    thread.join()
    wall = time.perf_counter() - start
    sched.close()
    cpu, tokens = sched.stats.cpu, sched.stats.tokens
    per = lambda s: s / tokens * 1e6
    return row("scheduler", profile, rows, sampling, tokens / sched.stats.runner_seconds, tokens / wall,
               {"step": per(cpu["step"] - cpu["model_call"]), "runner": per(cpu["model_call"]),
                "responses": per(cpu["send"]), "client": per(client_cpu[0])})


def row(layer: str, profile: str, rows: int, sampling: str, ceiling: float, delivered: float, host: dict) -> dict:
    return {"layer": layer, "profile": profile, "rows": rows, "sampling": sampling, "ceiling_tok_s": round(ceiling),
            "delivered_tok_s": round(delivered), "host_us_per_token": {k: round(v, 2) for k, v in host.items()}}


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


async def sse_clients(url: str, texts: list[str], rows: int, per_stream: int, max_tokens: int,
                      sampling: str) -> tuple[int, list[float]]:
    """`rows` gateway-like clients, each posting /generate per_stream times and reading its events to done; the
    token events they read, and each request's seconds to its first token event."""
    import aiohttp

    from tools.bff_client import token_times

    firsts: list[float] = []

    async def stream(client, i: int) -> int:
        events = 0
        for r in range(per_stream):
            body = {"messages": [{"role": "user", "content": texts[(i + r * rows) % len(texts)]}],
                    "max_tokens": max_tokens, **SAMPLING[sampling]}
            sent = time.perf_counter()
            times = await token_times(client, url, body)
            if times:  # an answer whose tokens made no text has no first token
                firsts.append(times[0] - sent)
            events += len(times)
        return events

    connector = aiohttp.TCPConnector(limit=rows * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as client:
        return sum(await asyncio.gather(*(stream(client, i) for i in range(rows)))), firsts


def triton_layer(profile: str, rows: int, sampling: str, repo: Path, tok_file: Path, texts: list[str],
                 per_stream: int, max_tokens: int, engine: EngineConfig, port: int) -> dict:
    from tools.bff_client import bff_process, triton_settings

    name = f"sim_{rows}"
    write_sim_model(repo, name, tok_file, profile, rows, MAX_SEQ, engine)
    with LocalTriton(repo, load=[name]) as triton, \
            bff_process(**triton_settings(triton, model=name, port=port)) as (bff, url):
        server, bff_pid = triton.process.pid, bff.pid
        stubs = [p for p in session_members(server) if p != server]
        asyncio.run(sse_clients(url, texts, WARM_UP, 1, 8, sampling))  # connections, the first prefill
        metrics_once_ended(triton.metrics_url, name, WARM_UP)  # the backend's counters include the warm-up
        before = backend_counters(triton.metrics_url, name), cpu_of([server]), cpu_of(stubs), cpu_of([bff_pid])
        client = time.process_time()
        start = time.perf_counter()
        events, firsts = asyncio.run(sse_clients(url, texts, rows, per_stream, max_tokens, sampling))
        wall = time.perf_counter() - start
        client = time.process_time() - client
        metrics_once_ended(triton.metrics_url, name, WARM_UP + rows * per_stream)
        after = backend_counters(triton.metrics_url, name), cpu_of([server]), cpu_of(stubs), cpu_of([bff_pid])
    counters = {k: after[0][k] - before[0].get(k, 0.0) for k in after[0]}
    tokens = counters["tokens"]
    per = lambda s: s / tokens * 1e6
    stub_other = after[2] - before[2] - counters["schedule"] - counters["model_call"] - counters["send"]
    return {**row("triton", profile, rows, sampling, tokens / counters["runner_seconds"], tokens / wall,
                  {"step": per(counters["schedule"]), "runner": per(counters["model_call"]),
                   "responses": per(counters["send"]), "stub_other": per(stub_other),
                   "tritonserver": per(after[1] - before[1]), "bff": per(after[3] - before[3]),
                   "client": per(client)}), "sse_events_per_token": round(events / tokens, 3),
            # how long the requests waited for their first token: at 256 streams mostly for the prefill of the
            # prompts that came together, one prefill_chunk a step
            "ttft_s_p50": round(float(np.percentile(firsts, 50)), 3),
            "ttft_s_p90": round(float(np.percentile(firsts, 90)), 3)}


def table(rows: list[dict]) -> str:
    parts = sorted({k for r in rows for k in r["host_us_per_token"]}, key=lambda k: list(HOST_ORDER).index(k))
    head = ["layer", "profile", "rows", "sampling", "ceiling tok/s", "delivered tok/s", "of ceiling",
            *[f"{p} µs/tok" for p in parts]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        host = r["host_us_per_token"]
        cells = [r["layer"], r["profile"], r["rows"], r["sampling"], f"{r['ceiling_tok_s']:,}",
                 f"{r['delivered_tok_s']:,}", f"{r['delivered_tok_s'] / r['ceiling_tok_s']:.0%}",
                 *[f"{host[p]:.1f}" if p in host else "-" for p in parts]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# Host CPU per token by part: step (the scheduler thread without the runner), runner (the simulator's bookkeeping,
# standing for the GPU runner's launches), responses (the backend's response thread), then each process. The
# ceiling is tokens over the simulated device time: what a host costing nothing would deliver.
HOST_ORDER = ("step", "runner", "responses", "stub_other", "tritonserver", "bff", "client")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.bench_sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="d20-h100")
    p.add_argument("--layers", nargs="+", choices=["scheduler", "triton"], default=["scheduler", "triton"])
    p.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    p.add_argument("--sampling", nargs="+", choices=sorted(SAMPLING), default=["greedy", "sampled"])
    p.add_argument("--prompt-words", type=int, default=600, help="user message length (about a token a word)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--per-stream", type=int, default=2, help="requests each stream sends, one after another")
    p.add_argument("--stream-interval-ms", type=int, default=EngineConfig().stream_interval_ms)
    p.add_argument("--max-responses-per-s", type=int, default=EngineConfig().max_responses_per_s)
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig().prefill_chunk,
                   help="prompt tokens prefilled a step (default: the CPU's; README: PREFILL_CHUNK on a GPU)")
    p.add_argument("--port", type=int, default=8023)
    a = p.parse_args(argv)
    prof = PROFILES[a.profile]
    print(f"profile {prof.name}: {prof.gpu}, {prof.bandwidth / 1e12:.2f} TB/s and {prof.flops / 1e12:.0f} TFLOP/s "
          f"peak at {prof.efficiency:.0%}, {prof.launch_s * 1e6:.0f} µs a step; {prof.dense_params() / 1e6:.0f} M "
          f"dense parameters in bf16 ({prof.source}); {a.prompt_words}-word prompts, {a.max_tokens} tokens each, "
          f"stream_interval_ms {a.stream_interval_ms}, max_responses_per_s {a.max_responses_per_s}, prefill_chunk "
          f"{a.prefill_chunk}", flush=True)
    engine = EngineConfig(max_queue=1024, stream_interval_ms=a.stream_interval_ms,
                          max_responses_per_s=a.max_responses_per_s, prefill_chunk=a.prefill_chunk)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        tok = d20_tokenizer(Path(tmp) / "tokenizer")
        texts = prompt_texts(512, a.prompt_words)
        prompts = [tok.render_for_completion([{"role": "user", "content": t}]) for t in texts]
        for layer in a.layers:
            for rows in a.rows:
                for sampling in a.sampling:
                    if layer == "scheduler":
                        r = scheduler_layer(a.profile, rows, sampling, tok, prompts, a.per_stream, a.max_tokens, engine)
                    else:
                        r = triton_layer(a.profile, rows, sampling, Path(tmp) / "repo", Path(tmp) / "tokenizer" /
                                         TOKENIZER_FILE, texts, a.per_stream, a.max_tokens, engine, a.port)
                    print(json.dumps(r), flush=True)
                    results.append(r)
    print(table(results))


if __name__ == "__main__":
    main()
