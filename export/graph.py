"""
GPT.forward (core/gpt.py) as one ONNX graph that serves prefill and decode.

Inputs:  input_ids int64 [B, T], positions int64 [B], slots int64 [B],
         k_cache_{i}, v_cache_{i} [Lc, max_slots, Hkv, D] per layer, prev_embedding [max_slots, C] (G4)
Outputs: logits float32 [B, V] (last position), new_k_{i}, new_v_{i} [T, B, Hkv, D], new_prev [B, C] (G4)

B, T and Lc are dynamic; max_slots is fixed at export. The runtime passes the first Lc >= 1 rows
of its cache (a contiguous slice, since the sequence axis is first) and writes the new K/V itself,
so no step copies or rewrites the whole cache (the NeMo "kv_new" pattern in the TensorRT notes).

Exporter: torch.onnx.export with dynamo=True (torch.export, then onnxscript), the path torch 2.13
supports; the legacy TorchScript exporter is deprecated. Opset 18: ONNX Runtime and TensorRT 10's
parser both take it, and the ops the model core traces to (MatMul/Gemm, Gather/GatherND, Range,
ReduceMean, Softmax, Where, Tanh, ...) are all in TensorRT's supported list; RMSNorm is already
decomposed in the model core. Weights go to one external data file (model.onnx.data), so models
over protobuf's 2 GB limit export too. The graph's metadata_props record the serving shape.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from backend import protocol as P
from core.gpt import GPT

# The exporter warns once per torchvision operator it cannot register; nanochat uses none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

OPSET = 18


def input_names(n_layer: int, smear: bool) -> list[str]:
    names = [P.INPUT_IDS, P.POSITIONS, P.SLOTS]
    names += [P.k_cache(i) for i in range(n_layer)] + [P.v_cache(i) for i in range(n_layer)]
    return names + ([P.PREV_EMBEDDING] if smear else [])


def output_names(n_layer: int, smear: bool) -> list[str]:
    names = [P.LOGITS] + [P.new_k(i) for i in range(n_layer)] + [P.new_v(i) for i in range(n_layer)]
    return names + ([P.NEW_PREV] if smear else [])


class StepGraph(nn.Module):
    """GPT.forward with flat tensor inputs and outputs, the form an ONNX graph has."""

    def __init__(self, model: GPT):
        super().__init__()
        self.m = model

    def forward(self, input_ids, positions, slots, *caches):
        L = self.m.config.n_layer
        prev = caches[2 * L] if self.m.config.smear else None
        out = self.m(input_ids, positions, slots, list(caches[:L]), list(caches[L : 2 * L]), prev)
        extra = [out.new_prev] if out.new_prev is not None else []
        return (out.logits, *out.new_k, *out.new_v, *extra)


def example_inputs(model: GPT, max_slots: int) -> tuple:
    """Trace inputs with B, T, Lc all > 1 and distinct, so torch.export keeps them symbolic."""
    cfg = model.config
    B, T, Lc = 2, 3, 5
    cache = (Lc, max_slots, cfg.n_kv_head, cfg.head_dim)
    args = [torch.zeros(B, T, dtype=torch.long), torch.full((B,), Lc, dtype=torch.long),
            torch.arange(B, dtype=torch.long) % max_slots]
    args += [torch.zeros(cache) for _ in range(2 * cfg.n_layer)]
    if cfg.smear:
        args.append(torch.zeros(max_slots, cfg.n_embd))
    return tuple(args)


def export_onnx(model: GPT, out_dir: Path, max_slots: int, max_seq: int, log=print) -> Path:
    """Trace `model` and write out_dir/model.onnx + model.onnx.data (fp32); returns the .onnx path."""
    cfg = model.config
    Dim = torch.export.Dim
    # a batch of one row is common (batch-1 decode): B may be 1 although the trace uses 2
    B = Dim("B", min=1, max=max(2, max_slots))
    T, Lc = Dim("T", min=1, max=max(4, max_seq)), Dim("Lc", min=1, max=max(6, max_seq))
    caches = tuple({0: Lc} for _ in range(2 * cfg.n_layer)) + ((None,) if cfg.smear else ())
    dynamic_shapes = ({0: B, 1: T}, {0: B}, {0: B}, caches)
    log(f"tracing {cfg.generation} model ({cfg.n_layer} layers, C={cfg.n_embd}) with torch.export ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's notes on axis renaming and deprecated pytree APIs
        program = torch.onnx.export(
            StepGraph(model).eval(), example_inputs(model, max_slots), None,
            input_names=input_names(cfg.n_layer, cfg.smear), output_names=output_names(cfg.n_layer, cfg.smear),
            dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes, verbose=False,
        )
    proto = program.model_proto
    meta = dict(generation=cfg.generation, max_slots=max_slots, max_seq=max_seq, precision="fp32")
    set_metadata(proto, meta)
    return save(proto, out_dir)


def set_metadata(proto, values: dict) -> None:
    """Merge `values` into the graph's "nanochat" metadata entry (read by backend/onnx_runner.py)."""
    entries = {p.key: p for p in proto.metadata_props}
    entry = entries.get("nanochat") or proto.metadata_props.add(key="nanochat")
    entry.value = json.dumps({**json.loads(entry.value or "{}"), **values})


def save(proto, out_dir: Path) -> Path:
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / P.ONNX_FILE
    (out_dir / P.ONNX_DATA_FILE).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=P.ONNX_DATA_FILE, size_threshold=1024)
    return path


def check(path: Path) -> None:
    """onnx.checker with full shape inference, on the file (so external data and >2 GB work)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
