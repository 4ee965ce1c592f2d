"""
`python -m tools.bench_ecosystem` (`make bench-aiperf`): the ecosystem's own benchmarks against our doors, offline.

- NVIDIA AIPerf (OpenAI-first, genai-perf's successor) profiles the BFF's `POST /v1/chat/completions`, streamed,
  as it profiles vLLM or trtllm-serve;
- genai-perf (with perf_analyzer) profiles Triton's own `generate_stream` with `text_input`, as it profiles the
  vLLM and TensorRT-LLM backends (`--endpoint-type generate`, pointed at generate_stream: with --streaming it
  would call /generate, which answers one response only).

Each tool lives in an environment of its own (their pins clash with ours and with each other; the Makefile
builds them) and prints its own TTFT / ITL / throughput table. Both count tokens with the model's own tokenizer,
converted to Hugging Face's format by transformers (tools/hf_tokenizer.py), so nothing is downloaded: AIPerf's
`builtin` tokenizer and any hub name would fetch files. A local Triton with the model and a BFF in front of it
are started here and stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.bff_client import KEY, bff_process, triton_settings
from tools.local_triton import LocalTriton


def hf_tokenizer(python: Path, version_dir: Path, out: Path) -> Path:
    """The model's tokenizer in Hugging Face's format, converted by `python` (an environment with transformers)."""
    subprocess.run([str(python), "-m", "tools.hf_tokenizer", str(version_dir), str(out)], check=True,
                   stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    return out


def load_args(a: argparse.Namespace) -> list[str]:
    """The load both tools generate: synthetic prompts of a mean length, answers of a mean length."""
    return ["--synthetic-input-tokens-mean", str(a.input_tokens), "--output-tokens-mean", str(a.output_tokens),
            "--concurrency", str(a.concurrency), "--request-count", str(a.requests)]


def run_aiperf(aiperf: Path, bff_url: str, a: argparse.Namespace, tokenizer: Path, out: Path) -> None:
    subprocess.run([str(aiperf), "profile", "--model", a.model, "--url", bff_url, "--endpoint-type", "chat",
                    "--streaming", "--api-key", KEY, "--tokenizer", str(tokenizer), "--random-seed", "1",
                    "--no-auto-plot", "--output-artifact-dir", str(out / "aiperf"), *load_args(a)], check=True)


def run_genai_perf(genai_perf: Path, triton: LocalTriton, a: argparse.Namespace, tokenizer: Path, out: Path) -> None:
    env_bin = genai_perf.parent
    perf_analyzer = env_bin / "perf_analyzer"  # the binary tritonclient's wheel carries
    libs = next(env_bin.parent.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"), None)
    env = {**os.environ, "PATH": f"{env_bin}{os.pathsep}{os.environ['PATH']}",
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libs or ""), os.environ.get("LD_LIBRARY_PATH")]))}
    missing = [line.split()[0] for line in subprocess.run(["ldd", str(perf_analyzer)], env=env, capture_output=True,
                                                          text=True).stdout.splitlines() if "not found" in line]
    if missing:
        sys.exit(f"perf_analyzer cannot start, missing {missing}: libb64 comes from Debian's libb64-0d "
                 "(apt-get install libb64-0d); libcudart from the nvidia-cuda-runtime-cu12 wheel the Makefile installs")
    host = triton.http_url.removeprefix("http://")
    subprocess.run([str(genai_perf), "profile", "-m", a.model, "--endpoint-type", "generate",
                    "--endpoint", f"v2/models/{a.model}/generate_stream", "-u", host, "--streaming",
                    "--tokenizer", str(tokenizer), "--artifact-dir", str(out / "genai-perf"), *load_args(a)],
                   check=True, env=env)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.bench_ecosystem", description=__doc__.split("\n\n")[0])
    p.add_argument("--aiperf", type=Path, required=True, help="the aiperf command of its environment")
    p.add_argument("--genai-perf", type=Path, help="the genai-perf command of its environment (default: skip it)")
    p.add_argument("--model", default="demo")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--input-tokens", type=int, default=64, help="mean prompt length")
    p.add_argument("--output-tokens", type=int, default=32, help="mean answer length (max_tokens)")
    p.add_argument("--out", type=Path, default=Path("build/bench_ecosystem"), help="the tools' artifacts")
    a = p.parse_args(argv)
    version_dir = a.model_repository / a.model / "1"
    shutil.rmtree(a.out, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        tokenizer = hf_tokenizer(a.aiperf.parent / "python", version_dir,
                                 Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tokenizer")
        triton = stack.enter_context(LocalTriton(a.model_repository, load=[a.model]))
        _, bff_url = stack.enter_context(bff_process(**triton_settings(triton, model=a.model)))
        print(f"== AIPerf {a.aiperf} -> {bff_url}/v1/chat/completions (the BFF's OpenAI surface)", flush=True)
        run_aiperf(a.aiperf, bff_url, a, tokenizer, a.out)
        if a.genai_perf:
            print(f"== genai-perf -> {triton.http_url}/v2/models/{a.model}/generate_stream (Triton)", flush=True)
            run_genai_perf(a.genai_perf, triton, a, tokenizer, a.out)


if __name__ == "__main__":
    main()
