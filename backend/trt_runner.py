"""
A TensorRT engine (model.plan from export/tensorrt_build.py) behind the `Runner` interface. The K/V cache lives on
the GPU, and the engine reads it in place by address. A plan runs only on the TensorRT version and GPU architecture
that built it, so the runner refuses a mismatch (metadata.json says what built it) before deserializing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from backend import kv_cache
from backend import protocol as P
from backend.runner import in_pieces
from backend.tensorrt_module import import_tensorrt
from core.device_sampling import BatchSampling, Drawn, draw, new_generator
from core.last_tokens import LastTokens

# TensorRT's tensor types by name -> torch's. Not trt.nptype: numpy has no bf16, and TensorRT 10 raises
# TypeError for it there, so a bf16 engine would export and then fail to load.
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def torch_dtype(trt_dtype):
    """The torch dtype of a TensorRT tensor type (trt.DataType)."""
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in TORCH_DTYPES:
        raise EngineMismatch(f"the engine has a tensor of type {name}, which this runner cannot bind")
    return getattr(torch, TORCH_DTYPES[name])


class EngineMismatch(RuntimeError):
    """The plan was built for another GPU or another TensorRT version."""


def check_engine(meta: dict, trt_version: str, cc: str, plan_path: Path) -> None:
    info = meta.get("tensorrt") or {}
    built_version, built_cc = info.get("version"), info.get("compute_capability")
    if built_version is None or built_cc is None:
        raise EngineMismatch(f"{plan_path}: metadata.json has no tensorrt version/compute_capability; "
                             "re-export the model with `make export RUNTIME=tensorrt` on this GPU type")
    problems = []
    if built_version != trt_version:
        problems.append(f"TensorRT {built_version} (this machine has {trt_version})")
    if built_cc != cc:
        problems.append(f"GPU compute capability {built_cc} ({info.get('device', '?')}; this GPU is {cc})")
    if problems:
        raise EngineMismatch(f"{plan_path} was built for " + " and ".join(problems) +
                             "; rebuild it here with `make export RUNTIME=tensorrt` (a plan runs only on the "
                             "TensorRT version and GPU architecture that built it)")


def bind(ctx, name: str, address: int, shape: tuple | None = None) -> None:
    """Give the context a tensor's address (and an input's shape); TensorRT says no by returning False, which
    would otherwise run the step on the previous binding."""
    if shape is not None and not ctx.set_input_shape(name, shape):
        raise RuntimeError(f"TensorRT refused shape {shape} for {name} (outside the engine's profile?)")
    if not ctx.set_tensor_address(name, address):
        raise RuntimeError(f"TensorRT refused the address of {name}")


class TrtRunner:
    """A Runner on a TensorRT plan; the KV cache is GPU memory this object owns."""

    def __init__(self, plan_path: str | Path, max_slots: int, max_seq: int, device_id: int = 0,
                 metadata_path: str | Path | None = None):
        import torch

        trt = import_tensorrt()

        plan_path = Path(plan_path)
        meta_path = Path(metadata_path) if metadata_path else plan_path.parent / P.METADATA_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.device = torch.device("cuda", device_id)
        major, minor = torch.cuda.get_device_capability(self.device)
        check_engine(meta, trt.__version__, f"{major}.{minor}", plan_path)
        if max_slots != meta["max_slots"] or max_seq > meta["max_seq"]:
            raise ValueError(f"{plan_path} serves max_slots={meta['max_slots']}, max_seq<={meta['max_seq']}; "
                             f"asked for {max_slots}, {max_seq}")
        self.max_slots, self.max_seq = max_slots, max_seq
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT could not deserialize {plan_path} (see its messages above)")
        self.stream = torch.cuda.Stream(self.device)
        # One block of activation memory for both contexts: they run one at a time on one stream, and each would
        # otherwise hold the largest profile's whole size (TensorRT's default, STATIC).
        profiles = (P.PREFILL_PROFILE, P.DECODE_PROFILE)
        scratch = max(self.engine.get_device_memory_size_for_profile_v2(p) for p in profiles)
        self.scratch = torch.empty(max(1, scratch), dtype=torch.uint8, device=self.device)
        self.contexts = []
        for profile in profiles:
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            ctx.set_device_memory(self.scratch.data_ptr(), scratch)
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts.append(ctx)
        # the largest prefill call the engine takes (rows, tokens; PREFILL_ROWS, or a prefill_chunk raised in
        # config.pbtxt past the engine's): larger ones are split (backend/runner.py)
        largest = self.engine.get_tensor_profile_shape(P.INPUT_IDS, P.PREFILL_PROFILE)[2]
        self.prefill_rows, self.prefill_tokens = int(largest[0]), int(largest[1])

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtype = lambda n: torch_dtype(self.engine.get_tensor_dtype(n))
        self.n_layer = kv_cache.layer_count(self.inputs)
        k_shape = tuple(self.engine.get_tensor_shape(P.k_cache(0)))
        self.cache_dtype = dtype(P.k_cache(0))
        shape = (max_seq, max_slots, *k_shape[2:])
        need = 2 * self.n_layer * math.prod(shape) * torch.empty((), dtype=self.cache_dtype).element_size()
        free = torch.cuda.mem_get_info(self.device)[0]
        if need > free:  # say so, instead of a CUDA out-of-memory error halfway through the layers
            raise RuntimeError(f"the KV cache needs {need / 1e9:.1f} GB ({self.n_layer} layers, K and V of {shape}) "
                               f"but {free / 1e9:.1f} GB of the GPU is free after the engine's {scratch / 1e9:.1f} GB "
                               "of activations: export with a smaller MAX_SLOTS or MAX_SEQ")
        self.k = [torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for _ in range(self.n_layer)]
        self.v = [torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for _ in range(self.n_layer)]
        if P.OLD_PREV_EMBEDDING in self.inputs:
            raise EngineMismatch(f"{plan_path} was built before G4's smear read the previous token's id; export it "
                                 "again (make export RUNTIME=tensorrt)")
        self.prev = LastTokens(max_slots) if P.PREV_IDS in self.inputs else None
        self.out_dtype = {n: dtype(n) for n in self.outputs}  # outputs are per step, from torch's allocator
        self.generator = new_generator(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the zeroed cache, before any step reads it

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        import torch

        logits = self._logits(input_ids, positions, slots)
        with torch.cuda.stream(self.stream):
            return logits.float().cpu().numpy()  # waits for the stream

    def step(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, sampling: BatchSampling) -> Drawn:
        """The step on the GPU, drawn there on the same stream: only the rows' ids (and seeded rows' logits)
        cross to the host."""
        import torch

        logits = self._logits(input_ids, positions, slots)
        with torch.cuda.stream(self.stream):
            return draw(logits, sampling, self.generator)

    def _logits(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray):
        B, T = input_ids.shape
        kv_cache.check_step(positions, slots, T, self.max_seq, self.max_slots)
        if T > 1 and not (self.prefill_rows >= B and self.prefill_tokens >= T):
            import torch

            return torch.cat(in_pieces(self._step, input_ids, positions, slots, self.prefill_rows, self.prefill_tokens))
        return self._step(input_ids, positions, slots)

    def _step(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray):
        """One engine call; returns the logits (B, V) on the GPU, in the engine's dtype, queued on the stream."""
        import torch

        B, T = input_ids.shape
        Lc = kv_cache.cached_rows(positions)
        ctx = self.contexts[P.DECODE_PROFILE if T == 1 else P.PREFILL_PROFILE]  # one context per profile
        with torch.cuda.stream(self.stream):
            ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64)).to(self.device, non_blocking=True)
            pos = torch.as_tensor(np.asarray(positions, dtype=np.int64)).to(self.device, non_blocking=True)
            sl = torch.as_tensor(np.asarray(slots, dtype=np.int64)).to(self.device, non_blocking=True)
            bound = {P.INPUT_IDS: ids, P.POSITIONS: pos, P.SLOTS: sl}
            if self.prev is not None:
                bound[P.PREV_IDS] = torch.as_tensor(self.prev.before(slots)).to(self.device, non_blocking=True)
            for name, t in bound.items():
                bind(ctx, name, t.data_ptr(), tuple(t.shape))
            for i in range(self.n_layer):
                for name, cache in ((P.k_cache(i), self.k[i]), (P.v_cache(i), self.v[i])):
                    bind(ctx, name, cache.data_ptr(), (Lc, *cache.shape[1:]))  # the first Lc rows, in place
            out = {}
            for name in self.outputs:
                out[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.out_dtype[name],
                                        device=self.device)
                bind(ctx, name, out[name].data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see its messages above)")
            rows = pos[None, :] + torch.arange(T, device=self.device)[:, None]  # (T, B)
            cols = sl[None, :].expand(T, B)
            kv_cache.write_new(self.k, self.v, out, rows, cols)
            if self.prev is not None:
                self.prev.fed(slots, input_ids)
        return out[P.LOGITS]
