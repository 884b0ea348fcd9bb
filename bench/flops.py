"""Analytic FLOPs per stage, counted once from the model's own shapes.

Each stage runs on fake tensors (no arithmetic, any size, even ViT-L at 518 px in a second or two) under torch's
FlopCounterMode, which counts matmuls and convolutions from their shapes. Attention on the CPU dispatches to ops
FlopCounterMode has no formula for, so the MHA fast path is disabled while counting and the CPU SDPA op gets the
standard formula (2 N M d for Q K^T plus 2 N M d_v for the weighted sum). One multiply-add = 2 FLOPs.
Element-wise ops (softmax, LayerNorm, GELU) are not counted, as usual.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    *batch, n, d = q_shape
    m, dv = k_shape[-2], v_shape[-1]
    b = 1
    for x in batch:
        b *= x
    return 2 * b * n * m * d + 2 * b * n * m * dv


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(query.shape if hasattr(query, "shape") else query, key.shape if hasattr(key, "shape") else key,
                       value.shape if hasattr(value, "shape") else value)


def stage_flops(stage, batch: int = 1) -> int:
    """FLOPs of one call of ``stage.module`` at ``batch`` (fake tensors: nothing is computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu}
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            inputs = tuple(mode.from_tensor(t) for t in stage.example_inputs(batch))
            with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                stage.module(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops())


def method_flops(method) -> dict[str, float]:
    """GFLOPs per image for every stage of ``method`` (and their total under "total")."""
    out = {st.name: stage_flops(st) / 1e9 for st in method.stages()}
    out["total"] = sum(out.values())
    return out
