"""TensorRT plugins for the Triton kernels, through ``tensorrt.plugin`` (TensorRT >= 10.7 Python plugins).

    !!! NOT RUN. TensorRT cannot be installed on our machines (see ENVIRONMENT.md), so this file has never been
    !!! imported with TensorRT present, never built an engine and never executed a plugin. It is written against
    !!! the documented ``tensorrt.plugin`` API (register / impl decorators, TensorDesc, from_shape_expr,
    !!! ``trtp.op.<namespace>.<name>``) and kept small on purpose. Test it on a machine with TensorRT before use:
    !!! tests/test_kernels.py::test_trt_plugins_register (skipped here by pytest.importorskip("tensorrt")).

Plugins (namespace ``zsad``), JIT implementations that call the same launchers as ``dispatch()`` on the stream
TensorRT hands over (so an engine that contains them needs Python + torch + triton at run time):

- ``zsad::knn_graph``          x [B,N,D] -> Â [B,N,N] fp32;            attrs k, edge_weight, symmetrize
- ``zsad::window_vv_attention`` v [B,H*W,C], scale [heads], bias [heads,T,T] -> [B,H*W,C];
                                                                       attrs n_heads, window, grid_h, grid_w
- ``zsad::dual_attention``     q, k, v [B,heads,L,hd] -> (o_qk, o_vv) like v

Use: ``register_plugins()`` once, then ``add_plugin_layer(network, "knn_graph", [x], k=8, edge_weight="binary",
symmetrize="max")`` (``network.add_plugin(trtp.op.zsad.knn_graph(...))``). Without TensorRT both raise
``RuntimeError`` saying so.
"""
# No ``from __future__ import annotations`` here: tensorrt.plugin reads the decorated functions' type hints, which
# must be real objects (TensorDesc, Tuple[...]), not strings.
import contextlib
from typing import Tuple  # noqa: UP035 - the form the tensorrt.plugin docs use (see above)

NAMESPACE = "zsad"
PLUGINS = ("knn_graph", "window_vv_attention", "dual_attention")

_REGISTERED = False


def _tensorrt_plugin():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise RuntimeError(
            "TensorRT (>= 10.7, with the tensorrt.plugin module) is not installed: the zsad TensorRT plugins are "
            "unavailable here. Build engines without them (the ONNX export uses the torch references) or install "
            "TensorRT on a GPU machine."
        ) from e
    return trt, trtp


@contextlib.contextmanager
def _on_stream(stream: int):
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        yield


def register_plugins() -> tuple[str, ...]:
    """Register the three plugins with TensorRT's plugin registry (idempotent). Returns their ids."""
    global _REGISTERED
    ids = tuple(f"{NAMESPACE}::{name}" for name in PLUGINS)
    if _REGISTERED:
        return ids
    trt, trtp = _tensorrt_plugin()
    import torch

    from . import dual_attention, knn_graph, window_attention

    def cuda(t):
        return torch.as_tensor(t, device="cuda")

    # -- kNN graph -----------------------------------------------------------------------------------------------
    @trtp.register("zsad::knn_graph")
    def _knn_graph_desc(x: trtp.TensorDesc, k: int, edge_weight: str, symmetrize: str) -> trtp.TensorDesc:
        n = x.shape_expr[1]
        return trtp.from_shape_expr((x.shape_expr[0], n, n), dtype=trt.float32)

    @trtp.impl("zsad::knn_graph")
    def _knn_graph_impl(x: trtp.Tensor, k: int, edge_weight: str, symmetrize: str,
                        outputs: Tuple[trtp.Tensor], stream: int) -> None:  # noqa: UP006
        with _on_stream(stream):
            knn_graph.knn_graph_triton(cuda(x), k, edge_weight, symmetrize, out=cuda(outputs[0]))

    # -- SOWA window V-V attention ---------------------------------------------------------------------------------
    @trtp.register("zsad::window_vv_attention")
    def _window_desc(v: trtp.TensorDesc, scale: trtp.TensorDesc, bias: trtp.TensorDesc, n_heads: int,
                     window: int, grid_h: int, grid_w: int) -> trtp.TensorDesc:
        return v.like()

    @trtp.impl("zsad::window_vv_attention")
    def _window_impl(v: trtp.Tensor, scale: trtp.Tensor, bias: trtp.Tensor, n_heads: int, window: int,
                     grid_h: int, grid_w: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:  # noqa: UP006
        with _on_stream(stream):
            window_attention.window_vv_attention_triton(cuda(v), n_heads, cuda(scale), cuda(bias), window,
                                                        (grid_h, grid_w), out=cuda(outputs[0]))

    # -- dual-stream attention -------------------------------------------------------------------------------------
    @trtp.register("zsad::dual_attention")
    def _dual_desc(q: trtp.TensorDesc, k: trtp.TensorDesc,
                   v: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:  # noqa: UP006
        return v.like(), v.like()

    @trtp.impl("zsad::dual_attention")
    def _dual_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor,
                   outputs: Tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:  # noqa: UP006
        with _on_stream(stream):
            dual_attention.dual_attention_triton(cuda(q), cuda(k), cuda(v), out_qk=cuda(outputs[0]),
                                                 out_vv=cuda(outputs[1]))

    _REGISTERED = True
    return ids


def add_plugin_layer(network, name: str, inputs: list, **attrs):
    """Add plugin ``zsad::<name>`` to a TensorRT ``INetworkDefinition`` (registers the plugins first)."""
    if name not in PLUGINS:
        raise ValueError(f"unknown zsad plugin '{name}', expected one of {PLUGINS}")
    register_plugins()
    _, trtp = _tensorrt_plugin()
    return network.add_plugin(getattr(getattr(trtp.op, NAMESPACE), name)(*inputs, **attrs))
