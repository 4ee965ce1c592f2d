"""
The exported graph under ONNX Runtime (CPU) against the PyTorch model core and nanochat's references.

The graph is driven step by step by `GraphDriver`, which holds its own KV cache and writes the new
K/V itself (independent of backend/onnx_runner.py, which has its own test): prefill, then 32 greedy
decode steps, logits within 1e-3 of the model core's TorchRunner at every step.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from backend.onnx_runner import OrtRunner
from core.checkpoint import find_checkpoint, open_checkpoint
from core.gpt import TorchRunner, build_gpt
from tests.support.exports import lowered
from tests.support.oracles import oracle_or_skip

TOL = 1e-3
STEPS = 32


class GraphDriver:
    """The exported graph with a cache this test owns: (max_seq, max_slots, Hkv, D) per layer."""

    def __init__(self, onnx_path, max_seq: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.s = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.s.get_inputs()}
        self.L = sum(n.startswith("k_cache_") for n in ins)
        shape = (max_seq, *ins["k_cache_0"].shape[1:])
        self.k = [np.zeros(shape, np.float32) for _ in range(self.L)]
        self.v = [np.zeros(shape, np.float32) for _ in range(self.L)]
        self.prev = np.zeros(ins["k_cache_0"].shape[1], np.int64) if "prev_ids" in ins else None  # last tokens

    def step(self, ids: list[list[int]], positions: list[int], slots: list[int]) -> np.ndarray:
        ids_a, pos, sl = np.array(ids, np.int64), np.array(positions, np.int64), np.array(slots, np.int64)
        Lc = max(1, int(pos.max()))
        feed = {"input_ids": ids_a, "positions": pos, "slots": sl}
        feed |= {f"k_cache_{i}": self.k[i][:Lc] for i in range(self.L)}
        feed |= {f"v_cache_{i}": self.v[i][:Lc] for i in range(self.L)}
        if self.prev is not None:
            feed["prev_ids"] = self.prev[sl]
        out = dict(zip([o.name for o in self.s.get_outputs()], self.s.run(None, feed), strict=True))
        T = ids_a.shape[1]
        rows, cols = pos[None, :] + np.arange(T)[:, None], np.broadcast_to(sl, (T, len(sl)))
        for i in range(self.L):
            self.k[i][rows, cols] = out[f"new_k_{i}"]
            self.v[i][rows, cols] = out[f"new_v_{i}"]
        if self.prev is not None:
            self.prev[sl] = ids_a[:, -1]
        return out["logits"]


def greedy_both(driver: GraphDriver, torch_runner: TorchRunner, prompt: list[int], slot: int):
    """Prefill + STEPS greedy decode steps on both; returns (max |diff|, graph tokens, model-core tokens)."""
    a = driver.step([prompt], [0], [slot])
    b = torch_runner.forward(np.array([prompt]), np.array([0]), np.array([slot]))
    diff, ours, theirs = float(np.abs(a - b).max()), [], []
    for s in range(STEPS):
        ours.append(int(a[0].argmax()))
        theirs.append(int(b[0].argmax()))
        pos = len(prompt) + s
        a = driver.step([[ours[-1]]], [pos], [slot])
        b = torch_runner.forward(np.array([[ours[-1]]]), np.array([pos]), np.array([slot]))
        diff = max(diff, float(np.abs(a - b).max()))
    return diff, ours, theirs


def load_model(nanochat_base, tag=None):
    loaded, _ = open_checkpoint(find_checkpoint("base", tag, nanochat_base=nanochat_base))
    return build_gpt(loaded.config, loaded.state_dict)


def check_oracle(onnx_path, name: str, references, max_slots: int):
    model = load_model(oracle_or_skip(name))
    driver, core = GraphDriver(onnx_path, 512), TorchRunner(model, max_slots, 512)
    for conv in references(name)["conversations"]:
        slot = conv["index"] % max_slots  # rows are reused: stale K/V past a row's position stay masked
        diff, tokens, _ = greedy_both(driver, core, conv["prompt_ids"], slot)
        assert diff < TOL, f"{name}/{conv['name']}: logits differ from the model core by {diff}"
        assert tokens == conv["greedy"]["tokens"], f"{name}/{conv['name']}: greedy tokens differ from nanochat"


def test_oracle_head_via_make_export(make_export_head, references):
    proc, repo, _ = make_export_head
    assert proc.returncode == 0, proc.stderr
    check_oracle(repo / "d4" / "1" / "model.onnx", "head", references, max_slots=8)


def test_oracle_orig(oracle_repository, references):
    """The orig oracle (G0) as the session's model repository holds it for Triton (16 slots, max_seq 512)."""
    check_oracle(oracle_repository / "orig" / "1" / "model.onnx", "orig", references, max_slots=16)


