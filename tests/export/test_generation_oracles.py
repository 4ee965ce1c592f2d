"""
Every generation's exported graph under ONNX Runtime against nanochat's own logits (../shared/oracle/
generations): `make export` of each tiny model, then nanochat's Engine-style use of the cache (a prefill, then
one token at a time past the short window) through OrtRunner, within 1e-3. The late-G2 models export right
only with their --override flags (recorded in metadata.json), which tests/core shows they need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.onnx_runner import OrtRunner
from backend.protocol import ONNX_FILE, VERSION, read_metadata
from export.tensorrt_rules import problems
from tests.support.oracles import generation_oracle, generation_oracles, overrides_of

TOL = 1e-3


@pytest.fixture(scope="module")
def exported(generation_exports) -> dict[str, Path]:
    """name -> model folder: every generation oracle exported with its overrides (tests/conftest.py)."""
    return generation_exports()


def decode(name: str, target: Path) -> float:
    """nanochat's use of the cache (prefill, then one token at a time) through OrtRunner; max |logit diff|."""
    folder, entry = generation_oracle(name)
    ids, want = np.load(folder / "ids.npy"), np.load(folder / "logits_decode.npy")
    runner, slot, prefill = OrtRunner(target / VERSION / ONNX_FILE, 2, len(ids)), np.array([1]), entry["prefill"]
    got = [runner.forward(ids[None, :prefill], np.array([0]), slot)[0]]
    got += [runner.forward(ids[None, p : p + 1], np.array([p]), slot)[0] for p in range(prefill, len(ids))]
    return float(np.abs(np.array(got) - want).max())


@pytest.mark.parametrize("name", generation_oracles() or ["missing"])
def test_exported_graph_decodes_as_nanochat(name, exported):
    _, entry = generation_oracle(name)
    err = decode(name, exported[name])
    meta = read_metadata(exported[name] / VERSION)
    assert err < TOL, f"max |logits - nanochat| = {err:.2e}"
    assert problems(exported[name] / VERSION / ONNX_FILE) == []  # TensorRT's parser would take it too
    assert meta["generation"] == entry["generation"] and meta["overrides"] == overrides_of(entry)
