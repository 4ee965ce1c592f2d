"""
The exported graph under ONNX Runtime, behind the `Runner` interface (core/generation.py). The K/V cache is host
numpy this runner owns, even with the CUDA provider (which copies the bound rows over each step): the GPU runtime
that keeps the cache on the device is TensorRT (backend/trt_runner.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from backend import kv_cache
from backend import protocol as P
from core.device_sampling import DrawsOnHost
from core.last_tokens import LastTokens

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtRunner(DrawsOnHost):
    """A Runner on an exported model.onnx: the KV cache is host memory this object owns."""

    def __init__(self, onnx_path: str | Path, max_slots: int, max_seq: int,
                 providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # 0: one thread per CPU this process may use. ONNX Runtime's own default counts the machine's cores
        # and pins a thread to each, escaping the process's CPU set (taskset, a container's cpuset).
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.log_severity_level = 3
        # No busy-waiting between runs: the scheduler, sampling and Triton's send threads need those cores
        # (on a 2-core host, spinning intra-op threads take the CPU the per-token work runs on).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers or default_providers())
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.n_layer = kv_cache.layer_count(inputs)
        k0 = inputs[P.k_cache(0)]
        graph_slots = k0.shape[1]
        if graph_slots != max_slots:
            raise ValueError(f"{onnx_path} was exported for max_slots={graph_slots}, not {max_slots}")
        self.max_slots, self.max_seq = max_slots, max_seq
        self.limits = _graph_limits(self.session)
        if self.limits.get("max_seq") and max_seq > self.limits["max_seq"]:
            raise ValueError(f"max_seq {max_seq} exceeds the exported graph's {self.limits['max_seq']}")
        dtype = DTYPES.get(k0.type)
        if dtype is None:
            raise ValueError(f"{onnx_path}: KV cache type {k0.type} is not supported by ONNX Runtime here")
        shape = (max_seq, max_slots, *k0.shape[2:])  # sequence first: cache[:Lc] is contiguous, bound as is
        self.k = [np.zeros(shape, dtype) for _ in range(self.n_layer)]
        self.v = [np.zeros(shape, dtype) for _ in range(self.n_layer)]
        if P.OLD_PREV_EMBEDDING in inputs:
            raise ValueError(f"{onnx_path} was exported before G4's smear read the previous token's id; export it "
                             "again (make export)")
        self.prev = LastTokens(max_slots) if P.PREV_IDS in inputs else None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        sl = np.ascontiguousarray(slots, dtype=np.int64)
        B, T = ids.shape
        kv_cache.check_step(pos, sl, T, self.max_seq, self.max_slots)
        Lc = kv_cache.cached_rows(pos)
        binding = self.session.io_binding()  # on CPU memory: the cache is bound without a copy
        binding.bind_cpu_input(P.INPUT_IDS, ids)
        binding.bind_cpu_input(P.POSITIONS, pos)
        binding.bind_cpu_input(P.SLOTS, sl)
        for i in range(self.n_layer):
            binding.bind_cpu_input(P.k_cache(i), self.k[i][:Lc])
            binding.bind_cpu_input(P.v_cache(i), self.v[i][:Lc])
        if self.prev is not None:
            binding.bind_cpu_input(P.PREV_IDS, self.prev.before(sl))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        out = dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))
        rows = pos[None, :] + np.arange(T)[:, None]  # (T, B) cache positions of the new tokens
        cols = np.broadcast_to(sl[None, :], (T, B))
        kv_cache.write_new(self.k, self.v, out, rows, cols)
        if self.prev is not None:
            self.prev.fed(sl, ids)
        return np.asarray(out[P.LOGITS], dtype=np.float32)


def _graph_limits(session) -> dict:
    """The serving shape the exporter recorded in the graph's metadata (absent in foreign graphs)."""
    raw = session.get_modelmeta().custom_metadata_map.get("nanochat")
    return json.loads(raw) if raw else {}
