"""
Everything `make export` takes, as one typed object: each option has one default, one check and one line of
help. The CLI's flags (export/__main__.py) are made from these fields, and so are the Makefile's variables:
an option's variable is its name in capitals (MODEL=, MAX_SLOTS=, FORCE=1), which make hands to the CLI's
environment and `python -m export --env` reads. The engine settings that go into config.pbtxt and the
serving shape are backend/model_config.py's, with their defaults and ranges.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from backend.model_config import AUTO, PRECISIONS, RUNTIMES, EngineConfig, ModelShape, check_ranges
from backend.protocol import NANOCHAT_TOOLS, TOOL_CHANNELS
from core.checkpoint import SOURCES
from core.config import parse_overrides

DEFAULT_SOURCE = "sft"
EXPORT_RUNTIMES = ("auto", *RUNTIMES)
_SHAPE = {f.name: f for f in dataclasses.fields(ModelShape)}


def option(default, doc: str, choices: tuple[str, ...] | None = None, **metadata):
    return field(default=default, metadata={"doc": doc, "choices": choices, **metadata})


@dataclass(frozen=True)
class ExportOptions:
    model: str | None = option(None, "model tag (nanochat's d<N> folders); default: the largest one found")
    source: str | None = option(None, f"checkpoint source; default {DEFAULT_SOURCE}, falling back (with a note) to "
                                      "rl, mid, base when there is none", choices=tuple(sorted(SOURCES)))
    step: int | None = option(None, "checkpoint step; default: the last one")
    checkpoint_dir: str | None = option(None, "a plain folder with model_<step>.pt/meta_<step>.json instead of "
                                              "the nanochat layout, or a transformers NanoChat folder (config.json, "
                                              "safetensors, tokenizer.json)")
    nanochat_base_dir: str | None = option(None, "nanochat base dir; default $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    name: str | None = option(None, "Triton model name; default: the model tag")
    model_repository: str = option("model_repository", "Triton model repository to write into")
    runtime: str = option("auto", "auto: tensorrt where a GPU and TensorRT are present, else onnx (ONNX Runtime)",
                          choices=EXPORT_RUNTIMES)
    precision: str = option("auto", "graph precision; fp16/bf16 keep norms, softmax and softcap in fp32. auto: bf16 "
                                    "for TensorRT on GPUs with bf16 (compute capability 8.0+), fp16 on older GPUs "
                                    "and for ONNX Runtime's CUDA provider, fp32 on CPU", choices=("auto", *PRECISIONS))
    max_slots: int | str = option(AUTO, _SHAPE["max_slots"].metadata["doc"] + "; auto: as many as the GPU's free "
                                        "memory holds at max_seq after the weights and a margin (printed), "
                                        f"{_SHAPE['max_slots'].default} on CPU",
                                  range=_SHAPE["max_slots"].metadata["range"], auto=True)
    max_seq: int | None = option(None, "context per row; default: the checkpoint's sequence_len",
                                 range=_SHAPE["max_seq"].metadata["range"])
    tool_channel: str = option(NANOCHAT_TOOLS, "how the model calls tools: nanochat (its calculator, special tokens, "
                                         "exactly as nanochat) or registry (samosaChaat's fine-tunes: JSON calls to "
                                         "calculator and web_search, markers as special tokens or as text). A "
                                         "checkpoint does not say how it was fine-tuned, so it is chosen here",
                               choices=TOOL_CHANNELS)
    overrides: tuple[str, ...] = option((), "key=value for a model constant the checkpoint's files cannot tell "
                                            "(e.g. softcap=20 for late-G2 checkpoints); repeatable",
                                        multiple=True)
    engine: EngineConfig = field(default_factory=EngineConfig)  # config.pbtxt's parameters, flattened in the CLI
    force: bool = option(False, "replace an existing, different model of that name")
    verify: bool = option(True, "run the graph once under ONNX Runtime against PyTorch (--no-verify skips it)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name.upper()} must be one of {', '.join(choices)}, not {value!r}")
        check_ranges(self)  # max_slots; max_seq only when given (None: the checkpoint's)
        parse_overrides(list(self.overrides))  # ValueError naming a bad one, before any work

    def replace(self, **changes) -> ExportOptions:
        """A copy with some options changed; engine settings (max_queue=...) go into `engine`."""
        engine_names = {f.name for f in dataclasses.fields(EngineConfig)}
        engine = {k: changes.pop(k) for k in list(changes) if k in engine_names}
        if engine:
            changes["engine"] = dataclasses.replace(self.engine, **engine)
        return dataclasses.replace(self, **changes)


def options(**values) -> ExportOptions:
    """ExportOptions with any option given by name, the engine's settings (max_queue=...) included."""
    return ExportOptions().replace(**values)


def fields() -> list[dataclasses.Field]:
    """Every option the CLI and the Makefile take: ExportOptions' own and the engine's, flattened."""
    own = [f for f in dataclasses.fields(ExportOptions) if f.name != "engine"]
    return own + list(dataclasses.fields(EngineConfig))


def from_env(env: dict[str, str] | None = None) -> dict[str, str | list[str]]:
    """The options set as environment variables named in capitals (how make passes MODEL=... to the CLI);
    a repeatable option's variable holds its values separated by spaces (OVERRIDES="softcap=20 rope_bf16=0")."""
    env = os.environ if env is None else env
    return {f.name: env[f.name.upper()].split() if f.metadata.get("multiple") else env[f.name.upper()]
            for f in fields() if env.get(f.name.upper(), "") != ""}
