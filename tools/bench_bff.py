"""
`python -m tools.bench_bff` (`make bench`): what the BFF costs. The same greedy requests run side by side through
the BFF (SSE clients; the BFF in its own uvicorn process, as in production) and straight to Triton over gRPC, at
concurrency 1, 4 and 16; prints a table with the BFF's CPU per token and /health's latency, and saves a plot.
With --sampled: sampled streams (the gateway's temperature and top_k, no seed) through the BFF's OpenAI surface, whose
`seed` forces the exact per-row path (nanochat's generator on the host), against the same requests without one, drawn
with the batch where the logits are: tokens/s of each side by side, from the backend's count of generated tokens.

Without a GPU the model's work is CPU work that the BFF and the clients take from: --triton-cpus keeps Triton on
some CPUs and the rest on the others, as on a GPU node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import statistics
import time
import urllib.parse
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import psutil

from backend.protocol import METRIC_FINISHED
from bff.generation_params import GenerationParams
from bff.settings import Settings
from bff.triton import Endpoint
from bff.wire import OUTPUTS, Piece, raw_outputs, request_message
from tools.bench_backend import backend_counters
from tools.bff_client import AUTH, bff_process, token_times
from tools.local_triton import BESIDE_BFF_PRIORITY, PRIORITIES, LocalTriton
from tools.measure import metric, metrics_once_ended, percentile, scrape

PROMPT = [{"role": "user", "content": "Tell me a long story about a dragon who learns to code."}]


class Run:
    """Timings of one (path, concurrency) level, as vLLM defines them: TTFT = the first non-empty piece minus the
    moment before the request is sent; ITL = gaps between non-empty pieces, pooled over requests; tokens/s = the
    level's generated tokens over its wall time (greedy, one prompt: every request makes the same tokens)."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.requests = 0
        self.wall = 0.0  # summed over the rounds

    def record(self, start: float, stamps: list[float]) -> None:
        self.requests += 1
        if stamps:
            self.ttft.append(stamps[0] - start)
            self.itl.extend(np.diff(stamps).tolist())

    def row(self, tokens_per_request: int) -> dict:
        pct = lambda xs, q: percentile(xs, q) * 1000

        return {"ttft_p50": pct(self.ttft, 50), "ttft_p95": pct(self.ttft, 95), "itl_p50": pct(self.itl, 50),
                "itl_p95": pct(self.itl, 95), "tok_s": self.requests * tokens_per_request / self.wall}


async def direct_request(triton: Endpoint, model: str, max_tokens: int, run: Run, count_tokens: bool = False) -> int:
    """One stream asking for the outputs the BFF asks for (and token_ids, INT64, when counting tokens)."""
    params = GenerationParams(orjson.dumps(PROMPT), 0.0, 0, max_tokens, Settings.min_answer_tokens)
    request = request_message(model, "", params, outputs=(*OUTPUTS, "token_ids") if count_tokens else OUTPUTS)
    stamps, tokens = [], 0
    start = time.perf_counter()
    async for response in triton.stream_infer(request):
        if response.error_message:
            raise RuntimeError(response.error_message)
        if count_tokens:
            tokens += len(raw_outputs(response.infer_response)["token_ids"]) // 8
        if Piece.parse(response.infer_response).text:
            stamps.append(time.perf_counter())
    run.record(start, stamps)
    return tokens


async def bff_request(client: aiohttp.ClientSession, url: str, max_tokens: int, run: Run) -> None:
    """One /generate, its events read as the gateway reads them."""
    start = time.perf_counter()
    run.record(start, await token_times(client, url, {"messages": PROMPT, "temperature": 0, "max_tokens": max_tokens}))


