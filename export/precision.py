"""
fp16 / bf16 versions of the exported fp32 graph, typed so TensorRT builds them strongly typed. The fp32 graph is
rewritten, autocast-like, rather than a half model traced: the core's RMSNorm squares in the input dtype, which
overflows fp16 above 256, and nanochat keeps norms, softmax and the softcap in fp32. Only weights and the KV cache
go low: that halves the bytes a decode step reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from backend.protocol import CACHE_PREFIXES, NEW_KV_PREFIXES

LOW = {"fp16": (torch.float16, 10), "bf16": (torch.bfloat16, 16)}  # torch dtype, onnx TensorProto enum
PRECISIONS = ("fp32", "fp16", "bf16")


def _to_low(tensor, precision: str, base_dir: Path):
    from onnx import numpy_helper

    dtype, onnx_type = LOW[precision]
    arr = torch.from_numpy(np.array(numpy_helper.to_array(tensor, str(base_dir)), dtype=np.float32)).to(dtype)
    out = type(tensor)()
    out.name, out.data_type = tensor.name, onnx_type
    out.dims.extend(tensor.dims)
    out.raw_data = arr.view(torch.int16).numpy().tobytes()  # fp16 and bf16 are both 2-byte words
    return out


def lower_file(path: Path, precision: str) -> Path:
    """Rewrite the fp32 graph at `path` (and its weights file) to `precision` in place. Weights are read one at a
    time from the fp32 file, so memory holds the lowered weights once, never the fp32 ones."""
    import onnx
    import onnx_ir as ir

    from export import graph

    proto = onnx.load(str(path), load_external_data=False)
    lower_precision(proto, precision, path.parent)
    model = ir.from_proto(proto)
    del proto
    graph.set_metadata(model, {"precision": precision})
    return graph.save(model, path.parent)


def lower_precision(proto, precision: str, base_dir: Path) -> None:
    """Rewrite the fp32 ModelProto in place to `precision` (fp16|bf16). Weights that feed MatMul/Gemm and Gather are
    stored low, those matmuls run low and their results are cast back to fp32; the KV cache is low at the graph's
    boundary (nanochat's CUDA cache is bf16 too) and fp32 inside; everything else (norms, rotary, attention scores,
    softmax, residual stream, lambdas, softcap, logits) stays fp32. Weights held as external data are read from
    `base_dir`; afterwards every weight is in the proto."""
    from onnx import TensorProto, helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    onnx_low = LOW[precision][1]
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def is_weight(name: str) -> bool:
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) < 2:
            return False
        # only when every consumer reads it as a weight, so no fp32 reader is left behind
        return all(c.op_type in ("MatMul", "Gemm", "Gather", "GatherND") for c in consumers[name])

    def cast(src: str, dst: str, to: int):
        return helper.make_node("Cast", [src], [dst], to=to, name=f"{dst}/cast")

    # decided before any is converted, so a weight read twice (G4's token embedding: the ids and the smear's
    # prev_ids) is lowered for both readers
    low = {name for name in inits if is_weight(name)}
    converted: set[str] = set()
    nodes = []
    for node in g.node:
        weights = [x for x in node.input if x in low]
        if not weights:
            nodes.append(node)
            continue
        for w in weights:
            if w not in converted:
                inits[w].CopyFrom(_to_low(inits[w], precision, base_dir))
                converted.add(w)
        if node.op_type in ("MatMul", "Gemm"):
            for j, x in enumerate(node.input):
                if x and x not in weights:
                    nodes.append(cast(x, f"{x}__{precision}__{node.name}", onnx_low))
                    node.input[j] = f"{x}__{precision}__{node.name}"
        out = node.output[0]
        node.output[0] = f"{out}__{precision}"
        nodes.extend([node, cast(node.output[0], out, TensorProto.FLOAT)])

    # the cache in the low dtype at the graph's boundary, fp32 inside
    state_in = [v for v in g.input if v.name.startswith(CACHE_PREFIXES)]
    state_out = [v for v in g.output if v.name.startswith(NEW_KV_PREFIXES)]
    inner = {v.name: f"{v.name}__f32" for v in state_in + state_out}
    for node in nodes:
        for field in (node.input, node.output):
            for j, x in enumerate(field):
                field[j] = inner.get(x, x)
    for v in state_in + state_out:
        v.type.tensor_type.elem_type = onnx_low
    # a Gather of the state (the batch's slots) reads the low dtype and casts only the rows it picked; a Shape
    # reads it as it is
    outer = {inner[v.name]: v.name for v in state_in}
    picked = []
    for node in nodes:
        picked.append(node)
        if node.op_type in ("Gather", "Shape") and node.input[0] in outer:
            node.input[0] = outer[node.input[0]]
            if node.op_type == "Gather":
                out = node.output[0]
                node.output[0] = f"{out}__{precision}"
                picked.append(cast(node.output[0], out, TensorProto.FLOAT))
    nodes = picked
    read_whole = {x for n in nodes for x in n.input}
    head = [cast(v.name, inner[v.name], TensorProto.FLOAT) for v in state_in if inner[v.name] in read_whole]
    tail = [cast(inner[v.name], v.name, onnx_low) for v in state_out]
    rewritten = [type(n)() for n in nodes]
    for new, old in zip(rewritten, nodes, strict=True):
        new.CopyFrom(old)
    g.ClearField("node")
    g.node.extend(head + rewritten + tail)
    for t in g.initializer:
        if uses_external_data(t):  # the few that stay fp32 (lambdas, scalars)
            load_external_data_for_tensor(t, str(base_dir))
    # the exporter's value_info still types the converted weights as float; drop those entries
    kept = [v for v in g.value_info if v.name not in converted]
    g.ClearField("value_info")
    g.value_info.extend(kept)
