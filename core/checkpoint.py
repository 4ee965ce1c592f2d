"""
Finding and loading nanochat checkpoints of any architecture generation. Discovery is nanochat's checkpoint_manager
($NANOCHAT_BASE_DIR, source, model tag, step); a plain folder of model_<step>.pt or a Hugging Face NanoChat folder
(core/hf_checkpoint.py) works too. Loading is not nanochat's strict loader, which knows only the current generation:
the keys say the generation, and must be exactly what it holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.config import ModelConfig, build_config

SOURCES = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
ORIG_MOD_PREFIX = "_orig_mod."
TOKENIZER_FILE = "tokenizer.pkl"  # nanochat's pickled tiktoken.Encoding (its tokenizer/ folder)
NANOCHAT, TRANSFORMERS = "nanochat", "transformers"  # CheckpointRef.format


class CheckpointError(Exception):
    """A checkpoint could not be found or read; the message says why and what was found instead."""


@dataclass(frozen=True)
class CheckpointRef:
    """Where one checkpoint's files are."""

    directory: Path
    step: int | None  # None for a transformers folder, which has no steps
    tokenizer_path: Path  # tokenizer.pkl, or a transformers folder's tokenizer.json
    source: str | None  # base|mid|sft|rl, or None for a plain directory
    model_tag: str
    format: str = NANOCHAT  # nanochat (model_<step>.pt + meta json) or transformers (core/hf_checkpoint.py)

    @property
    def model_path(self) -> Path:
        self._nanochat_only("model_path")
        return self.directory / f"model_{self.step:06d}.pt"

    @property
    def meta_path(self) -> Path:
        self._nanochat_only("meta_path")
        return self.directory / f"meta_{self.step:06d}.json"

    @property
    def checkpoint_path(self) -> Path:
        """What names the checkpoint: its model_<step>.pt, or the transformers folder."""
        return self.directory if self.format == TRANSFORMERS else self.model_path

    @property
    def config_path(self) -> Path:
        """The file that gives the model's sizes: the meta json, or config.json."""
        from core.hf_checkpoint import CONFIG_FILE

        return self.directory / CONFIG_FILE if self.format == TRANSFORMERS else self.meta_path

    def _nanochat_only(self, name: str) -> None:
        if self.format != NANOCHAT:
            raise CheckpointError(f"{self.directory} is a {self.format} folder: it has no {name}")


def base_dir() -> Path:
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def list_tags(checkpoints_dir: Path) -> list[str]:
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p.name for p in checkpoints_dir.iterdir() if p.is_dir())


