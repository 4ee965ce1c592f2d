"""
Session fixtures that start one real Triton server for every test that needs it (backend and BFF).

    oracle_repository  a model repository in a session temp dir with the two nanochat oracle
                       checkpoints exported as "head" (G4) and "orig" (G0), a small demo checkpoint
                       as "demo", and "demo_1slot" (a larger demo model with max_slots 1, max_queue 1)
    triton_server      a runtime.local_triton.LocalTriton over it with all four models loaded;
                       use .grpc_url / .http_url / .metrics_url
    oracle_references  {"head": references.json, "orig": ...} of ../shared/oracle

Tests that use them are skipped when the oracles or the Triton wheel are missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ORACLE = Path(os.environ.get("NANOCHAT_ORACLE_DIR", Path(__file__).resolve().parents[2] / "shared" / "oracle"))
ORACLES = {"head": ORACLE / "head", "orig": ORACLE / "orig"}
DEMO_MAX_SEQ = 256


def export_checkpoint(repository: Path, name: str, nanochat_base: Path, source: str, **settings) -> Path:
    """Export one checkpoint into repository/name with the project's exporter (issue 3)."""
    try:
        from export import export_model
    except ImportError:  # stopgap until issue 3's repository writer lands
        return _stopgap_export(repository, name, nanochat_base, source, **settings)
    return export_model(repository, name, nanochat_base=nanochat_base, source=source, **settings)


_CONFIG = """name: "{name}"
backend: "nanochat"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "messages" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "prompt_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "token_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "device_id" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "prompt_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "completion_tokens" data_type: TYPE_INT32 dims: [ 1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters [
{params}
]
"""


def _stopgap_export(repository: Path, name: str, nanochat_base: Path, source: str, max_slots: int,
                    max_seq: int, max_queue: int, prefill_chunk: int) -> Path:
    import shutil

    from export.graph import export_onnx
    from runtime.checkpoint import find_checkpoint, open_checkpoint
    from runtime.gpt import build_gpt

    ref = find_checkpoint(source, nanochat_base=nanochat_base)
    loaded, _ = open_checkpoint(ref)
    version = repository / name / "1"
    export_onnx(build_gpt(loaded.config, loaded.state_dict), version, max_slots, max_seq, log=lambda *_: None)
    shutil.copy2(ref.tokenizer_path, version / "tokenizer.pkl")
    (version / "metadata.json").write_text(json.dumps({"checkpoint": str(ref.directory), "step": ref.step}))
    params = dict(runtime="onnx", onnx_file="model.onnx", tokenizer_file="tokenizer.pkl",
                  metadata_file="metadata.json", max_slots=max_slots, max_seq=max_seq, max_queue=max_queue,
                  prefill_chunk=prefill_chunk)
    lines = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    (repository / name / "config.pbtxt").write_text(_CONFIG.format(name=name, params=lines))
    return repository / name


@pytest.fixture(scope="session")
def oracle_references() -> dict:
    if not all(p.is_dir() for p in ORACLES.values()):
        pytest.skip(f"oracle checkpoints not found under {ORACLE}")
    return {name: json.loads((p / "references.json").read_text()) for name, p in ORACLES.items()}


@pytest.fixture(scope="session")
def oracle_repository(tmp_path_factory, oracle_references) -> Path:
    from runtime.demo import make_checkpoint

    repo = tmp_path_factory.mktemp("model_repository")
    for name, base in ORACLES.items():
        export_checkpoint(repo, name, base, "base", max_slots=16, max_seq=512, max_queue=64, prefill_chunk=256)
    demo_base = tmp_path_factory.mktemp("demo_checkpoint")
    make_checkpoint(demo_base, "G4", depth=2, n_embd=64, sequence_len=DEMO_MAX_SEQ)
    export_checkpoint(repo, "demo", demo_base, "sft", max_slots=4, max_seq=DEMO_MAX_SEQ, max_queue=8,
                      prefill_chunk=64)
    # head-sized, so a request holds its one slot long enough (seconds) for queueing and cancelling tests
    slow_base = tmp_path_factory.mktemp("slow_checkpoint")
    make_checkpoint(slow_base, "G4", depth=4, n_embd=256, n_head=4, sequence_len=1024)
    export_checkpoint(repo, "demo_1slot", slow_base, "sft", max_slots=1, max_seq=1024, max_queue=1,
                      prefill_chunk=64)
    return repo


@pytest.fixture(scope="session")
def triton_server(oracle_repository):
    pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel carries the local tritonserver")
    from runtime.local_triton import LocalTriton

    with LocalTriton(oracle_repository, load=["head", "orig", "demo", "demo_1slot"]) as server:
        yield server
