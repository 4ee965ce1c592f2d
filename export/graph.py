"""
GPT.forward (core/gpt.py) as one ONNX graph for prefill and decode. It reads the first Lc rows of a cache the runtime
owns and returns only the new K/V (the NeMo "kv_new" pattern), so no step copies the whole cache. B, T and Lc are
dynamic; max_slots is fixed at export. Small integer constants are folded: TensorRT's parser refuses computed ones.
"""

from __future__ import annotations

import contextlib
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

OPSET = 18  # ONNX Runtime and TensorRT 10's parser both take it, and every op the core traces to
FOLD_LIMIT = 1024  # elements: axes, shapes and slice bounds fold; nothing of a weight's size is computed


def input_names(n_layer: int, smear: bool) -> list[str]:
    names = [P.INPUT_IDS, P.POSITIONS, P.SLOTS]
    names += [P.k_cache(i) for i in range(n_layer)] + [P.v_cache(i) for i in range(n_layer)]
    return names + ([P.PREV_IDS] if smear else [])


def output_names(n_layer: int) -> list[str]:
    return [P.LOGITS] + [P.new_k(i) for i in range(n_layer)] + [P.new_v(i) for i in range(n_layer)]


class StepGraph(nn.Module):
    """GPT.forward with flat tensor inputs and outputs, the form an ONNX graph has."""

    def __init__(self, model: GPT):
        super().__init__()
        self.m = model

    def forward(self, input_ids, positions, slots, *caches):
        L = self.m.config.n_layer
        prev = caches[2 * L] if self.m.config.smear else None
        out = self.m(input_ids, positions, slots, list(caches[:L]), list(caches[L : 2 * L]), prev)
        return (out.logits, *out.new_k, *out.new_v)


class StoredTransposed(nn.Module):
    """nn.Linear as x @ W^T with W^T held as a view of W (no copy), so the graph's MatMul reads the weight as
    stored: with a Transpose between them, the graph would need constant folding, which copies every weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t(), requires_grad=False)

    def forward(self, x):
        return x @ self.weight_t


@contextlib.contextmanager
def linears_stored_transposed(model: nn.Module):
    """Every nn.Linear of `model` swapped for StoredTransposed while the block runs, then put back."""
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name, child in swapped:
        setattr(parent, name, StoredTransposed(child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def example_inputs(model: GPT, max_slots: int) -> tuple:
    """Trace inputs with B, T, Lc all > 1 and distinct, so torch.export keeps them symbolic."""
    cfg = model.config
    B, T, Lc = 2, 3, 5
    cache = (Lc, max_slots, cfg.n_kv_head, cfg.head_dim)
    args = [torch.zeros(B, T, dtype=torch.long), torch.full((B,), Lc, dtype=torch.long),
            torch.arange(B, dtype=torch.long) % max_slots]
    args += [torch.zeros(cache) for _ in range(2 * cfg.n_layer)]
    if cfg.smear:
        args.append(torch.zeros(B, dtype=torch.long))
    return tuple(args)


def export_onnx(model: GPT, out_dir: Path, max_slots: int, max_seq: int, log=print) -> Path:
    """Trace `model` and write out_dir/model.onnx + model.onnx.data (fp32); returns the .onnx path.

    Inputs:  input_ids int64 [B, T], positions int64 [B], slots int64 [B], k_cache_{i}, v_cache_{i}
             [Lc, max_slots, Hkv, D] per layer, prev_ids int64 [B] (G4: the token before each row's first new one)
    Outputs: logits float32 [B, V] (last position), new_k_{i}, new_v_{i} [T, B, Hkv, D]"""
    cfg = model.config
    Dim = torch.export.Dim
    # a batch of one row is common (batch-1 decode): B may be 1 although the trace uses 2
    B = Dim("B", min=1, max=max(2, max_slots))
    T, Lc = Dim("T", min=1, max=max(4, max_seq)), Dim("Lc", min=1, max=max(6, max_seq))
    caches = tuple({0: Lc} for _ in range(2 * cfg.n_layer)) + (({0: B},) if cfg.smear else ())
    dynamic_shapes = ({0: B, 1: T}, {0: B}, {0: B}, caches)
    log(f"tracing {cfg.generation} model ({cfg.n_layer} layers, C={cfg.n_embd}) with torch.export ...")
    # Not optimized by onnxscript: ONNX Runtime and TensorRT optimize the graph themselves when they load it, and
    # onnxscript's rewrite rules are module-level objects that keep the last graph they matched, weights and all,
    # for the rest of the process (for a d20, 5.6 GB held while the graph is checked).
    with warnings.catch_warnings(), linears_stored_transposed(model):
        warnings.simplefilter("ignore")  # torch.onnx's notes on axis renaming and deprecated pytree APIs
        # dynamo=True (torch.export, then onnxscript): the path torch 2.13 supports; TorchScript's is deprecated
        program = torch.onnx.export(
            StepGraph(model).eval(), example_inputs(model, max_slots), None,
            input_names=input_names(cfg.n_layer, cfg.smear), output_names=output_names(cfg.n_layer),
            dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes, verbose=False, optimize=False,
        )
    fold_integer_constants(program.model)
    # the exporter's own IR model: its weights are the model's tensors, written one at a time by save(), never
    # gathered into one protobuf (for a d20 that copy alone was the size of the weights)
    meta = dict(generation=cfg.generation, max_slots=max_slots, max_seq=max_seq, precision="fp32")
    set_metadata(program.model, meta)
    return save(program.model, out_dir)


def fold_integer_constants(model) -> None:
    """Small integer subgraphs of constants (axes, shapes, slice bounds) computed once, into initializers, as
    NVIDIA's own tools prepare graphs for TensorRT (polygraphy's --fold-constants). Float constants stay as
    traced: folding them would change what export/precision.py lowers."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    def integer_only(node) -> bool | None:  # None: the folder's own rules decide
        values = [v for v in (*node.inputs, *node.outputs) if v is not None and v.dtype is not None]
        return False if any(v.dtype.is_floating_point() for v in values) else None

    # shape inference types the traced Constants (the exporter leaves them untyped); it reads no large tensor
    fold_constants(model, onnx_shape_inference=True, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT,
                   should_fold=integer_only)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    RemoveUnusedNodesPass()(model)


def set_metadata(model, values: dict) -> None:
    """Merge `values` into the onnx_ir model's "nanochat" metadata entry (read by backend/onnx_runner.py)."""
    model.metadata_props["nanochat"] = json.dumps({**json.loads(model.metadata_props.get("nanochat", "{}")), **values})


def save(model, out_dir: Path) -> Path:
    """An onnx_ir model to out_dir/model.onnx, its weights streamed to one external data file (so models over
    protobuf's 2 GB limit export too)."""
    import onnx_ir as ir

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / P.ONNX_FILE
    # weights at page-aligned offsets, which ONNX Runtime maps from the file instead of copying
    ir.save(model, path, external_data=P.ONNX_DATA_FILE, size_threshold_bytes=1024, alignment=4096)
    return path


def check(path: Path) -> None:
    """onnx.checker with full shape inference, on the file (so external data and >2 GB work)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
