"""`make bench` end to end at a tiny size: both paths (and both draws of --sampled) run against the session's Triton
and the tables hold."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tools.local_triton import free_port

pytestmark = pytest.mark.triton


def test_bench_measures_both_paths(triton_server, tmp_path):
    plot = tmp_path / "bench.png"
    run = subprocess.run(
        [sys.executable, "-m", "tools.bench_bff", "--model", "head",
         "--model-repository", str(triton_server.model_repository),
         "--triton-url", triton_server.grpc_url, "--triton-metrics-url", triton_server.metrics_url,
         "--concurrency", "1", "2", "--requests-per-client", "2", "--rounds", "2", "--max-tokens", "8",
         "--port", str(free_port()), "--plot", str(plot)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    tables = [[line.split("|")[1:-1] for line in block.splitlines() if line.startswith("| ") and "---" not in line]
              for block in run.stdout.split("\n\n")]
    rows, health = [t for t in tables if t]
    assert [(r[0].strip(), r[1].strip()) for r in rows[1:]] == [
        (c, path) for c in ("1", "2") for path in ("Triton gRPC", "BFF SSE", "BFF cost")]
    for streams, path, *figures in rows[1:]:
        tokens_per_s = float(figures[4].strip().rstrip("%"))
        assert math.isfinite(tokens_per_s)
        if path.strip() != "BFF cost":
            assert tokens_per_s > 0 and float(figures[0]) > 0, (streams, path, figures)  # TTFT p50, tokens/s
    assert "BFF CPU" in rows[0][7] and rows[2][7].strip().isdigit(), "the BFF's CPU per token is reported"
    assert plot.stat().st_size > 0
    assert "GET /health" in health[0][1] and [r[0].strip() for r in health[1:]] == ["1", "2"]
    for _, p50, p99, probes in health[1:]:  # /health probed all along, answered in well under a second
        assert int(probes) > 0 and 0 < float(p50) <= float(p99) < 1000, (p50, p99, probes)


def test_bench_compares_the_batch_draw_with_the_seeded_exact_path(triton_server):
    run = subprocess.run(
        [sys.executable, "-m", "tools.bench_bff", "--model", "head", "--sampled",
         "--model-repository", str(triton_server.model_repository),
         "--triton-url", triton_server.grpc_url, "--triton-metrics-url", triton_server.metrics_url,
         "--concurrency", "2", "--requests-per-client", "1", "--rounds", "1", "--max-tokens", "4",
         "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(next(line for line in run.stdout.splitlines() if '"bench_bff_sampled"' in line))
    for figures in (summary["tok_s"]["2"], summary["backend_us_per_token"]["2"]):
        assert set(figures) == {"batch draw", "seeded exact draw"}
        assert all(len(v) == 1 and v[0] > 0 for v in figures.values()), figures


def test_bench_refuses_to_place_a_remote_triton():
    run = subprocess.run([sys.executable, "-m", "tools.bench_bff", "--triton-url", "127.0.0.1:1", "--triton-cpus", "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--triton-cpus places a local Triton" in run.stderr
