"""
`python -m bff.bench` (`make bench`): what the BFF costs. The same greedy requests run side by side
through the BFF (concurrent SSE clients over HTTP) and directly against Triton over gRPC (one
tritonclient.grpc.aio stream per request), at concurrency 1, 4 and 16; prints a table and saves a plot.

Definitions (vLLM's): TTFT = first non-empty piece minus the moment just before the request is sent;
ITL = gaps between consecutive non-empty pieces, pooled over all requests; tokens/s = generated tokens of
all requests / wall time of the level. Requests are greedy with one prompt, so every request produces
the same tokens; the token count per request comes from Triton's `token_ids` in a warm-up request. Direct
streams ask for the outputs the BFF asks for, so the backend does the same work on both paths.
The BFF runs in its own process (uvicorn), as in production, and its CPU time per token is reported too
(a steadier figure than timings on a shared machine); Triton is started locally unless --triton-url is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import psutil
from tritonclient.grpc import InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient

from bff.triton import REQUESTED_OUTPUTS, build_inputs

KEY = "bench"
PROMPT = [{"role": "user", "content": "Tell me a long story about a dragon who learns to code."}]


class Run:
    """Timings of one (path, concurrency) level."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.requests = 0
        self.wall = 0.0

    def record(self, start: float, stamps: list[float]) -> None:
        self.requests += 1
        if stamps:
            self.ttft.append(stamps[0] - start)
            self.itl.extend(np.diff(stamps).tolist())

    def row(self, tokens_per_request: int) -> dict:
        def pct(xs, q):
            return float(np.percentile(xs, q) * 1000) if xs else float("nan")

        return {"ttft_p50": pct(self.ttft, 50), "ttft_p95": pct(self.ttft, 95), "itl_p50": pct(self.itl, 50),
                "itl_p95": pct(self.itl, 95), "tok_s": self.requests * tokens_per_request / self.wall}


async def direct_request(client: InferenceServerClient, model: str, max_tokens: int, run: Run,
                         count_tokens: bool = False) -> int:
    """One stream asking for the outputs the BFF asks for (and token_ids when counting tokens)."""
    inputs = build_inputs(orjson.dumps(PROMPT), 0.0, 0, max_tokens)
    outputs = [*REQUESTED_OUTPUTS, InferRequestedOutput("token_ids")] if count_tokens else REQUESTED_OUTPUTS

    async def one():
        yield {"model_name": model, "inputs": inputs, "outputs": outputs}

    stamps, tokens = [], 0
    start = time.perf_counter()
    async for result, error in client.stream_infer(one()):
        if error is not None:
            raise RuntimeError(error.message())
        if count_tokens:
            tokens += len(result.as_numpy("token_ids"))
        if result.as_numpy("text")[0]:
            stamps.append(time.perf_counter())
    run.record(start, stamps)
    return tokens


async def bff_request(client: httpx.AsyncClient, url: str, max_tokens: int, run: Run) -> None:
    body = {"messages": PROMPT, "temperature": 0, "max_tokens": max_tokens}
    stamps = []
    start = time.perf_counter()
    async with client.stream("POST", url + "/generate", json=body, headers={"X-Internal-API-Key": KEY}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith('data: {"token"'):
                stamps.append(time.perf_counter())
            elif line.startswith("data: {\"error\""):
                raise RuntimeError(line)
    run.record(start, stamps)


async def level(concurrency: int, per_client: int, request) -> Run:
    run = Run()

    async def client_loop():
        for _ in range(per_client):
            await request(run)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    run.wall = time.perf_counter() - start
    return run


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def measure(bff_url: str, bff_pid: int, grpc_url: str, model: str, levels: list[int], per_client: int,
                  max_tokens: int) -> tuple[int, list[dict]]:
    rows = []
    triton = InferenceServerClient(grpc_url)
    limits = httpx.Limits(max_connections=max(levels) * 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        tokens = await direct_request(triton, model, max_tokens, Run(), count_tokens=True)  # warm-up, and the count
        await bff_request(http, bff_url, max_tokens, Run())
        # CPU per token of the BFF and of this benchmark's own clients: steadier than timings on a shared
        # machine, and the clients (a gateway's work, elsewhere in production) share the cores too.
        us_per_token = lambda seconds, run: 1e6 * seconds / (run.requests * tokens)
        for c in levels:
            client = time.process_time()
            direct = await level(c, per_client, lambda run: direct_request(triton, model, max_tokens, run))
            direct_client_us = us_per_token(time.process_time() - client, direct)
            cpu, client = cpu_seconds(bff_pid), time.process_time()
            through = await level(c, per_client, lambda run: bff_request(http, bff_url, max_tokens, run))
            bff = {"cpu_us": us_per_token(cpu_seconds(bff_pid) - cpu, through),
                   "client_us": us_per_token(time.process_time() - client, through)}
            rows.append({"concurrency": c, "direct": {**direct.row(tokens), "client_us": direct_client_us},
                         "bff": {**through.row(tokens), **bff}})
    await triton.close()
    return tokens, rows


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
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@contextlib.contextmanager
def bff_process(grpc_url: str, metrics_url: str, model: str, repository: str, port: int):
    env = {**os.environ, "INTERNAL_API_KEY": KEY, "BFF_TRITON_URLS": grpc_url, "BFF_MODEL": model,
           "BFF_TRITON_METRICS_URLS": metrics_url, "BFF_MODEL_REPOSITORY": repository}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bff.app:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", "--no-access-log"],
                            env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").json()["ready"]:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the BFF did not become ready")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bff.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--triton-url", help="Triton gRPC host:port (default: start a local Triton)")
    p.add_argument("--triton-metrics-url", default="")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8013)
    p.add_argument("--plot", default="bench_bff.png")
    a = p.parse_args(argv)

    with contextlib.ExitStack() as stack:
        grpc_url, metrics_url = a.triton_url, a.triton_metrics_url
        if grpc_url is None:
            from runtime.local_triton import LocalTriton

            triton = stack.enter_context(LocalTriton(a.model_repository, load=[a.model]))
            grpc_url, metrics_url = triton.grpc_url, triton.metrics_url
        url, pid = stack.enter_context(bff_process(grpc_url, metrics_url, a.model, a.model_repository, a.port))
        tokens, rows = asyncio.run(measure(url, pid, grpc_url, a.model, a.concurrency, a.requests_per_client,
                                           a.max_tokens))
    print(f"model {a.model}, greedy, {tokens} tokens per request, {a.requests_per_client} requests per client")
    print(table(rows))
    plot(rows, Path(a.plot))
    print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
