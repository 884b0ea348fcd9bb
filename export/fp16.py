"""fp16 ONNX for ONNX Runtime's CUDA provider, with the normalisation reductions kept in fp32.

CLIP's residual stream has large outlier channels: LayerNorm's mean/variance (and the L2 norms of the cosine
similarities) overflow or lose all precision in fp16, so those ops stay fp32 with casts around them
(clip-as-service found the same overflow in TensorRT). Inputs and outputs stay fp32, so the Triton configs and
clients do not change. TensorRT does not use this file: its fp16 is a builder flag on the fp32 ONNX.

onnxconverter-common's ``convert_float_to_float16`` (1.16) gets three things wrong on our stages, each made right here
(tests/test_half_precision.py loads every converted stage in ONNX Runtime, which refused or mis-typed all three):

- a blocked (fp32) node that writes a graph output turns that output into fp16 (``keep_io_types`` is ignored), and
  one that reads a graph output gets no cast in front of it: every graph output is first routed through an Identity,
  so no blocked node touches a graph output's name;
- a ``Cast(to=FLOAT)`` keeps ``to=FLOAT`` while its output is re-declared fp16 (ORT: type error at load): those
  casts are blocked, i.e. stay fp32 with a cast to fp16 after them where an fp16 op reads them;
- integer ids cast to float for an ArgMax (Bayes-PFL's end token: CLIP ids up to 49407) are not exact in fp16
  (spacing 32 above 32768: the start token 49406 and the end token 49407 both round to 49408): ArgMax and ArgMin stay
  fp32, so the ids reach them exactly.

A stage that selects (a TopK: BAG-CLIP's kNN neighbours, Bayes-PFL's top-k image score) is not converted at all:
the selection is a discontinuous step over fp32 similarities rounded at 2^-14 (zsad.selection), which fp16's 2^-11
spacing near 1 cannot hold, and everything around it is cheap.
"""
from __future__ import annotations

from pathlib import Path

from zsad import ZsadError

KEEP_FP32 = ["LayerNormalization", "ReduceMean", "ReduceL2", "ReduceSumSquare", "Pow", "Sqrt", "ReduceSum",
             "ArgMax", "ArgMin"]
SELECTING_OPS = ("TopK",)


def _route_outputs_through_identity(model) -> None:
    """Graph output X is renamed X__value where it is made and read; an Identity writes X from it."""
    from onnx import helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    renamed = {name: f"{name}__value" for name in outputs}
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    graph.node.extend(helper.make_node("Identity", [renamed[o.name]], [o.name], name=f"{o.name}__identity")
                      for o in graph.output)


def _io_types(model) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def selects(model) -> bool:
    """Whether the ONNX graph holds a selection (a TopK), which keeps the stage in fp32."""
    return any(n.op_type in SELECTING_OPS for n in model.graph.node)


def convert_to_fp16(path: Path) -> Path:
    """Rewrite the ONNX file at ``path`` in fp16 (weights and compute) except ``KEEP_FP32`` ops; I/O stays fp32.

    A stage with a selection (``selects``) is left in fp32 (module docstring)."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as err:
        raise ZsadError("--fp16 for ONNX Runtime needs onnxconverter-common: pip install 'zsad[onnx]'") from err
    model = onnx.load(str(path))
    if selects(model):
        return path
    io_types = _io_types(model)
    _route_outputs_through_identity(model)
    float_casts = [n.name for n in model.graph.node if n.op_type == "Cast"
                   and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=KEEP_FP32,
                                             node_block_list=float_casts, disable_shape_infer=False)
    changed = {n: (t, _io_types(model).get(n)) for n, t in io_types.items() if _io_types(model).get(n) != t}
    if changed:
        raise ZsadError(f"fp16 conversion of {path} changed input/output types (ONNX element types, was -> now): "
                        f"{changed}")
    onnx.checker.check_model(model, full_check=True)  # strict type inference: a mis-typed node fails here
    onnx.save(model, str(path))
    return path


# -- ONNX Runtime's CPU provider on the converted graphs (measured with onnxruntime 1.32.0) ---------------------------
# It runs them, with two provisos (tests/test_half_precision.py checks every method's converted chain this way):
# - at ORT_ENABLE_ALL, creating the session of a converted CLIP encoder dies with SIGSEGV inside the level-3 layout
#   pass NchwcTransformer (the verbose log's last line: "Applying graph transformer NchwcTransformer"); with that one
#   transformer disabled (or at ORT_ENABLE_EXTENDED) every converted stage loads and runs;
# - its CPU kernels in fp16 are data movement only (Reshape, Transpose, Gather, Slice, Concat, Expand, Clip, Max,
#   ScatterElements, Cast, Shape): every arithmetic node (MatMul, Gemm, Conv, Add, Mul, Sub, Div, Sigmoid, Erf, Tanh,
#   Exp, Greater, Where, Einsum, Resize, Reciprocal) gets casts to fp32 and back inserted around it, and Softmax /
#   Softplus are expanded into their fp32 function bodies (``cpu_precision`` lists them per graph). So the CPU check
#   computes in fp32 between fp16 tensors: it finds what fp16 storage does (overflow past 65504, rounding of every
#   stored tensor, the conversion's own mistakes), not fp16 arithmetic inside a kernel. Its cast insertion also drops a
#   lossy fp32 -> fp16 -> fp32 pair around a node without an fp16 kernel (an fp16 ArgMax then sees unrounded values):
#   onnx.reference.ReferenceEvaluator runs every node in its declared dtype, where that matters.
CPU_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def cpu_session(path: Path):
    """An ONNX Runtime CPU session for a converted graph (``CPU_DISABLED_OPTIMIZERS`` off)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))


def cpu_runner(path: Path):
    """``parity.ort_runner`` for a converted graph on the CPU provider: numpy feed -> numpy outputs by name."""
    sess = cpu_session(path)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}

    def run(feed: dict) -> dict:
        return dict(zip(names, sess.run(None, {k: v for k, v in feed.items() if k in wanted}), strict=True))

    return run


def cpu_precision(path: Path, scratch: Path) -> dict[str, dict[str, int]]:
    """Which of a converted graph's fp16 nodes ONNX Runtime's CPU provider runs in fp16 and which in fp32 (casts
    inserted around them), by op type; "replaced": fp16 nodes it removed (casts made redundant by its own) or replaced
    by their fp32 function bodies (Softmax, Softplus).

    Reads the graph ORT itself writes after partitioning (``optimized_model_filepath`` at ORT_DISABLE_ALL, so only its
    mandatory cast insertion has run) to ``scratch``."""
    import onnx
    import onnxruntime as ort

    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def types(model) -> dict:
        model = onnx.shape_inference.infer_shapes(model)
        t = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
        t.update({i.name: i.data_type for i in model.graph.initializer})
        return t

    def computes_in(node, t: dict):
        floats = [t[i] for i in node.input if t.get(i) in (f16, f32)]
        return floats[0] if floats else None

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.optimized_model_filepath = str(scratch / "ort_cpu_partitioned.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ran, converted = onnx.load(opts.optimized_model_filepath), onnx.load(str(path))
    t_ran, t_conv = types(ran), types(converted)
    by_name = {n.name: n for n in ran.graph.node}
    out: dict[str, dict[str, int]] = {"fp16": {}, "fp32": {}, "replaced": {}}
    for node in converted.graph.node:
        if computes_in(node, t_conv) != f16:
            continue
        kind = ("replaced" if node.name not in by_name else
                "fp16" if computes_in(by_name[node.name], t_ran) == f16 else "fp32")
        out[kind][node.op_type] = out[kind].get(node.op_type, 0) + 1
    return out
