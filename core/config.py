"""
A nanochat checkpoint's architecture generation (G0..G4) and its constants. Several constants changed without
changing any state-dict key, so a checkpoint is read in two steps: the keys and shapes say the generation, the
generation says the constants. Each constant is a plain field a caller may override where the files are ambiguous
(the late-G2 softcap of 20).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from core.config_fields import boolean

GENERATIONS = ("G0", "G1", "G2", "G3", "G4")
NORM_EPS = 2.0**-23  # F.rms_norm(eps=None) on fp32 = torch.finfo(torch.float32).eps

# Constants tied to each generation and invisible in the files (shared/notes/nanochat-checkpoints.md, section 2.8):
#   G0  original: rotary 1e4, QK norm, relu^2, softcap 15, full causal attention
#   G1  + resid_lambdas / x0_lambdas, sliding windows from window_pattern (short = S//2)
#   G2  + value embeddings on alternate layers, gate 2*sigmoid over 32 channels
#   G3  VE gate 3*sigmoid over 12 channels, QK x1.15, rotary 1e5, short window ceil128(S/3)
#   G4  + smear and backout, QK x1.2, short window ceil128(S/4) (nanochat HEAD, samosaChaat fork)
_GENERATION_CONSTANTS: dict[str, dict] = {
    "G0": dict(rope_base=10000.0, rope_bf16=True, qk_scale=1.0, ve_gate_channels=0, ve_gate_scale=0.0,
               short_window="none", softcap=15.0, smear=False, backout=False, lambdas=False),
    "G1": dict(rope_base=10000.0, rope_bf16=True, qk_scale=1.0, ve_gate_channels=0, ve_gate_scale=0.0,
               short_window="half", softcap=15.0, smear=False, backout=False, lambdas=True),
    "G2": dict(rope_base=10000.0, rope_bf16=True, qk_scale=1.0, ve_gate_channels=32, ve_gate_scale=2.0,
               short_window="half", softcap=15.0, smear=False, backout=False, lambdas=True),
    "G3": dict(rope_base=100000.0, rope_bf16=False, qk_scale=1.15, ve_gate_channels=12, ve_gate_scale=3.0,
               short_window="third", softcap=15.0, smear=False, backout=False, lambdas=True),
    "G4": dict(rope_base=100000.0, rope_bf16=False, qk_scale=1.2, ve_gate_channels=12, ve_gate_scale=3.0,
               short_window="quarter", softcap=15.0, smear=True, backout=True, lambdas=True),
}
SMEAR_CHANNELS = 24


def _ceil128(x: float) -> int:
    return math.ceil(x / 128) * 128


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs besides the weights."""

    generation: str
    sequence_len: int
    vocab_size: int  # V from the meta json; logits are cropped to it
    padded_vocab_size: int  # rows of wte / lm_head (V rounded up to 64 on newer checkpoints)
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str | None  # None for G0, which had no windows at all
    rope_base: float
    rope_bf16: bool  # G0-G2 rounded cos/sin to bf16 even on CPU (until nanochat 1076f97)
    qk_scale: float
    ve_gate_channels: int  # 0: no value embeddings
    ve_gate_scale: float
    short_window: str  # none | half | third | quarter
    softcap: float | None  # None: no softcap (a transformers config's null final_logit_softcapping)
    smear: bool
    backout: bool
    lambdas: bool
    norm_eps: float = NORM_EPS

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rope_len(self) -> int:
        return 10 * self.sequence_len  # nanochat precomputes rotary tables for 10x the context

    def has_ve(self, layer: int) -> bool:
        """Value embeddings sit on alternate layers, always including the last one."""
        return self.ve_gate_channels > 0 and layer % 2 == (self.n_layer - 1) % 2

    @property
    def backout_layer(self) -> int:
        return self.n_layer // 2

    def window_sizes(self) -> list[int | None]:
        """Left attention window per layer (a query at p sees keys p-W..p); None means unlimited."""
        if self.window_pattern is None:
            return [None] * self.n_layer
        S = self.sequence_len
        short = {
            "half": S // 2,
            "third": _ceil128(math.ceil(S / 3)),
            "quarter": _ceil128(math.ceil(S / 4)),
        }.get(self.short_window)
        pattern = self.window_pattern.upper()
        sizes: list[int | None] = []
        for i in range(self.n_layer):
            char = pattern[i % len(pattern)]
            if char not in "SL":
                raise ValueError(f"window_pattern {self.window_pattern!r} may hold only 'S' and 'L'")
            sizes.append(short if char == "S" and short is not None else S)
        sizes[-1] = S  # the last layer is always long
        return sizes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_config(generation: str, model_config: dict, padded_vocab_size: int, **overrides) -> ModelConfig:
    """Combine the meta json's model_config with the generation's constants and any overrides."""
    consts = dict(_GENERATION_CONSTANTS[generation])
    window_pattern = None if generation == "G0" else model_config.get("window_pattern") or "L"
    fields = dict(
        generation=generation,
        sequence_len=int(model_config["sequence_len"]),
        vocab_size=int(model_config["vocab_size"]),
        padded_vocab_size=int(padded_vocab_size),
        n_layer=int(model_config["n_layer"]),
        n_head=int(model_config["n_head"]),
        n_kv_head=int(model_config.get("n_kv_head", model_config["n_head"])),
        n_embd=int(model_config["n_embd"]),
        window_pattern=window_pattern,
        **consts,
    )
    unknown = set(overrides) - set(fields) - {"norm_eps"}
    if unknown:
        raise ValueError(f"unknown config override(s): {sorted(unknown)}; known: {sorted(fields)}")
    fields.update(overrides)
    return ModelConfig(**fields)


def parse_overrides(items: list[str]) -> dict:
    """Parse 'key=value' strings (from a CLI) into typed overrides of ModelConfig fields."""
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"bad override {item!r}: expected key=value with key in {sorted(types)}")
        kind = types[key]
        if "None" in kind and raw.lower() == "none":
            out[key] = None
        elif "bool" in kind:
            out[key] = boolean(raw, key)
        elif "float" in kind:
            out[key] = float(raw)
        elif "int" in kind:
            out[key] = int(raw)
        else:
            out[key] = None if raw.lower() == "none" else raw
    return out
