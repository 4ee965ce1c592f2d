"""
TensorRT's parser rules (export/tensorrt_rules.py, from onnx-tensorrt's docs/operators.md) on the graphs export
writes: every generation oracle's graph (tests/conftest.py exports them) lowered to fp16 and bf16 follows them (at
fp32 tests/export/test_generation_oracles.py checks it); the graph as torch.export traces it (before
export/graph.py folds its integer constants) and hand-made breaches are refused. A lowered graph casts only the
cache rows its Gather picked, never a whole cache input.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from backend.protocol import CACHE_PREFIXES, ONNX_FILE, VERSION
from export import graph
from export.tensorrt_rules import TOPK_MAX, problems
from tests.support.exports import lowered
from tests.support.oracles import generation_oracles


def state_readers(proto) -> list[str]:
    """The op of every node that reads a cache input."""
    state = {v.name for v in proto.graph.input if v.name.startswith(CACHE_PREFIXES)}
    return [n.op_type for n in proto.graph.node if state & set(n.input)]


@pytest.fixture(scope="module")
def exported(generation_exports) -> dict[str, Path]:
    return generation_exports()


@pytest.mark.parametrize("name", generation_oracles() or ["missing"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_every_generation_lowered_follows_the_parsers_rules(name, precision, exported, tmp_path):
    path, proto = lowered(exported[name] / VERSION / ONNX_FILE, precision, tmp_path)
    assert problems(path) == []
    # the slots are gathered first and only those rows cast: no Cast reads a whole cache
    assert set(state_readers(proto)) <= {"Gather", "Shape"}, state_readers(proto)


def test_the_graph_as_traced_is_refused_for_its_computed_axes(tmp_path, monkeypatch):
    from core.random_checkpoint import make_checkpoint
    from export import export_model, options

    # one layer: every op kind of a G4 block is in it, and tracing costs seconds a layer
    make_checkpoint(tmp_path / "base", "G4", tag="g4", source="base", depth=1, n_embd=64, n_head=2, sequence_len=512)
    monkeypatch.setattr(graph, "fold_integer_constants", lambda model: None)  # the export before folding
    target = export_model(options(model_repository=tmp_path / "repo", name="m", model="g4", source="base",
                                  nanochat_base_dir=tmp_path / "base", runtime="onnx", max_slots=2, verify=False),
                          log=lambda _: None)
    found = problems(target / VERSION / ONNX_FILE)
    assert found and all("ReduceMean" in p and "`axes` must be an initializer" in p for p in found), found


def one_node_graph(tmp_path, node, inputs, initializers=()):
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=list(initializers))
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_breaches_of_the_table_are_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [TOPK_MAX])
    topk = helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0)
    assert problems(one_node_graph(tmp_path, topk, [x], [k])) == [
        f"TopK y: `K` must be less than {TOPK_MAX}, not {TOPK_MAX}", "TopK y: `sorted` must be 1"]
    computed_k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    assert "`K` must be an initializer" in problems(one_node_graph(tmp_path, topk, [x, computed_k]))[0]
    unsupported = helper.make_node("NonMaxSuppression", ["x", "x"], ["y"])
    assert "not in TensorRT's operator support table" in problems(one_node_graph(tmp_path, unsupported, [x]))[0]
    doubles = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 8])
    assert "input types ['DOUBLE']" in problems(one_node_graph(tmp_path, helper.make_node("Tanh", ["x"], ["y"]),
                                                               [doubles]))[0]
