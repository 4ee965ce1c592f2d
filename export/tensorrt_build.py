"""
A TensorRT engine (model.plan) from the exported ONNX graph, with the tensorrt Python API. The network is strongly
typed where TensorRT has the flag (10.12 deprecates weak typing, 11.0 drops it): the graph's own dtypes decide the
precision, which is why fp16/bf16 are lowered in the ONNX (export/precision.py), not by builder flags. Two profiles,
prefill and decode, one per execution context of backend/trt_runner.py.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend import tensorrt_module
from backend.protocol import (
    CACHE_PREFIXES,
    DECODE_PROFILE,
    INPUT_IDS,
    POSITIONS,
    PREFILL_PROFILE,
    PREFILL_ROWS,
    PREV_IDS,
    SLOTS,
)


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built or run here; None when it can."""
    try:
        import torch

        gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except ImportError:
        gpu = False
    if not gpu:
        return "no CUDA GPU is visible on this machine"
    if not tensorrt_module.installed():
        return "TensorRT's Python API is not installed (pip install '.[tensorrt]')"
    return None


def compute_capability(device: int = 0) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def device_name(device: int = 0) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def timing_cache_path(trt_version: str, device: str, cc: str) -> Path:
    """One per TensorRT version and GPU model (its name: an H100 and an H200, or an L4 and an L40S, share a compute
    capability), so rebuilds of other precisions and models reuse kernel timings."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanochat-triton"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return root / f"trt-{trt_version}-{slug}-sm{cc.replace('.', '')}.timing"


def _progress_monitor(trt, log: Callable[[str], None]):
    """An IProgressMonitor that prints top-level phases and every ~10% of their steps."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.lock, self.steps, self.parents = threading.Lock(), {}, {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                self.steps[phase_name], self.parents[phase_name] = num_steps, parent_phase
                depth = 0 if parent_phase is None else 1 + (self.parents.get(parent_phase) is not None)
                if depth <= 1:
                    log(f"  tensorrt: {'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            with self.lock:
                n = self.steps.get(phase_name, 0)
                if self.parents.get(phase_name) is None and n >= 10 and (step + 1) % max(1, n // 10) == 0:
                    log(f"  tensorrt: {phase_name} {step + 1}/{n}")
            return True  # never cancel

        def phase_finish(self, phase_name):
            with self.lock:
                self.steps.pop(phase_name, None)

    return Monitor()


def build_engine(onnx_path: Path, plan_path: Path, max_slots: int, max_seq: int, prefill_chunk: int,
                 workspace_gib: float = 8.0, log: Callable[[str], None] = print) -> dict:
    """Parse onnx_path, build, write plan_path; returns the metadata's `tensorrt` entry."""
    trt = tensorrt_module.import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log(f"tensorrt {trt.__version__}: parsing {onnx_path.name} ...")
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external data is found beside it
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    precision = graph_precision(onnx_path)
    if not strongly_typed and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    # what the graph keeps in fp32 runs in fp32: TensorRT would run those matmuls in TF32 on Ampere and later
    config.clear_flag(trt.BuilderFlag.TF32)
    if hasattr(config, "progress_monitor"):
        config.progress_monitor = _progress_monitor(trt, log)

    for dims in profile_shapes(max_slots, max_seq, prefill_chunk).values():  # in profile index order
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shapes = [_dims(tensor.name, tuple(tensor.shape), s) for s in dims]
            if shapes[0] is not None:
                profile.set_shape(tensor.name, *shapes)
        config.add_optimization_profile(profile)

    cc, device = compute_capability(), device_name()
    cache_file = timing_cache_path(trt.__version__, device, cc)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # another GPU's or a damaged file
        log(f"tensorrt: {cache_file} does not match this GPU; building without it (it will be replaced)")
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise RuntimeError("TensorRT refused an empty timing cache")

    log(f"tensorrt: building the engine for {device} (sm {cc}), {precision}, "
        f"{'strongly' if strongly_typed else 'weakly'} typed ...")
    t = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT messages above)")
    plan_path.write_bytes(plan)
    if (timings := config.get_timing_cache()) is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(memoryview(timings.serialize()))
    log(f"tensorrt: engine built in {time.perf_counter() - t:.1f}s ({plan_path.stat().st_size / 1e6:.1f} MB)")
    profiles = {"prefill": PREFILL_PROFILE, "decode": DECODE_PROFILE}
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    scratch = {name: int(engine.get_device_memory_size_for_profile_v2(p)) for name, p in profiles.items()}
    log("tensorrt: activation memory per profile: " + ", ".join(f"{n} {b / 1e9:.2f} GB" for n, b in scratch.items()))
    # metadata.json's: the runner checks version and compute capability before it deserializes; export checks that
    # the larger profile's activations fit beside the KV cache
    return dict(version=trt.__version__, compute_capability=cc, device=device, strongly_typed=strongly_typed,
                profiles=profiles, scratch_bytes=scratch)


def profile_shapes(max_slots: int, max_seq: int, prefill_chunk: int) -> dict[int, tuple]:
    """profile -> (min, opt, max) of (B, T, Lc). Prefill takes at most PREFILL_ROWS rows of at most a prefill chunk
    (the runner splits larger calls), so its activation memory (attention scores: B x heads x T x Lc) grows with
    the chunk and max_seq, never with max_seq squared or with max_slots."""
    chunk = max(1, min(prefill_chunk, max_seq))
    return {
        PREFILL_PROFILE: ((1, 1, 1), (1, chunk, chunk), (min(max_slots, PREFILL_ROWS), chunk, max_seq)),
        DECODE_PROFILE: ((1, 1, 1), (max_slots, 1, max(1, max_seq // 2)), (max_slots, 1, max_seq)),  # tuned: all busy
    }


def _dims(name: str, shape: tuple, bt_lc: tuple):
    """One profile shape for an input; None for static inputs."""
    B, T, Lc = bt_lc
    if name == INPUT_IDS:
        return (B, T)
    if name in (POSITIONS, SLOTS, PREV_IDS):
        return (B,)
    if name.startswith(CACHE_PREFIXES):
        return (Lc, *shape[1:])
    return None


def graph_precision(path: Path) -> str:
    """The precision export/graph.py recorded in the graph's metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta.get("nanochat", "{}")).get("precision", "fp32")
