"""
Whether TensorRT 10's ONNX parser takes a graph, decided from the ONNX file alone (no GPU, no TensorRT): each node's
op and input types are in the parser's support table, and each restriction the table states holds. An op missing
here is refused until its row is added from that table.
"""

from __future__ import annotations

from pathlib import Path

FLOATS = ("FLOAT", "FLOAT16", "BFLOAT16")
INTS = ("INT32", "INT64")
ANY = (*FLOATS, *INTS, "BOOL")

# op -> input element types its row lists, from onnx-tensorrt's docs/operators.md (the 10.x series; restrictions
# from 10.0, when computed axes started being refused: NVIDIA/TensorRT#3467)
SUPPORTED: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Max", "Min", "Mod", "Relu", "Sign"),
                    (*FLOATS, *INTS)),
    **dict.fromkeys(("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Range", "Clip", "TopK",
                     "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare",
                     "ArgMax", "ArgMin"), (*FLOATS, *INTS)),
    **dict.fromkeys(("Sqrt", "Reciprocal", "Exp", "Log", "Tanh", "Sigmoid", "Softmax", "LogSoftmax", "Sin",
                     "Cos", "Erf", "Floor", "Ceil", "Round", "Softplus", "MatMul", "Gemm", "CumSum"), FLOATS),
    **dict.fromkeys(("Reshape", "Transpose", "Concat", "Expand", "Gather", "GatherND", "GatherElements", "Where",
                     "Identity", "Shape", "Size", "Slice", "Split", "Squeeze", "Unsqueeze", "Tile", "Flatten",
                     "Trilu", "ConstantOfShape", "Constant"), ANY),
    **dict.fromkeys(("Not", "And", "Or", "Xor"), ("BOOL",)),
    **dict.fromkeys(("Cast", "CastLike"), (*ANY, "UINT8")),
    **dict.fromkeys(("ScatterND", "ScatterElements"), (*FLOATS, *INTS)),
}
REDUCES = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare")
TOPK_MAX = 3840  # "`K` input must be less than 3840"


def problems(path: Path) -> list[str]:
    """What TensorRT's parser would refuse in the graph at `path` (its weights are not read); [] if nothing."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    g = model.graph
    initializers = {t.name: t for t in g.initializer}
    constants = set(initializers) | {n.output[0] for n in g.node if n.op_type == "Constant"}
    name = {v: k for k, v in onnx.TensorProto.DataType.items()}
    types = {t.name: name[t.data_type] for t in g.initializer}
    types |= {v.name: name[v.type.tensor_type.elem_type] for v in (*g.input, *g.value_info, *g.output)
              if v.type.tensor_type.elem_type}
    found = []
    for node in g.node:
        where = f"{node.op_type} {node.name or node.output[0]}"
        if node.domain not in ("", "ai.onnx"):
            found.append(f"{where}: domain {node.domain} is not ONNX's")
            continue
        allowed = SUPPORTED.get(node.op_type)
        if allowed is None:
            found.append(f"{where}: not in TensorRT's operator support table")
            continue
        bad = {types[x] for x in node.input if x in types and types[x] not in allowed}
        if bad:
            found.append(f"{where}: input types {sorted(bad)} not among its supported types {list(allowed)}")
        found += [f"{where}: {p}" for p in restrictions(node, initializers, constants)]
    return found


def restrictions(node, initializers: dict, constants: set[str]) -> list[str]:
    """The table's restrictions on one node that it breaks."""
    from onnx import numpy_helper

    def initializer(i: int, what: str, among=initializers) -> list[str]:
        if len(node.input) > i and node.input[i] and node.input[i] not in among:
            return [f"{what} must be {'an initializer' if among is initializers else 'a constant'} (it is computed "
                    "by the graph)"]
        return []

    if node.op_type in REDUCES:
        return initializer(1, "`axes`")
    if node.op_type in ("Squeeze", "Unsqueeze"):  # "resolvable to a constant": a Constant node's output is one
        return initializer(1, "`axes`", constants)
    if node.op_type == "CumSum":
        return initializer(1, "`axis`")
    if node.op_type == "TopK":
        if found := initializer(1, "`K`"):
            return found
        attrs = {a.name: a.i for a in node.attribute}
        k = int(numpy_helper.to_array(initializers[node.input[1]]).max())
        return ([f"`K` must be less than {TOPK_MAX}, not {k}"] if k >= TOPK_MAX else []) + \
            (["`sorted` must be 1"] if attrs.get("sorted", 1) != 1 else [])
    return []


def require(path: Path) -> None:
    """Raise ValueError naming every rule the graph at `path` breaks."""
    if found := problems(path):
        raise ValueError(f"TensorRT's ONNX parser would refuse {path} (onnx-tensorrt docs/operators.md):\n  "
                         + "\n  ".join(found))
