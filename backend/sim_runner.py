"""
A Runner that stands in for a GPU: each step sleeps the time a GPU profile says (core/roofline.py) and returns at
once what a GPU runner would. A sleep releases the GIL as a CUDA call does, so the host's work around it
(scheduling, detokenizing, responses, the server's relays) is measured as on a GPU node. `make bench-sim` serves it
(metadata.json's runtime "sim").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from backend.model_config import EngineConfig, ModelShape, config_pbtxt
from backend.protocol import CONFIG_FILE, METADATA_FILE, TOKENIZER_FILE, VERSION, read_metadata
from core.device_sampling import BatchSampling, Drawn
from core.roofline import PROFILES, GpuProfile
from core.tokenizer import Tokenizer

PROFILE_KEY = "sim_profile"  # metadata.json: the name of the core.roofline profile a sim model steps at


class SimRunner:
    def __init__(self, profile: GpuProfile, max_slots: int, max_seq: int, vocab_size: int, text_ids: np.ndarray,
                 seed: int = 0):
        self.profile, self.max_slots, self.max_seq = profile, max_slots, max_seq
        profile.dense_params()  # the model's shape, worked out now rather than in the first step
        self.prev = None
        self.text_ids = np.asarray(text_ids, dtype=np.int64)  # drawn uniformly: detokenizer and stops do real work
        self.rng = np.random.default_rng(seed)
        # seeded rows' logits: nanochat's draw on the host runs at the vocabulary's size
        self.table = self.rng.standard_normal((max_slots, vocab_size), dtype=np.float32)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        self._wait(input_ids, positions)
        return self.table[: len(input_ids)]

    def step(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, sampling: BatchSampling) -> Drawn:
        self._wait(input_ids, positions)
        n_exact = int(sampling.exact.sum())
        tokens = self.text_ids[self.rng.integers(len(self.text_ids), size=len(input_ids))]
        return Drawn(tokens, self.table[:n_exact] if n_exact else None)

    def _wait(self, input_ids: np.ndarray, positions: np.ndarray) -> None:
        B, T = input_ids.shape
        if int(positions.max()) + T > self.max_seq:
            raise ValueError(f"positions {positions.tolist()} + {T} tokens exceed the cache of {self.max_seq}")
        seconds = self.profile.step_seconds(positions + T, B * T)
        if seconds:
            time.sleep(seconds)


def text_ids(tok: Tokenizer) -> np.ndarray:
    """Ids of ordinary tokens that are whole UTF-8 text (not special, not filler bytes no text encodes to)."""
    special = set(tok.special_ids.values())

    def text(i: int, b: bytes | None) -> bool:
        try:
            return i not in special and b is not None and bool(b.decode("utf-8").strip())
        except UnicodeDecodeError:
            return False

    return np.array([i for i, b in enumerate(tok.byte_table) if text(i, b)], dtype=np.int64)


def load_sim_runner(shape: ModelShape, version_dir: Path) -> SimRunner:
    name = read_metadata(version_dir).get(PROFILE_KEY)
    if name not in PROFILES:
        raise ValueError(f"{version_dir / METADATA_FILE}: {PROFILE_KEY} must be one of {sorted(PROFILES)}, "
                         f"got {name!r}")
    tok = Tokenizer.load(version_dir / TOKENIZER_FILE)
    return SimRunner(PROFILES[name], shape.max_slots, shape.max_seq, tok.vocab_size, text_ids(tok))


def write_sim_model(repository: Path, name: str, tokenizer_file: Path, profile: str, max_slots: int, max_seq: int,
                    engine: EngineConfig) -> Path:
    """A model folder whose runner is SimRunner at `profile`, with a real tokenizer, as the exporter lays one out."""
    version = repository / name / VERSION
    version.mkdir(parents=True, exist_ok=True)
    (version / TOKENIZER_FILE).write_bytes(tokenizer_file.read_bytes())
    meta = {"runtime": "sim", "precision": "bf16", "max_slots": max_slots, "max_seq": max_seq, PROFILE_KEY: profile}
    (version / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    (repository / name / CONFIG_FILE).write_text(config_pbtxt(name, "KIND_CPU", engine))
    return repository / name
