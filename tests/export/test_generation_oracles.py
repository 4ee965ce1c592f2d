"""
Every generation's exported graph under ONNX Runtime against nanochat's own logits (../shared/oracle/
generations): `make export` of each tiny model, then nanochat's Engine-style use of the cache (a prefill, then
one token at a time past the short window) through OrtRunner, within 1e-3. The late-G2 models export right
only with their --override flags (recorded in metadata.json), which tests/core shows they need.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.onnx_runner import OrtRunner
from backend.protocol import METADATA_FILE, ONNX_FILE, VERSION
from export import export_model, options
from tests.oracles import checkpoint_with_tokenizer, generation_oracle, generation_oracles, overrides_of

TOL = 1e-3


def export_and_decode(name: str, tmp_path, overrides: list[str]) -> tuple[float, dict]:
    folder, entry = generation_oracle(name)
    ckpt = checkpoint_with_tokenizer(name, tmp_path / "checkpoint")
    ids, want = np.load(folder / "ids.npy"), np.load(folder / "logits_decode.npy")
    target = export_model(options(checkpoint_dir=ckpt, model_repository=tmp_path / "repo", name="m", runtime="onnx",
                                  max_slots=2, max_seq=len(ids), overrides=tuple(overrides), verify=False),
                          log=lambda _: None)
    runner, slot, prefill = OrtRunner(target / VERSION / ONNX_FILE, 2, len(ids)), np.array([1]), entry["prefill"]
    got = [runner.forward(ids[None, :prefill], np.array([0]), slot)[0]]
    got += [runner.forward(ids[None, p : p + 1], np.array([p]), slot)[0] for p in range(prefill, len(ids))]
    return float(np.abs(np.array(got) - want).max()), json.loads((target / VERSION / METADATA_FILE).read_text())


@pytest.mark.parametrize("name", generation_oracles() or ["missing"])
def test_exported_graph_decodes_as_nanochat(name, tmp_path):
    _, entry = generation_oracle(name)
    err, meta = export_and_decode(name, tmp_path, overrides_of(entry))
    assert err < TOL, f"max |logits - nanochat| = {err:.2e}"
    assert meta["generation"] == entry["generation"] and meta["overrides"] == overrides_of(entry)
