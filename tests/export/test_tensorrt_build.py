"""
export/tensorrt_build.py's use of TensorRT's builder API, and the runner's bindings, against a fake `tensorrt`
module that records what is asked of it (the real one needs a GPU; tests/export/test_tensorrt.py runs it there):
TF32 off whatever the precision, one timing cache per GPU model and TensorRT version, a cache TensorRT refuses
set aside instead of failing the build, and a refused binding raised instead of ignored.
"""

from __future__ import annotations

import json
import sys
import types

import onnx
import pytest
from onnx import helper

from backend.protocol import INPUT_IDS, POSITIONS, SLOTS, k_cache
from export import tensorrt_build


class FakeConfig:
    def __init__(self, accepts):
        self.flags, self.cleared, self.profiles, self.cache, self.accepts = set(), set(), [], None, accepts

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.cleared.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return types.SimpleNamespace(serialize=lambda: b"timings of this gpu", data=data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache if self.accepts(cache.data) else None
        return self.cache is not None

    def get_timing_cache(self):
        return self.cache


def fake_tensorrt(config: FakeConfig) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0.34"
    trt.Logger = type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16", BF16="BF16")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    inputs = [types.SimpleNamespace(name=n, shape=s) for n, s in
              ((INPUT_IDS, (-1, -1)), (POSITIONS, (-1,)), (SLOTS, (-1,)), (k_cache(0), (-1, 2, 1, 8)))]
    network = types.SimpleNamespace(num_inputs=len(inputs), get_input=inputs.__getitem__)
    profile = lambda: types.SimpleNamespace(set_shape=lambda name, *shapes: None)
    trt.Builder = lambda logger: types.SimpleNamespace(
        create_network=lambda flags: network, create_builder_config=lambda: config,
        create_optimization_profile=profile, build_serialized_network=lambda net, cfg: b"plan")
    trt.OnnxParser = lambda net, logger: types.SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    engine = types.SimpleNamespace(get_device_memory_size_for_profile_v2=lambda profile: (1 + profile) << 30)
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)
    return trt


@pytest.fixture
def build(tmp_path, monkeypatch):
    """build_engine on a graph of `precision` for a GPU called `device`; returns (config, log lines, its result)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tensorrt_build, "compute_capability", lambda: "9.0")

    def run(precision: str, device: str = "NVIDIA H100 80GB HBM3", accepts=lambda data: True):
        monkeypatch.setattr(tensorrt_build, "device_name", lambda: device)
        config = FakeConfig(accepts)
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(config))
        model = helper.make_model(helper.make_graph([], "g", [], []))
        helper.set_model_props(model, {"nanochat": json.dumps({"precision": precision})})
        onnx.save(model, str(tmp_path / "model.onnx"))
        lines = []
        info = tensorrt_build.build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", 2, 64, 16,
                                           log=lines.append)
        return config, lines, info

    return run


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tf32_is_off_for_every_precision(build, precision):
    config, _, _ = build(precision)
    assert config.cleared == {"TF32"} and not config.flags  # strongly typed: the graph's types decide


def test_each_profiles_activation_memory_is_returned_and_printed(build):
    _, lines, info = build("bf16")
    assert info["scratch_bytes"] == {"prefill": 1 << 30, "decode": 2 << 30}
    assert "tensorrt: activation memory per profile: prefill 1.07 GB, decode 2.15 GB" in lines


def test_each_gpu_model_keeps_its_own_timing_cache(build, tmp_path):
    build("bf16", "NVIDIA H100 80GB HBM3")
    build("bf16", "NVIDIA H200")  # the same compute capability, 9.0
    caches = sorted(p.name for p in (tmp_path / "cache" / "nanochat-triton").iterdir())
    assert caches == ["trt-10.9.0.34-nvidia-h100-80gb-hbm3-sm90.timing", "trt-10.9.0.34-nvidia-h200-sm90.timing"]


def test_a_timing_cache_tensorrt_refuses_is_replaced_not_fatal(build, tmp_path):
    folder = tmp_path / "cache" / "nanochat-triton"
    folder.mkdir(parents=True)
    stale = folder / "trt-10.9.0.34-nvidia-l4-sm90.timing"
    stale.write_bytes(b"another gpu's timings")
    config, lines, _ = build("fp16", "NVIDIA L4", accepts=lambda data: data != b"another gpu's timings")
    assert config.cache.data == b"" and any("does not match this GPU" in line for line in lines)
    assert stale.read_bytes() == b"timings of this gpu"


def test_a_binding_tensorrt_refuses_is_an_error():
    from backend.trt_runner import bind

    refusing = types.SimpleNamespace(set_input_shape=lambda name, shape: False, set_tensor_address=lambda n, a: True)
    with pytest.raises(RuntimeError, match=r"refused shape \(3, 1\) for input_ids"):
        bind(refusing, INPUT_IDS, 1234, (3, 1))
    no_address = types.SimpleNamespace(set_input_shape=lambda name, shape: True, set_tensor_address=lambda n, a: False)
    with pytest.raises(RuntimeError, match="refused the address of logits"):
        bind(no_address, "logits", 1234)
