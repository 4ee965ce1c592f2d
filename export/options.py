"""
Everything `make export` takes, as one typed object of core/config_fields.py's fields (one default, one check,
one line of help each). The CLI's flags (export/__main__.py) are made from these fields, and so are the
Makefile's variables: an option's variable is its name in capitals (MODEL=, MAX_SLOTS=, FORCE=1), which
`python -m export --env` reads. The engine settings and the serving shape are backend/model_config.py's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from backend.model_config import PRECISIONS, RUNTIMES, EngineConfig, ModelShape
from backend.protocol import NANOCHAT_TOOLS, TOOL_CHANNELS
from core.checkpoint import SOURCES
from core.config import parse_overrides
from core.config_fields import AUTO, check, parse, setting

DEFAULT_SOURCE = "sft"
EXPORT_RUNTIMES = ("auto", *RUNTIMES)
_SHAPE = {f.name: f for f in dataclasses.fields(ModelShape)}


def _bounds(name: str) -> dict:
    """The serving shape's bounds of a field the exporter also takes."""
    return {"low": _SHAPE[name].metadata["low"], "high": _SHAPE[name].metadata["high"]}


@dataclass(frozen=True)
class ExportOptions:
    model: str | None = setting(None, "model tag (nanochat's d<N> folders); default: the largest one found")
    source: str | None = setting(None, f"checkpoint source; default {DEFAULT_SOURCE}, falling back (with a note) to "
                                       "rl, mid, base when there is none", choices=tuple(sorted(SOURCES)))
    step: int | None = setting(None, "checkpoint step; default: the last one")
    checkpoint_dir: str | None = setting(None, "a plain folder with model_<step>.pt/meta_<step>.json instead of "
                                               "the nanochat layout, or a transformers NanoChat folder (config.json, "
                                               "safetensors, tokenizer.json)")
    nanochat_base_dir: str | None = setting(None, "nanochat base dir; default $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    name: str | None = setting(None, "Triton model name; default: the model tag")
    model_repository: str = setting("model_repository", "Triton model repository to write into")
    runtime: str = setting("auto", "auto: tensorrt where a GPU and TensorRT are present, else onnx (ONNX Runtime)",
                           choices=EXPORT_RUNTIMES)
    precision: str = setting("auto", "graph precision; fp16/bf16 keep norms, softmax and softcap in fp32. auto: bf16 "
                                     "for TensorRT on GPUs with bf16 (compute capability 8.0+), fp16 on older GPUs "
                                     "and for ONNX Runtime's CUDA provider, fp32 on CPU", choices=("auto", *PRECISIONS))
    max_slots: int | str = setting(AUTO, _SHAPE["max_slots"].metadata["doc"] + "; auto: as many as the GPU's free "
                                         "memory holds at max_seq after the weights and a margin (printed), "
                                         f"{_SHAPE['max_slots'].default} on CPU",
                                   **_bounds("max_slots"), auto=True)
    max_seq: int | None = setting(None, "context per row; default: the checkpoint's sequence_len",
                                  **_bounds("max_seq"))
    tool_channel: str = setting(NANOCHAT_TOOLS, "how the model calls tools: nanochat (its calculator, special tokens, "
                                          "exactly as nanochat) or registry (samosaChaat's fine-tunes: JSON calls to "
                                          "calculator and web_search, markers as special tokens or as text). A "
                                          "checkpoint does not say how it was fine-tuned, so it is chosen here",
                                choices=TOOL_CHANNELS)
    overrides: tuple[str, ...] = setting((), "key=value for a model constant the checkpoint's files cannot tell "
                                             "(e.g. softcap=20 for late-G2 checkpoints); repeatable",
                                         sep=None)
    engine: EngineConfig = field(default_factory=EngineConfig)  # config.pbtxt's parameters, flattened in the CLI
    force: bool = setting(False, "replace an existing, different model of that name")
    verify: bool = setting(True, "run the graph once under ONNX Runtime against PyTorch (--no-verify skips it)")

    def __post_init__(self) -> None:
        check(self, variable)  # max_seq only when given (None: the checkpoint's)
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


def fields() -> list[tuple[type, dataclasses.Field]]:
    """Every option the CLI and the Makefile take, with the class that declares it: ExportOptions' own and the
    engine's, flattened."""
    own = [(ExportOptions, f) for f in dataclasses.fields(ExportOptions) if f.name != "engine"]
    return own + [(EngineConfig, f) for f in dataclasses.fields(EngineConfig)]


def variable(f: dataclasses.Field) -> str:
    """An option's environment (and make) variable: its name in capitals."""
    return f.name.upper()


def from_env(env: dict[str, str] | None = None) -> dict[str, object]:
    """The options set as environment variables (how make passes MODEL=... to the CLI), parsed; a repeatable
    option's variable holds its values separated by spaces (OVERRIDES="softcap=20 rope_bf16=0")."""
    env = os.environ if env is None else env
    return {f.name: parse(cls, f, env[variable(f)], variable(f)) for cls, f in fields() if env.get(variable(f))}
