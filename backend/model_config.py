"""
A nanochat model's settings, in two typed groups with one default, one range and one line of documentation
each, and the one function that writes config.pbtxt.

- EngineConfig: how the backend schedules (queue, prefill chunk, stream interval). These are config.pbtxt
  parameters, so an operator can change them without re-exporting; written by config_pbtxt(), read by the
  backend from the model config Triton hands it.
- ModelShape: what the export fixed (runtime, precision, KV-cache rows and context). The graph or engine
  was built for it, so it lives in metadata.json beside the artifacts and nowhere else.

Standard library only, like backend/protocol.py: the exporter and the tools import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from backend import protocol

RUNTIMES = ("onnx", "tensorrt", "sim")  # sim: backend/sim_runner.py, a GPU's step time without a GPU
# 20 updates a second, still a continuous stream to a reader; at 256 streams on the d20-on-H100 simulation it halves
# the messages of 20 ms, and with them the CPU of every hop (docs/benchmarks.md, make bench-sim)
STREAM_INTERVAL_MS = 50
PRECISIONS = ("fp32", "fp16", "bf16")


def knob(default: int | None, low: int, high: int, doc: str):
    """A setting: its default (None: none), inclusive range and one line of documentation (the CLI's help)."""
    kw = {} if default is None else {"default": default}
    return field(**kw, metadata={"range": (low, high), "doc": doc})


AUTO = "auto"  # a setting the exporter works out for the machine (ExportOptions fields marked auto=True)


def check_ranges(obj: object) -> None:
    for f in dataclasses.fields(obj):
        low, high = f.metadata.get("range", (None, None))
        value = getattr(obj, f.name)
        if value == AUTO and f.metadata.get("auto"):
            continue
        if low is not None and value is not None and not (isinstance(value, int) and low <= value <= high):
            raise ValueError(f"{f.name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = knob(64, 0, 1_000_000, "requests that may wait for a slot; beyond it a request is refused "
                                             "at once")
    prefill_chunk: int = knob(256, 1, 1_048_576, "prompt tokens prefilled per step, so long prompts do not starve "
                                                  "decodes")
    stream_interval: int = knob(1, 1, 1024, "tokens per response after the first, which goes out at once (1: every "
                                            "token on its own; 2-4 leave more CPU to the model on CPU-bound hosts)")
    stream_interval_ms: int = knob(STREAM_INTERVAL_MS, 0, 10_000,
                                   "at most one response per request per this many ms after the first (tokens "
                                   "made in between travel together), so responses grow with time, not tokens; "
                                   "0: by stream_interval alone")

    prefix_cache: int = knob(1, 0, 1, "1: a finished request's KV stays in its slot, and a prompt that begins with "
                                      "what a free slot holds is placed there and prefilled from where it ends; 0: "
                                      "every prompt is prefilled whole")
    tool_timeout_ms: int = knob(10_000, 100, 600_000, "a tool call's deadline (registry tool channel: web_search, "
                                                      "calculator); past it the call's result is a failure and the "
                                                      "answer goes on")
    unhealthy_after: int = knob(3, 1, 1_000_000, "runner failures in a row after which the model reports not ready "
                                                 "(and nanochat_healthy 0) until a step succeeds")

    def __post_init__(self) -> None:
        check_ranges(self)

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> EngineConfig:
        """From config.pbtxt's parameters (key -> string value); missing keys take the defaults."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in parameters:
                try:
                    values[f.name] = int(parameters[f.name])
                except ValueError:
                    raise ValueError(f"config.pbtxt parameter {f.name} must be an integer, got "
                                     f"{parameters[f.name]!r}") from None
        return cls(**values)

    def parameters(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ModelShape:
    runtime: str  # onnx (ONNX Runtime: CPU, or its CUDA provider) or tensorrt
    precision: str  # the graph's: fp32, fp16 or bf16
    max_seq: int = knob(None, 2, 1_048_576, "context of each row (prompt + generated tokens)")
    max_slots: int = knob(8, 1, 4096, "KV-cache rows: sequences decoded together")
    tool_channel: str = protocol.NANOCHAT_TOOLS  # how the model calls tools: how it was fine-tuned

    def __post_init__(self) -> None:
        if self.tool_channel not in protocol.TOOL_CHANNELS:
            raise ValueError(f"tool_channel must be one of {protocol.TOOL_CHANNELS}, got {self.tool_channel!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_ranges(self)

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
