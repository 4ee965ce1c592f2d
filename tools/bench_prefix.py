"""
`python -m tools.bench_prefix` (`make bench-prefix`): what prefix caching saves a chat. Conversations of ten
turns go through the BFF's /generate as the gateway sends them (the whole history every turn, greedy), and the
time to the first token of each turn is measured, first with the model as exported (prefix caching on), then
with the same artifacts under `prefix_cache 0`, each behind a local Triton and BFF of its own; the table puts
them side by side by turn. With the cache a turn prefills only its new tokens, so its TTFT stays near the
first turn's; without it, every turn prefills the whole history again. --system-words puts a system message
first, as the gateway sends its own (cut from the demo corpus).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import httpx

from core.random_checkpoint import CORPUS
from tools.bff_client import bff_process, generate_sse, stats, triton_settings
from tools.local_triton import LocalTriton, derive_model

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Tell me about the sea.",
             "What do cats eat?", "How far is the moon?"]


def conversations(url: str, turns: int, count: int, max_tokens: int, system: str = "") -> list[list[float]]:
    """TTFT (ms) of every turn of `count` conversations, one after another."""
    out = []
    with httpx.Client(timeout=120) as client:
        for c in range(count):
            messages, ttft = [{"role": "system", "content": f"({c}) {system}"}] if system else [], []
            for t in range(turns):
                messages.append({"role": "user", "content": f"{QUESTIONS[(c + t) % len(QUESTIONS)]} ({c}.{t})"})
                answer = generate_sse(client, url, {"messages": messages, "temperature": 0.0,
                                                    "max_tokens": max_tokens})
                ttft.append(answer.first_s * 1000)
                messages.append({"role": "assistant", "content": answer.text})
            out.append(ttft)
    return out


def measure(repository: Path, model: str, a: argparse.Namespace) -> tuple[list[float], dict]:
    """Median TTFT (ms) per turn with `model` served, and the BFF's /stats prefix-cache summary."""
    with LocalTriton(repository, load=[model]) as triton, \
            bff_process(**triton_settings(triton, model=model)) as (_, url):
        conversations(url, 2, 1, a.max_tokens)  # warm-up
        system = " ".join(CORPUS.read_text(encoding="utf-8").split()[: a.system_words])
        runs = conversations(url, a.turns, a.conversations, a.max_tokens, system)
        cache = stats(url)["triton"]["prefix_cache"]
    per_turn = [statistics.median(r[t] for r in runs) for t in range(a.turns)]
    return per_turn, cache


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.bench_prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--conversations", type=int, default=3, help="conversations per setting (medians per turn)")
    p.add_argument("--max-tokens", type=int, default=24, help="answer length per turn (greedy)")
    p.add_argument("--system-words", type=int, default=0, help="a system message of this many words first (0: none)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)  # the user's repository stays as it is: the cold copy links its artifacts
        (repository / a.model).symlink_to((a.model_repository / a.model).resolve())
        cold = derive_model(repository, a.model, f"{a.model}_cold", prefix_cache=0).name
        on, on_cache = measure(repository, a.model, a)
        off, _ = measure(repository, cold, a)
    print(f"model {a.model}: {a.conversations} conversations of {a.turns} turns through the BFF, greedy, "
          f"{a.max_tokens} tokens per answer, a system message of {a.system_words} words; median TTFT per turn")
    print("| turn | cache on ms | cache off ms |\n|---:|---:|---:|")
    for t in range(a.turns):
        print(f"| {t + 1} | {on[t]:.1f} | {off[t]:.1f} |")
    print(f"\nturn {a.turns} / turn 1: cache on {on[-1] / on[0]:.2f}x, cache off {off[-1] / off[0]:.2f}x "
          f"(target: at most 1.5x with the cache)")
    print(f"prefix cache with it on: {on_cache}")


if __name__ == "__main__":
    main()