class Route:
    """One way to the model at one concurrency: its timings and the CPU time its measured processes spent."""

    def __init__(self, request, pid: int | None = None) -> None:
        self.request = request
        self.pid = pid  # the BFF's process, whose CPU time is counted besides this benchmark's own
        self.run = Run()
        self.client_cpu = 0.0
        self.server_cpu = 0.0

    async def level(self, concurrency: int, per_client: int) -> None:
        async def client_loop():
            for _ in range(per_client):
                await self.request(self.run)

        client, server = time.process_time(), self.pid and cpu_seconds(self.pid)
        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        self.run.wall += time.perf_counter() - start
        self.client_cpu += time.process_time() - client
        if self.pid:
            self.server_cpu += cpu_seconds(self.pid) - server

    def row(self, tokens: int) -> dict:
        # CPU per token of the BFF and of this benchmark's own clients: steadier than timings on a shared
        # machine, and the clients (a gateway's work, elsewhere in production) share the cores too.
        per_token = 1e6 / (self.run.requests * tokens)
        row = {**self.run.row(tokens), "client_us": self.client_cpu * per_token}
        if self.pid:
            row["cpu_us"] = self.server_cpu * per_token
        return row


def _probe_health(url: str, stop, out) -> None:
    """The HealthProbe's process: GET `url` every 20 ms until `stop`; puts the latencies (ms) on `out`. Each
    probe opens a connection of its own, as the kubelet's do, with the standard library's client (httpx
    spends about a millisecond of CPU per request, which the probe would then wait for a core to run)."""
    parts = urllib.parse.urlsplit(url)
    ms = []
    while True:  # one probe at least, however short the level
        start = time.perf_counter()
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", parts.path)
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.status != 200:
            raise RuntimeError(f"GET {url} answered {response.status}")
        ms.append((time.perf_counter() - start) * 1000)
        if stop.wait(0.02):
            break
    out.put(ms)


class HealthProbe:
    """GET /health every 20 ms from a process of its own (this one's GIL is busy with the streams' clients), as
    Kubernetes' probes do while the streams run: it must answer at once however busy the model keeps the CPU."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")  # not fork: gRPC's threads are running here
        self._stop, self._out = ctx.Event(), ctx.Queue()
        self._process = ctx.Process(target=_probe_health, args=(url + "/health", self._stop, self._out), daemon=True)
        self.ms: list[float] = []

    def __enter__(self) -> HealthProbe:
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.ms = self._out.get(timeout=60)
        self._process.join(30)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def measure(bff_url: str, bff_pid: int, grpc_url: str, model: str, levels: list[int], per_client: int,
                  max_tokens: int, rounds: int) -> tuple[int, list[dict]]:
    """Each level runs `rounds` times per path, the paths taking turns to go first (ABBA...), so that a
    machine that slows down or speeds up during the run weighs on both alike."""
    rows = []
    triton = Endpoint(grpc_url, "")
    connector = aiohttp.TCPConnector(limit=max(levels) * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        tokens = await direct_request(triton, model, max_tokens, Run(), count_tokens=True)  # warm-up, and the count
        if not tokens:
            raise SystemExit(f"{model} ends the benchmark's prompt without a token: nothing to measure")
        await bff_request(http, bff_url, max_tokens, Run())
        for c in levels:
            direct = Route(lambda run: direct_request(triton, model, max_tokens, run))
            through = Route(lambda run: bff_request(http, bff_url, max_tokens, run), bff_pid)
            with HealthProbe(bff_url) as health:
                for i in range(rounds):
                    for route in (direct, through) if i % 2 == 0 else (through, direct):
                        await route.level(c, per_client)
            rows.append({"concurrency": c, "direct": direct.row(tokens), "bff": through.row(tokens),
                         "health_ms": (percentile(health.ms, 50), percentile(health.ms, 99), len(health.ms))})
    await triton.close()
    return tokens, rows


SAMPLED = {"temperature": 0.8, "top_k": 50}  # the gateway's defaults; it sends no seed
DRAWS = {"batch draw": False, "seeded exact draw": True}  # the path -> whether its requests carry a seed


async def measure_sampled(bff_url: str, metrics_url: str, model: str, concurrency: int, per_client: int,
                          max_tokens: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(tokens/s, the backend's CPU µs per token outside the model) of each draw path (DRAWS) at `concurrency`
    sampled streams through the BFF, `rounds` runs each, taking turns; the tokens are what the backend counts it
    generated (sampled answers differ in length)."""
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in DRAWS}
    seeds = iter(range(1 << 30))
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        async def client_loop(seeded: bool) -> None:
            for _ in range(per_client):
                # OpenAI's surface: /generate, as the contract has it, takes no seed
                body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "stream": True, **SAMPLED}
                async with http.post(bff_url + "/v1/chat/completions", headers=AUTH,
                                     json={**body, "seed": next(seeds)} if seeded else body) as r:
                    r.raise_for_status()
                    async for line in r.content:
                        if line.startswith(b"data: [DONE]"):
                            break

        ended = metric(await asyncio.to_thread(scrape, metrics_url), METRIC_FINISHED, model=model)
        await client_loop(False)  # warm-up
        ended += per_client
        await asyncio.to_thread(metrics_once_ended, metrics_url, model, int(ended))
        for r in range(rounds):
            for name in list(DRAWS) if r % 2 == 0 else list(DRAWS)[::-1]:
                before = await asyncio.to_thread(backend_counters, metrics_url, model)
                start = time.perf_counter()
                await asyncio.gather(*(client_loop(DRAWS[name]) for _ in range(concurrency)))
                wall = time.perf_counter() - start
                ended += concurrency * per_client
                await asyncio.to_thread(metrics_once_ended, metrics_url, model, int(ended))
                after = await asyncio.to_thread(backend_counters, metrics_url, model)
                d = {k: after[k] - before.get(k, 0.0) for k in after}
                out[name].append((d["tokens"] / wall, 1e6 * (d["schedule"] + d["send"]) / max(1.0, d["tokens"])))
    return out