def largest_tag(checkpoints_dir: Path) -> str:
    """nanochat's find_largest_model: the largest d<N> prefix, else the newest directory."""
    tags = list_tags(checkpoints_dir)
    if not tags:
        raise CheckpointError(f"no model directories in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.match(r"d(\d+)", t))]
    if depths:
        return max(depths, key=lambda d: d[0])[1]
    return max(tags, key=lambda t: (checkpoints_dir / t).stat().st_mtime)


def list_steps(directory: Path) -> list[int]:
    steps = []
    for p in directory.glob("model_*.pt"):
        m = re.search(r"model_(\d+)\.pt$", p.name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_tokenizer(directory: Path, nanochat_base: Path | None = None) -> Path:
    """A tokenizer beside the checkpoint wins; then a shared folder next to it (samosaChaat's <storage>/<tag>
    layout); then the global one."""
    candidates = [
        directory / TOKENIZER_FILE,
        directory / "tokenizer" / TOKENIZER_FILE,
        directory.parent / "tokenizer" / TOKENIZER_FILE,
        directory.parent / TOKENIZER_FILE,
    ]
    if nanochat_base is not None:
        candidates.append(nanochat_base / "tokenizer" / TOKENIZER_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        "no tokenizer.pkl found; looked in: " + ", ".join(str(c) for c in candidates)
    )


def find_checkpoint(
    source: str | None = "base",
    model_tag: str | None = None,
    step: int | None = None,
    checkpoint_dir: str | Path | None = None,
    nanochat_base: str | Path | None = None,
) -> CheckpointRef:
    """Resolve a checkpoint the way nanochat does, or from a plain directory when one is given."""
    base = Path(nanochat_base) if nanochat_base is not None else base_dir()
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir).expanduser()
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory does not exist: {directory}")
        tag = model_tag or directory.name
        src = None
    else:
        if source not in SOURCES:
            raise CheckpointError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
        root = base / SOURCES[source]
        if not root.is_dir():
            raise CheckpointError(f"no {source} checkpoints: {root} does not exist")
        tags = list_tags(root)
        tag = model_tag or largest_tag(root)
        if tag not in tags:
            raise CheckpointError(f"unknown model tag {tag!r} in {root}; tags found: {', '.join(tags) or 'none'}")
        directory = root / tag
        src = source
    from core.hf_checkpoint import TOKENIZER_JSON, is_transformers_folder

    if is_transformers_folder(directory):
        if step is not None:
            raise CheckpointError(f"{directory} is a transformers folder, which has no steps; step {step} was asked")
        if not (directory / TOKENIZER_JSON).is_file():
            raise CheckpointError(f"no {TOKENIZER_JSON} in the transformers folder {directory}")
        return CheckpointRef(directory, None, directory / TOKENIZER_JSON, src, tag, TRANSFORMERS)
    steps = list_steps(directory)
    if not steps:
        raise CheckpointError(f"no model_<step>.pt files in {directory}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"step {step} not found in {directory}; steps found: {steps}")
    ref = CheckpointRef(directory, step, find_tokenizer(directory, base), src, tag)
    if not ref.meta_path.is_file():
        raise CheckpointError(f"missing meta file {ref.meta_path} for {ref.model_path}")
    return ref


# --- generation detection -------------------------------------------------------------------------


def detect_generation(state_dict: dict) -> str:
    """G0..G4 from the keys and the VE gate's shape (notes section 2.8)."""
    keys = set(state_dict)
    if "bigram_embed.embed.weight" in keys:
        raise CheckpointError(
            "engram checkpoint (bigram_embed.embed.weight, nanochat c88bbf8..74554be, one day in "
            "Jan 2026) is not supported"
        )
    if "smear_gate.weight" in keys:
        return "G4"
    ve_gates = [k for k in keys if k.endswith("attn.ve_gate.weight")]
    if any(k.startswith("value_embeds.") for k in keys) or ve_gates:
        width = state_dict[ve_gates[0]].shape[1] if ve_gates else None
        return "G3" if width == 12 else "G2"
    if "resid_lambdas" in keys:
        return "G1"
    return "G0"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this generation must hold, with its shape."""
    C, L, D = cfg.n_embd, cfg.n_layer, cfg.head_dim
    H, Hkv, Vp = cfg.n_head, cfg.n_kv_head, cfg.padded_vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (Vp, C),
        "lm_head.weight": (Vp, C),
    }
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (H * D, C)
        shapes[p + "attn.c_k.weight"] = (Hkv * D, C)
        shapes[p + "attn.c_v.weight"] = (Hkv * D, C)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "mlp.c_fc.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.weight"] = (C, 4 * C)
        if cfg.has_ve(i):
            shapes[f"value_embeds.{i}.weight"] = (Vp, Hkv * D)
            shapes[p + "attn.ve_gate.weight"] = (Hkv, cfg.ve_gate_channels)
    if cfg.lambdas:
        shapes["resid_lambdas"] = (L,)
        shapes["x0_lambdas"] = (L,)
    if cfg.smear:
        shapes["smear_gate.weight"] = (1, 24)
        shapes["smear_lambda"] = (1,)
    if cfg.backout:
        shapes["backout_lambda"] = (1,)
    return shapes


def check_state_dict(state_dict: dict, cfg: ModelConfig) -> None:
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = [f"checkpoint does not fit generation {cfg.generation}"]
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        if wrong:
            parts.append(f"wrong shapes: {wrong}")
        raise CheckpointError("; ".join(parts))


# --- loading ----------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    ref: CheckpointRef
    config: ModelConfig
    state_dict: dict  # fp32 tensors under nanochat's names, prefix stripped
    meta: dict  # the meta json, or a transformers folder's config.json


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read meta file {path}: {e}") from e
    if "model_config" not in meta:
        raise CheckpointError(f"meta file {path} has no model_config")
    return meta


def read_state_dict(path: Path) -> dict:
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged zip/pickle
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or not a torch file): {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict (got {type(raw).__name__})")
    # torch.compile adds _orig_mod.; strip the prefix (not characters, as nanochat's first loader did)
    # and serve in fp32 on CPU, like nanochat's loader does for bf16 embeddings.
    return {k.removeprefix(ORIG_MOD_PREFIX): v.float() for k, v in raw.items()}


def load_checkpoint(ref: CheckpointRef, **overrides) -> LoadedCheckpoint:
    """Read the files of `ref`, detect the generation, check every key and shape."""
    if ref.format == TRANSFORMERS:
        from core.hf_checkpoint import read_folder

        cfg, state_dict, hf_config = read_folder(ref.directory, **overrides)
        return LoadedCheckpoint(ref, cfg, state_dict, hf_config)
    meta = read_meta(ref.meta_path)
    state_dict = read_state_dict(ref.model_path)
    generation = overrides.pop("generation", None) or detect_generation(state_dict)
    wte = state_dict.get("transformer.wte.weight")
    if wte is None:
        raise CheckpointError(f"checkpoint {ref.model_path} has no transformer.wte.weight")
    cfg = build_config(generation, meta["model_config"], padded_vocab_size=wte.shape[0], **overrides)
    if cfg.padded_vocab_size < cfg.vocab_size:
        raise CheckpointError(
            f"embedding has {cfg.padded_vocab_size} rows but meta vocab_size is {cfg.vocab_size}"
        )
    check_state_dict(state_dict, cfg)
    return LoadedCheckpoint(ref, cfg, state_dict, meta)


def open_checkpoint(ref: CheckpointRef, **overrides):
    """Load a checkpoint and its tokenizer, and check that they belong together.

    Returns (LoadedCheckpoint, Tokenizer)."""
    from core.tokenizer import Tokenizer

    loaded = load_checkpoint(ref, **overrides)
    try:
        tokenizer = Tokenizer.load(ref.tokenizer_path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if tokenizer.vocab_size != loaded.config.vocab_size:
        raise CheckpointError(
            f"tokenizer {ref.tokenizer_path} has {tokenizer.vocab_size} tokens but the checkpoint's "
            f"vocab_size ({ref.config_path}) is {loaded.config.vocab_size}: they do not belong together"
        )
    return loaded, tokenizer


def save_tokenizer(ref: CheckpointRef, tokenizer, path: Path) -> None:
    """The checkpoint's tokenizer as nanochat's tokenizer.pkl at `path`: nanochat's own file byte for byte, a
    transformers folder's tokenizer.json as the encoding it was read into."""
    if ref.format == TRANSFORMERS:
        tokenizer.save(path)
    else:
        shutil.copyfile(ref.tokenizer_path, path)
