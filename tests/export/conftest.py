"""
Fixtures for the export tests: the nanochat oracles, small random checkpoints of every generation,
and exports made once per session (tracing is the slow part, ~5-10 s a model on two cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support import oracles

GENERATIONS = ("G0", "G1", "G2", "G3", "G4")
# small models; sequence_len 512 puts G3's short window at 256 and G4's at 128, so a 240-token
# prompt plus 32 decode steps runs past the window. G2 uses GQA (4 query heads on 2 kv heads).
DEMO = dict(depth=2, n_embd=64, n_head=2, sequence_len=512)
DEMO_OVERRIDES = {"G2": dict(n_head=4, n_kv_head=2)}


@pytest.fixture(scope="session")
def references():
    return oracles.references


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory) -> Path:
    """A nanochat base dir with one random base checkpoint per generation, tagged g0..g4."""
    from core.random_checkpoint import make_checkpoint

    base = tmp_path_factory.mktemp("nanochat")
    for i, g in enumerate(GENERATIONS):
        make_checkpoint(base, g, tag=g.lower(), source="base", seed=i, **{**DEMO, **DEMO_OVERRIDES.get(g, {})})
    return base


@pytest.fixture(scope="session")
def demo_exports(tmp_path_factory, demo_base):
    """generation -> model folder, exported with export_model (max_slots 3) on first use."""
    from export import export_model, options

    repo, done = tmp_path_factory.mktemp("demo_repository"), {}

    def get(generation: str) -> Path:
        if generation not in done:
            done[generation] = export_model(
                options(model_repository=repo, name=generation.lower(), model=generation.lower(), source="base",
                        nanochat_base_dir=demo_base, runtime="onnx", max_slots=3, verify=False), log=lambda _: None)
        return done[generation]

    return get


@pytest.fixture(scope="session")
def make_export_head(head_export):
    """`make export` on the head oracle, as a user types it (started with the session: tests/conftest.py);
    (completed process, repository, peak resident memory in bytes)."""
    return head_export()


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
