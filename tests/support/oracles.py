"""The shared oracles (tools/paths.py says where): real checkpoints written by nanochat with its own outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.checkpoint import TOKENIZER_FILE
from tools.paths import ORACLE_DIR, ORACLE_TOKENIZER

ORACLES = {"head": ORACLE_DIR / "head", "orig": ORACLE_DIR / "orig"}


def oracle_or_skip(name: str) -> Path:
    path = ORACLES[name]
    if not (path / "references.json").is_file():
        pytest.skip(f"oracle checkpoint {name} not found under {ORACLE_DIR}")
    return path


def references(name: str) -> dict:
    return json.loads((oracle_or_skip(name) / "references.json").read_text())


def oracle_tokenizer() -> Path:
    if not ORACLE_TOKENIZER.is_file():
        pytest.skip(f"oracle tokenizer not found at {ORACLE_TOKENIZER}")
    return ORACLE_TOKENIZER


GENERATIONS_DIR = ORACLE_DIR / "generations"


def generation_oracles() -> list[str]:
    """The folders of ../shared/oracle/generations: one tiny model per nanochat commit that changed the
    forward pass, with the logits nanochat's own code computed for it (its README says how)."""
    index = GENERATIONS_DIR / "index.json"
    return sorted(json.loads(index.read_text())) if index.is_file() else []


def generation_oracle(name: str) -> tuple[Path, dict]:
    """(folder, its index.json entry: generation, commit, overrides, windows, prefill length)."""
    if not (GENERATIONS_DIR / "index.json").is_file():
        pytest.skip(f"generation oracles not found under {GENERATIONS_DIR}")
    return GENERATIONS_DIR / name, json.loads((GENERATIONS_DIR / "index.json").read_text())[name]


def overrides_of(entry: dict) -> list[str]:
    """The index's overrides as the exporter's key=value strings."""
    return [f"{k}={v}" for k, v in entry["overrides"].items()]


def checkpoint_with_tokenizer(name: str, into: Path) -> Path:
    """A copy of a generation oracle's folder with a tokenizer of its vocabulary beside it (the oracles carry
    none; the exporter ships one with every model): single bytes, then nanochat's special tokens."""
    import pickle

    import tiktoken

    from core.tokenizer import SPECIAL_TOKENS

    folder, _ = generation_oracle(name)
    shutil.copytree(folder, into)
    vocab = json.loads((folder / "meta_000000.json").read_text())["model_config"]["vocab_size"]
    plain = vocab - len(SPECIAL_TOKENS)
    enc = tiktoken.Encoding(name="bytes", pat_str=r".", mergeable_ranks={bytes([i]): i for i in range(plain)},
                            special_tokens={s: plain + i for i, s in enumerate(SPECIAL_TOKENS)})
    with open(into / TOKENIZER_FILE, "wb") as f:
        pickle.dump(enc, f)
    return into


def generation_model(name: str, with_overrides: bool = True):
    """(index entry, the core's GPT, the 300 reference ids, the folder) of generation oracle `name`."""
    import numpy as np

    from core.checkpoint import CheckpointRef, load_checkpoint
    from core.config import parse_overrides
    from core.gpt import build_gpt

    folder, entry = generation_oracle(name)
    ref = CheckpointRef(folder, 0, folder / "no-tokenizer", None, name)
    overrides = parse_overrides(overrides_of(entry)) if with_overrides else {}
    loaded = load_checkpoint(ref, **overrides)
    return entry, build_gpt(loaded.config, loaded.state_dict), np.load(folder / "ids.npy"), folder