def test_ort_runner_batches_slots_and_chunks(demo_base, demo_exports):
    """OrtRunner: chunked prefill, a one-token prompt, and rows at different positions decoded together."""
    model = load_model(demo_base, "g4")
    onnx_path = demo_exports("G4") / "1" / "model.onnx"
    ours, core = OrtRunner(onnx_path, 3, 512, threads=1), TorchRunner(model, 3, 512)
    prompt = np.random.default_rng(3).integers(0, model.config.vocab_size, 150)
    calls = [
        (prompt[None, :100], [0], [0]),        # first chunk of row 0
        (prompt[None, 100:], [100], [0]),      # second chunk reads the first from the cache
        (prompt[None, :1], [0], [2]),          # one-token prompt in row 2 (Lc padded to 1)
    ]
    for ids, pos, sl in calls:
        a, b = ours.forward(ids, np.array(pos), np.array(sl)), core.forward(ids, np.array(pos), np.array(sl))
        assert np.abs(a - b).max() < TOL
    positions, tokens = np.array([150, 1]), np.array([[5], [9]])
    for _ in range(10):
        a = ours.forward(tokens, positions, np.array([0, 2]))
        b = core.forward(tokens, positions, np.array([0, 2]))
        assert np.abs(a - b).max() < TOL
        tokens, positions = a.argmax(-1)[:, None], positions + 1
    with pytest.raises(ValueError, match="exceed the cache"):
        ours.forward(tokens, np.array([512, 0]), np.array([0, 1]))


def test_fp16_and_bf16_graphs_are_typed_and_valid(tmp_path, demo_exports):
    """Caches in the low dtype at the graph's boundary (G4's prev_ids stay ids), and onnx's full check passes. (ONNX
    Runtime has no bf16 kernels on CPU: a bf16 graph runs only on a GPU; make gpu-check runs it there.)"""
    import onnx

    from export import graph

    for precision, onnx_type in (("fp16", onnx.TensorProto.FLOAT16), ("bf16", onnx.TensorProto.BFLOAT16)):
        path, proto = lowered(demo_exports("G4") / "1" / "model.onnx", precision, tmp_path)
        graph.check(path)
        types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
        assert types["k_cache_0"] == onnx_type and types["prev_ids"] == onnx.TensorProto.INT64, precision
    assert OrtRunner(tmp_path / "fp16" / "model.onnx", 3, 512, threads=1).k[0].dtype == np.float16


def test_fp16_graph_of_the_trained_oracle_agrees_with_fp32(make_export_head, references, tmp_path):
    """On a trained model (the head oracle) fp16 must pick the same token as fp32 at every step of nanochat's
    greedy continuations (fed nanochat's tokens, so one early slip cannot hide the rest), and its logits stay
    close. Measured when written: agreement 1.0, max |logit diff| 4.9e-3."""
    proc, repo, _ = make_export_head
    assert proc.returncode == 0, proc.stderr
    fp32_path = repo / "d4" / "1" / "model.onnx"
    fp32 = OrtRunner(fp32_path, 8, 512, threads=1)
    fp16 = OrtRunner(lowered(fp32_path, "fp16", tmp_path)[0], 8, 512, threads=1)
    steps, agree, worst, slot = 0, 0, 0.0, np.array([0])
    for conv in references("head")["conversations"]:
        prompt, tokens = conv["prompt_ids"], conv["greedy"]["tokens"]
        a, b = (r.forward(np.array([prompt]), np.array([0]), slot) for r in (fp32, fp16))
        for s, token in enumerate(tokens):
            steps, agree = steps + 1, agree + int(a.argmax() == b.argmax())
            worst = max(worst, float(np.abs(a - b).max()))
            pos = np.array([len(prompt) + s])
            a, b = (r.forward(np.array([[token]]), pos, slot) for r in (fp32, fp16))
    assert agree == steps and worst < 2e-2, f"fp16 top-1 agreement {agree}/{steps}, max |logit diff| {worst:.2e}"


def test_the_exporters_check_rejects_a_graph_that_disagrees(demo_base, demo_exports, tmp_path):
    """verify_onnx, the check every export runs, on a graph broken on purpose (one weight changed)."""
    import onnx
    import onnx_ir as ir
    from onnx import numpy_helper

    from export import graph
    from export.pipeline import reference_steps, verify_onnx

    source = demo_exports("G4") / "1"
    proto = onnx.load(str(source / "model.onnx"))
    weight = next(w for w in proto.graph.initializer if "lm_head" in w.name)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    path = graph.save(ir.from_proto(proto), tmp_path / "broken")
    reference = reference_steps(load_model(demo_base, "g4"), 3, 512)
    assert verify_onnx(source / "model.onnx", reference, 3, "fp32", lambda _: None) < TOL  # the real one passes
    with pytest.raises(RuntimeError, match="exported graph disagrees with the model core"):
        verify_onnx(path, reference, 3, "fp32", lambda _: None)