def table(rows: list[dict]) -> str:
    head = ("| streams | path | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | tokens/s | BFF CPU µs/token "
            "| client CPU µs/token |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        for path in ("direct", "bff"):
            m = r[path]
            cpu = f"{m['cpu_us']:.0f}" if "cpu_us" in m else ""
            lines.append(f"| {r['concurrency']} | {'Triton gRPC' if path == 'direct' else 'BFF SSE'} | "
                         f"{m['ttft_p50']:.2f} | {m['ttft_p95']:.2f} | {m['itl_p50']:.2f} | {m['itl_p95']:.2f} | "
                         f"{m['tok_s']:.0f} | {cpu} | {m['client_us']:.0f} |")
        d, b = r["direct"], r["bff"]
        lines.append(f"| {r['concurrency']} | BFF cost | {b['ttft_p50'] - d['ttft_p50']:+.2f} | "
                     f"{b['ttft_p95'] - d['ttft_p95']:+.2f} | {b['itl_p50'] - d['itl_p50']:+.2f} | "
                     f"{b['itl_p95'] - d['itl_p95']:+.2f} | {100 * (b['tok_s'] / d['tok_s'] - 1):+.1f}% | | "
                     f"{b['client_us'] - d['client_us']:+.0f} |")
    lines.append("\n| streams | GET /health p50 ms | p99 ms | probes |\n|---:|---:|---:|---:|")
    lines += [f"| {r['concurrency']} | {r['health_ms'][0]:.2f} | {r['health_ms'][1]:.2f} | {r['health_ms'][2]} |"
              for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, [("ttft", "TTFT (ms)"), ("itl", "inter-token latency (ms)"),
                                       ("tok_s", "aggregate tokens/s")], strict=True):
        for route, color in (("direct", "tab:blue"), ("bff", "tab:orange")):
            label = "Triton gRPC" if route == "direct" else "BFF SSE"
            if key == "tok_s":
                ax.plot(xs, [r[route]["tok_s"] for r in rows], "o-", color=color, label=label)
            else:
                ax.plot(xs, [r[route][f"{key}_p50"] for r in rows], "o-", color=color, label=f"{label} p50")
                ax.plot(xs, [r[route][f"{key}_p95"] for r in rows], "o--", color=color, label=f"{label} p95")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.bench_bff", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--triton-url", help="Triton gRPC host:port (default: start a local Triton)")
    p.add_argument("--triton-metrics-url", default="")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="runs of each level per path, taking turns")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8013)
    p.add_argument("--plot", default="bench_bff.png")
    p.add_argument("--sampled", action="store_true",
                   help="sampled streams drawn with the batch vs the exact path a seed forces (tokens/s only)")
    p.add_argument("--triton-cpus", type=lambda v: {int(c) for c in v.split(",")}, metavar="0[,1...]",
                   help="run the local Triton on these CPUs and the BFF and this benchmark on the others, as on "
                        "a GPU node, where the model's work does not take the BFF's CPU (default: all share all)")
    p.add_argument("--triton-priority", choices=sorted(PRIORITIES), default=BESIDE_BFF_PRIORITY,
                   help="the local Triton's CPU priority (default %(default)s, as make serve gives it; "
                        "tools/local_triton.py)")
    a = p.parse_args(argv)
    if a.triton_cpus:
        if a.triton_url:
            p.error("--triton-cpus places a local Triton; it cannot be given with --triton-url")
        rest = os.sched_getaffinity(0) - a.triton_cpus
        if not rest or not a.triton_cpus <= os.sched_getaffinity(0):
            p.error(f"--triton-cpus must be a proper subset of this process's CPUs {sorted(os.sched_getaffinity(0))}")
        os.sched_setaffinity(0, rest)  # before any thread or the BFF starts, so they inherit it

    with contextlib.ExitStack() as stack:
        grpc_url, metrics_url = a.triton_url, a.triton_metrics_url
        if grpc_url is None:
            triton = stack.enter_context(LocalTriton(a.model_repository, load=[a.model], cpus=a.triton_cpus,
                                                     priority=a.triton_priority))
            grpc_url, metrics_url = triton.grpc_url, triton.metrics_url
        proc, url = stack.enter_context(bff_process(
            triton_urls=(grpc_url,), triton_metrics_urls=(metrics_url,) if metrics_url else (), model=a.model,
            model_repository=a.model_repository, port=a.port))
        if a.sampled:
            if not metrics_url:
                p.error("--sampled counts tokens from Triton's metrics: give --triton-metrics-url with --triton-url")
            sampled = {c: asyncio.run(measure_sampled(url, metrics_url, a.model, c, a.requests_per_client,
                                                      a.max_tokens, a.rounds)) for c in a.concurrency}
        else:
            tokens, rows = asyncio.run(measure(url, proc.pid, grpc_url, a.model, a.concurrency,
                                               a.requests_per_client, a.max_tokens, a.rounds))
    cpus = f"Triton on CPUs {sorted(a.triton_cpus)}, the BFF and the clients on the others" if a.triton_cpus \
        else "Triton, the BFF and the clients sharing all CPUs"
    if a.triton_url is None:
        cpus += f"; Triton at {a.triton_priority} priority"
    if a.sampled:
        print(f"model {a.model}, sampled {SAMPLED} through the BFF's OpenAI surface, up to {a.max_tokens} tokens, "
              f"{a.requests_per_client} requests per client, {a.rounds} rounds per path; {cpus}")
        print("| streams | path | tokens/s, each round | median | backend CPU µs/token outside the model |\n"
              "|---:|---|---|---:|---:|")
        for c, runs in sampled.items():
            for name, rounds in runs.items():
                print(f"| {c} | {name} | {', '.join(f'{t:.0f}' for t, _ in rounds)} | "
                      f"{statistics.median(t for t, _ in rounds):.0f} | "
                      f"{statistics.median(us for _, us in rounds):.0f} |")
        print(json.dumps({"event": "bench_bff_sampled", "model": a.model,
                          "tok_s": {c: {n: [round(t) for t, _ in vs] for n, vs in runs.items()}
                                    for c, runs in sampled.items()},
                          "backend_us_per_token": {c: {n: [round(us, 1) for _, us in vs] for n, vs in runs.items()}
                                                   for c, runs in sampled.items()}}))
        return
    print(f"model {a.model}, greedy, {tokens} tokens per request, {a.requests_per_client} requests per client, "
          f"{a.rounds} rounds per path; {cpus}")
    print(table(rows))
    plot(rows, Path(a.plot), f"BFF vs Triton gRPC: {cpus}")
    print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
