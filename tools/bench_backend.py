"""
`make bench-backend`: the nanochat backend in a real Triton server over gRPC streaming. One checkpoint is exported
three ways (continuous batching with responses by time; the same with a response per token; one request at a time)
and each, loaded alone, runs the same greedy workload at concurrency 1, 4 and 16: tokens/s, TTFT and ITL, and the
backend's CPU per token outside the model. Then 16 sampled streams, drawn with the batch vs with a seed.

    python -m tools.bench_backend [--nanochat-base ../shared/oracle/head] [--max-tokens 64] [--stream-interval 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import tritonclient.grpc.aio as grpcclient

from backend.model_config import EngineConfig
from backend.protocol import METRIC_CPU, METRIC_GENERATED_TOKENS, METRIC_RUNNER_SECONDS
from tools.local_triton import LocalTriton, derive_model
from tools.measure import SERVER_TIMEOUT_S, metric, metrics_once_ended, percentile, samples, scrape
from tools.paths import ORACLE_DIR
from tools.stream_client import make_inputs, stream

CONCURRENCY = (1, 4, 16)
# Three outputs, as a streaming client asks for them (the BFF names text, device_id, finish_reason); the
# benchmark needs token_ids to count tokens. The backend builds only what is asked for.
OUTPUTS = ["text", "token_ids", "finish_reason"]
PROMPTS = [
    "What is the capital of France?",
    "Explain what a Python decorator does.",
    "2+3*4 =",
    "Write a short note about the GNU General Public License.",
    "hi",
    "How do I open a file in Vim and search for a word?",
]


def backend_counters(metrics_url: str, model: str) -> dict[str, float]:
    """The backend's counters; the CPU per token outside the model is nanochat_cpu_seconds_total's schedule and send
    parts (batching, sampling, detokenizing, building and sending responses)."""
    text = scrape(metrics_url)
    out = {"tokens": metric(text, METRIC_GENERATED_TOKENS, model=model),
           "runner_seconds": metric(text, METRIC_RUNNER_SECONDS, model=model)}
    for labels, value in samples(text, METRIC_CPU, model=model):
        out[labels["part"]] = out.get(labels["part"], 0.0) + value
    return out


GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=0.8, top_k=50)  # the gateway's: no seed


async def run_level(client, model: str, concurrency: int, n_requests: int, max_tokens: int, sampling: dict = GREEDY,
                    seeded: bool = False) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int):
        async with sem:
            inputs = make_inputs(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                 max_tokens=max_tokens, seed=i if seeded else None, **sampling)
            return await stream(client, model, inputs, outputs=OUTPUTS)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n_requests)))
    wall = time.perf_counter() - t0
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    tokens = sum(len(r.token_ids) for r in results)
    ttft = [r.times[0] - r.sent_at for r in results if r.times]
    itl = [b - a for r in results for a, b in zip(r.times, r.times[1:], strict=False)]
    return dict(tokens=tokens, wall=wall, tok_s=tokens / wall, ttft_p50=percentile(ttft, 50),
                ttft_p95=percentile(ttft, 95), itl_p50=percentile(itl, 50), itl_p95=percentile(itl, 95))


async def measured_level(server: LocalTriton, client, model: str, ended: int, concurrency: int, n_requests: int,
                         max_tokens: int, **kw) -> dict:
    """run_level with the backend's CPU per token from its counters, read once it counts every request ended."""
    before = backend_counters(server.metrics_url, model)
    row = await run_level(client, model, concurrency, n_requests, max_tokens, **kw)
    await asyncio.to_thread(metrics_once_ended, server.metrics_url, model, ended + n_requests)
    after = backend_counters(server.metrics_url, model)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    row["overhead_us"] = 1e6 * (delta["schedule"] + delta["send"]) / max(1.0, delta["tokens"])
    row["schedule_us"] = 1e6 * delta["schedule"] / max(1.0, delta["tokens"])
    row["send_us"] = 1e6 * delta["send"] / max(1.0, delta["tokens"])
    return row


