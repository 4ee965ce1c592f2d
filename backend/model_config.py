"""
A nanochat model's settings, in two typed groups of core/config_fields.py's fields (one default, one range
and one line of documentation each), and the one function that writes config.pbtxt.

- EngineConfig: how the backend schedules (queue, prefill chunk, stream interval). These are config.pbtxt
  parameters, so an operator can change them without re-exporting; written by config_pbtxt(), read by the
  backend from the model config Triton hands it.
- ModelShape: what the export fixed (runtime, precision, KV-cache rows and context). The graph or engine
  was built for it, so it lives in metadata.json beside the artifacts and nowhere else.

Standard library only, like backend/protocol.py and core/config_fields.py: the exporter and the tools import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from backend import protocol
from core.config_fields import REQUIRED, check, parse, setting

RUNTIMES = ("onnx", "tensorrt", "sim")  # sim: backend/sim_runner.py, a GPU's step time without a GPU
# 20 updates a second, still a continuous stream to a reader; at 256 streams on the d20-on-H100 simulation it halves
# the messages of 20 ms, and with them the CPU of every hop (docs/benchmarks.md, make bench-sim)
STREAM_INTERVAL_MS = 50
# Every response costs each hop the same CPU (the backend's IPC send, Triton's gRPC write, the BFF's read and SSE
# write: about 0.6 ms of a slow VM's CPU in all), so past this many a second the interval grows with the rows
# running: 50 ms up to 128 streams, 100 ms at 256 (docs/benchmarks.md, make bench-sim)
MAX_RESPONSES_PER_S = 2560
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = setting(64, "requests that may wait for a slot; beyond it a request is refused at once",
                             low=0, high=1_000_000)
    prefill_chunk: int = setting(256, "prompt tokens prefilled per step, so long prompts do not starve decodes",
                                 low=1, high=1_048_576)
    stream_interval: int = setting(1, "tokens per response after the first, which goes out at once (1: every token "
                                      "on its own; 2-4 leave more CPU to the model on CPU-bound hosts)",
                                   low=1, high=1024)
    stream_interval_ms: int = setting(STREAM_INTERVAL_MS, "at most one response per request per this many ms after "
                                      "the first (tokens made in between travel together), so responses grow with "
                                      "time, not tokens; 0: by stream_interval alone", low=0, high=10_000)
    max_responses_per_s: int = setting(MAX_RESPONSES_PER_S, "streaming responses a second, all requests together, "
                                       "past which each request's interval grows beyond stream_interval_ms to "
                                       "(rows running) / this, so the host's work stays bounded under load; 0: no "
                                       "bound", low=0, high=1_000_000)

    prefix_cache: int = setting(1, "1: a finished request's KV stays in its slot, and a prompt that begins with what "
                                   "a free slot holds is placed there and prefilled from where it ends; 0: every "
                                   "prompt is prefilled whole", low=0, high=1)
    tool_timeout_ms: int = setting(10_000, "a tool call's deadline (registry tool channel: web_search, calculator); "
                                           "past it the call's result is a failure and the answer goes on",
                                   low=100, high=600_000)
    unhealthy_after: int = setting(3, "runner failures in a row after which the model reports not ready (and "
                                      "nanochat_healthy 0) until a step succeeds", low=1, high=1_000_000)

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> EngineConfig:
        """From config.pbtxt's parameters (key -> string value); missing keys take the defaults."""
        return cls(**{f.name: parse(cls, f, parameters[f.name], f"config.pbtxt parameter {f.name}")
                      for f in dataclasses.fields(cls) if f.name in parameters})

    def parameters(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ModelShape:
    runtime: str = setting(REQUIRED, "onnx (ONNX Runtime: CPU, or its CUDA provider), tensorrt or sim",
                           choices=RUNTIMES)
    precision: str = setting(REQUIRED, "the graph's precision", choices=PRECISIONS)
    max_seq: int = setting(REQUIRED, "context of each row (prompt + generated tokens)", low=2, high=1_048_576)
    max_slots: int = setting(8, "KV-cache rows: sequences decoded together", low=1, high=4096)
    tool_channel: str = setting(protocol.NANOCHAT_TOOLS, "how the model calls tools: how it was fine-tuned",
                                choices=protocol.TOOL_CHANNELS)

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def from_metadata(cls, meta: dict) -> ModelShape:
        """From the exported metadata.json, which holds these keys among others (tool_channel: since 2026-12-07)."""
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)
                      if f.name in meta or f.name != "tool_channel"})


def config_pbtxt(name: str, kind: str, engine: EngineConfig) -> str:
    """config.pbtxt for the decoupled `nanochat` backend; kind is KIND_CPU or KIND_GPU."""
    dims = lambda d: "[ " + ", ".join(str(x) for x in d) + " ]"
    lines = [f'name: "{name}"', f'backend: "{protocol.BACKEND}"', "max_batch_size: 0",
             "model_transaction_policy {", "  decoupled: true", "}", "input ["]
    tensor = lambda t: f'  {{\n    name: "{t.name}"\n    data_type: {t.triton_type}\n    dims: {dims(t.dims)}\n'
    lines.append(",\n".join(tensor(i) + "    optional: true\n  }" for i in protocol.INPUTS))
    lines += ["]", "output ["]
    lines.append(",\n".join(tensor(o) + "  }" for o in protocol.OUTPUTS))
    lines += ["]", "instance_group [", "  {", "    count: 1", f"    kind: {kind}", "  }", "]"]
    for key, value in engine.parameters().items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"