async def bench_model(server: LocalTriton, model: str, max_tokens: int, sampling_rounds: int = 0) -> dict:
    """Greedy rows by concurrency; with sampling_rounds, also the two sampling paths at 16 streams, in turns."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        await client.load_model(model, client_timeout=SERVER_TIMEOUT_S)
        await run_level(client, model, 2, 2, 8)  # warm up: first-run allocations, thread pools
        await asyncio.to_thread(metrics_once_ended, server.metrics_url, model, 2)
        ended, rows = 2, {}
        for c in CONCURRENCY:
            rows[c] = await measured_level(server, client, model, ended, c, max(8, 4 * c), max_tokens)
            ended += max(8, 4 * c)
        paths = {"batch draw": False, "seeded exact draw": True}
        sampled = {name: [] for name in paths}
        for r in range(sampling_rounds):
            for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                sampled[name].append(await measured_level(server, client, model, ended, 16, 64, max_tokens,
                                                          sampling=SAMPLED, seeded=paths[name]))
                ended += 64
        await client.unload_model(model, client_timeout=SERVER_TIMEOUT_S)
        return {"greedy": rows, "sampled": sampled}
    finally:
        await client.close()


def table(groups: dict[str, dict[int, dict]]) -> str:
    """One column group per configuration (title -> rows by concurrency), one line per concurrency."""
    ms = lambda s: f"{1000 * s:6.1f}"
    cols = f"{'tok/s':>7} {'TTFT p50':>8} {'p95':>7} {'ITL p50':>7} {'p95':>6} {'cpu/tok':>8}"
    head = f"{'conc':>4} | " + " | ".join([cols] * len(groups))
    lines = [f"{'':>4} | " + " | ".join(f"{title:^{len(cols)}}" for title in groups), head, "-" * len(head)]
    for c in CONCURRENCY:
        cells = [f"{row['tok_s']:7.1f} {ms(row['ttft_p50']):>8} {ms(row['ttft_p95']):>7} "
                 f"{ms(row['itl_p50']):>7} {ms(row['itl_p95']):>6} {row['overhead_us']:6.0f}us"
                 for row in (rows[c] for rows in groups.values())]
        lines.append(f"{c:>4} | " + " | ".join(cells))
    lines.append("times in ms; cpu/tok = backend CPU per streamed token outside the model (schedule + send)")
    return "\n".join(lines)


def main() -> None:
    default_base = ORACLE_DIR / "head"
    p = argparse.ArgumentParser(description="Benchmark the nanochat Triton backend over gRPC.")
    p.add_argument("--nanochat-base", default=str(default_base), help="NANOCHAT_BASE_DIR of the checkpoint")
    p.add_argument("--source", default="base")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sampling-rounds", type=int, default=4, help="runs of each sampling path, taking turns")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()

    from export import export_model, options

    with tempfile.TemporaryDirectory(prefix="nanochat-bench-") as tmp:
        repo = Path(tmp)
        for name, slots in (("batched", 16), ("serial", 1)):  # max_slots is fixed in the graph
            export_model(options(model_repository=repo, name=name, nanochat_base_dir=a.nanochat_base,
                                 source=a.source, max_slots=slots, max_queue=64, verify=False), log=lambda _: None)
        derive_model(repo, "batched", "per_token", stream_interval_ms=0)
        with LocalTriton(repo) as server:
            runs = {name: asyncio.run(bench_model(server, name, a.max_tokens, a.sampling_rounds if name == "batched"
                                                  else 0)) for name in ("batched", "per_token", "serial")}
    results = {name: run["greedy"] for name, run in runs.items()}
    titles = {"batched": f"continuous batching (16 slots, {EngineConfig().stream_interval_ms} ms)",
              "per_token": "same, a response per token", "serial": "one at a time (MAX_SLOTS=1)"}
    print(table({titles[name]: rows for name, rows in results.items()}))
    sampled = runs["batched"]["sampled"]
    for name, rows in sampled.items():
        print(f"16 sampled streams, {name}: " + ", ".join(f"{r['tok_s']:.0f} tok/s ({r['overhead_us']:.0f} us/token "
                                                          "outside the model)" for r in rows))
    summary = {"event": "bench_backend", "sampled_tok_s": {n: [round(r["tok_s"]) for r in rows]
                                                           for n, rows in sampled.items()}}
    for name in ("batched", "per_token"):
        speedup = results[name][16]["tok_s"] / results["serial"][16]["tok_s"]
        print(f"{titles[name]}: {speedup:.2f}x one-at-a-time at 16 concurrent streams (target >= 3x), "
              f"{results[name][16]['overhead_us']:.0f} us CPU per token outside the model (target <= 100)")
        summary[f"speedup_16_{name}"] = round(speedup, 2)
    worst = max(statistics.fmean([r["overhead_us"] for r in rows.values()]) for rows in results.values())
    print(json.dumps({**summary, "worst_mean_overhead_us": round(worst), "results": results}, default=float))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
