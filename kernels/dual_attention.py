"""Dual-stream attention of the backbone (AnomalyCLIP DPAM / BAG-CLIP BSA): reference, Triton kernel, ``dispatch()``.

For one block's per-head projections q, k, v [B, heads, L, hd] (from one qkv projection, bias included):

    o_qk = softmax(q kᵀ * s) v        (the stock stream)
    o_vv = softmax(v vᵀ * s) v        (the V-V stream, q = k = v)

with s = hd^-1/2 unless given. The reference is two ``F.scaled_dot_product_attention`` calls (exactly what
``zsad.modules.attention`` always ran, so CPU results do not change; ONNX export traces it too).

Triton kernel (flash-style): one program per (query block, image x head). It loads its q rows and v rows once,
then streams the key/value blocks of the sequence once, feeding both streams from the same k and v tiles: two
online softmaxes (the shared step ``_common.online_softmax_update``: exp2, running max and sum), two accumulators.
Sequence lengths need not be powers of two (577, 1370 at ViT-L 336 / 518 px): the last key block is masked to
-inf, the last query block's rows are not stored.
``vv_attention_triton`` is the same kernel with the q-k stream compiled out (the backbone's ``vv`` mode).
Inputs may be strided views (the head split of a packed qkv projection); the last dim must be contiguous.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ._common import (
    LOG2E,
    KernelArgumentError,
    check_float,
    for_current_mode,
    next_pow2,
    online_softmax_update,
    skipped_rows,
    sweep_unavailable_reason,
    timed_row,
    tl,
    triton,
    use_triton,
)


# == torch reference ============================================================================================
def dual_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ s) v, softmax(v vᵀ s) v) for [B, heads, L, hd] inputs: two SDPA calls."""
    return (F.scaled_dot_product_attention(q, k, v, scale=scale),
            F.scaled_dot_product_attention(v, v, v, scale=scale))


def vv_attention_reference(v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(v vᵀ s) v for [B, heads, L, hd]: one SDPA call with q = k = v."""
    return F.scaled_dot_product_attention(v, v, v, scale=scale)


def dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both streams: the fused Triton kernel for CUDA tensors at inference, two SDPA calls elsewhere."""
    if use_triton(q, k, v):
        return dual_attention_triton(q, k, v, scale)
    return dual_attention_reference(q, k, v, scale)


def vv_dispatch(v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The V-V stream alone: Triton for CUDA tensors at inference, SDPA elsewhere."""
    if use_triton(v):
        return vv_attention_triton(v, scale)
    return vv_attention_reference(v, scale)


# == Triton kernel ===============================================================================================
@triton.jit
def _dual_attention_kernel(
    Q, K, V, O_QK, O_VV,
    n_heads, L, qk_scale,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
    sab, sah, sal, svvb, svvh, svvl,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WITH_QK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Query rows [BLOCK_M] of one (image, head); qk_scale = s * log2(e) (the softmaxes use exp2)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < L
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]
    v_bh = V + b * svb + h * svh
    k_bh = K + b * skb + h * skh
    vq = tl.load(v_bh + rm[:, None] * svl + dd[None, :], mask=q_mask, other=0.0)  # V rows as V-V queries
    m_vv = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_vv = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_vv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_qk = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_qk = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_qk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sql + dd[None, :], mask=q_mask, other=0.0)  # dead if not WITH_QK
    for start in range(0, L, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < L
        kv_mask = n_ok[:, None] & d_ok[None, :]
        vt = tl.load(v_bh + rn[:, None] * svl + dd[None, :], mask=kv_mask, other=0.0)  # read once, used 2-3x
        # V-V stream
        s = tl.dot(vq, tl.trans(vt), input_precision=DOT_PREC) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_vv, l_vv, acc_vv = online_softmax_update(m_vv, l_vv, acc_vv, s, vt, DOT_PREC)
        # Q-K stream, same V tile
        if WITH_QK:
            kt = tl.load(k_bh + rn[:, None] * skl + dd[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_qk, l_qk, acc_qk = online_softmax_update(m_qk, l_qk, acc_qk, s, vt, DOT_PREC)
    o = acc_vv / l_vv[:, None]
    tl.store(O_VV + b * svvb + h * svvh + rm[:, None] * svvl + dd[None, :], o.to(O_VV.dtype.element_ty), mask=q_mask)
    if WITH_QK:
        o = acc_qk / l_qk[:, None]
        tl.store(O_QK + b * sab + h * sah + rm[:, None] * sal + dd[None, :], o.to(O_QK.dtype.element_ty), mask=q_mask)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _new_out(v: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, hd] view of a [B, L, heads, hd] buffer: merging the heads afterwards is a free reshape."""
    b, h, n, hd = v.shape
    return torch.empty(b, n, h, hd, dtype=v.dtype, device=v.device).transpose(1, 2)


def _check(name: str, t: torch.Tensor, shape: tuple) -> None:
    if t.dim() != 4:
        raise KernelArgumentError(f"{name}: expected [B, heads, L, hd], got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(shape):
        raise KernelArgumentError(f"{name}: shape {tuple(t.shape)} does not match {tuple(shape)}")
    check_float(name, t)


# The launch choice (block_m, block_n, num_warps, num_stages) by input precision, the same on every target. Built
# ahead of time for sm_80 / sm_89 / sm_90a by kernels/aot.py (bench/results/*-kernels-aot.md): in fp32 (FMA dots,
# "ieee") 64 x 64 blocks spill on all three, both streams (20 KB of spill stores) and the V-V stream alone; 32 x 16
# fits (166-178 registers both streams, 71-76 V-V alone). fp16 / bf16 fit with 64 x 64 on 4 warps.
LAUNCH_CONFIGS: dict[str, tuple[int, int, int, int]] = {"fp32": (32, 16, 4, 2), "half": (64, 64, 4, 2)}


def precision(dtype: torch.dtype) -> str:
    """'fp32' or 'half' (fp16 / bf16): the kernel's two code paths (FMA or tensor-core dots)."""
    return "fp32" if dtype == torch.float32 else "half"


def _launch(q, k, v, o_qk, o_vv, scale, with_qk, block_m, block_n, num_warps, num_stages):
    b, h, n, hd = v.shape
    cfg = LAUNCH_CONFIGS[precision(v.dtype)]
    block_m, block_n, num_warps, num_stages = (given or chosen for given, chosen in
                                               zip((block_m, block_n, num_warps, num_stages), cfg, strict=True))
    s = float(scale) if scale is not None else hd ** -0.5
    grid = (-(-n // block_m), b * h)
    for_current_mode(_dual_attention_kernel)[grid](
        q, k, v, o_qk, o_vv,
        h, n, s * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o_qk.stride(0), o_qk.stride(1), o_qk.stride(2), o_vv.stride(0), o_vv.stride(1), o_vv.stride(2),
        HEAD_DIM=hd, BLOCK_D=max(16, next_pow2(hd)), BLOCK_M=block_m, BLOCK_N=block_n, WITH_QK=with_qk,
        DOT_PREC="ieee" if v.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )


def dual_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    out_qk: torch.Tensor | None = None,
    out_vv: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both streams in one pass over K and V. Outputs [B, heads, L, hd] (by default views of [B, L, heads, hd]
    memory, so the head merge before out_proj is free); ``out_qk``/``out_vv`` may be given to write into. Launch
    parameters left out are ``LAUNCH_CONFIGS``'s for the input's precision."""
    _check("v", v, v.shape)
    _check("q", q, v.shape)
    _check("k", k, v.shape)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out_qk = _new_out(v) if out_qk is None else out_qk
    out_vv = _new_out(v) if out_vv is None else out_vv
    for name, o in (("out_qk", out_qk), ("out_vv", out_vv)):
        if o.shape != v.shape or o.stride(-1) != 1:
            raise KernelArgumentError(f"{name} must have shape {tuple(v.shape)} and a contiguous last dim")
    _launch(q, k, v, out_qk, out_vv, scale, True, block_m, block_n, num_warps, num_stages)
    return out_qk, out_vv


def vv_attention_triton(
    v: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """softmax(v vᵀ s) v by the same kernel with the q-k stream compiled out."""
    _check("v", v, v.shape)
    v = _last_dim_contiguous(v)
    out = _new_out(v) if out is None else out
    if out.shape != v.shape or out.stride(-1) != 1:
        raise KernelArgumentError(f"out must have shape {tuple(v.shape)} and a contiguous last dim")
    _launch(v, v, v, out, out, scale, False, block_m, block_n, num_warps, num_stages)
    return out


# == perf sweep ==================================================================================================
# ViT-L/14: 16 heads x 64; 577 tokens at 336 px, 1370 at 518 px (class token included)
PERF_CASES: list[dict[str, Any]] = [
    dict(batch=b, tokens=n, heads=16, head_dim=64, dtype=dt)
    for n in (577, 1370) for b in (1, 8) for dt in ("float16", "float32")
]
# untuned launch configurations to try on a GPU, by precision: (block_m, block_n, num_warps, num_stages); the first
# is the dispatcher's choice; each is built ahead of time for sm_80 / sm_89 / sm_90a without a spill (kernels/aot.py;
# in fp32 the former list's 64 x 64, 64 x 32, 128 x 64 and 32 x 64 (3 stages) all spill, and so do 32 x 32 in one or
# two stages and 32 x 16 in one: not tried)
PERF_CONFIGS: dict[str, list[tuple[int, int, int, int]]] = {
    "half": [LAUNCH_CONFIGS["half"], (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 3)],
    "fp32": [LAUNCH_CONFIGS["fp32"], (16, 32, 4, 2)],
}


def perf_sweep(device: str = "cuda", cases: list[dict] | None = None) -> list[dict]:
    """Median ms: the fused kernel (a few launch configs) vs two SDPA calls (the reference) and vs one SDPA call
    (the floor a one-pass kernel is up against). Without CUDA every row is ``status="skipped"``, no number."""
    cases = cases or PERF_CASES
    reason = sweep_unavailable_reason(device)
    if reason:
        return skipped_rows("dual_attention", cases, reason, device)
    rows = []
    for case in cases:
        dt = getattr(torch, case["dtype"])
        g = torch.Generator(device=device).manual_seed(0)
        shape = (case["batch"], case["tokens"], 3, case["heads"], case["head_dim"])
        qkv = torch.randn(*shape, device=device, generator=g).to(dt)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # strided views, as in the backbone
        with torch.no_grad():
            for bm, bn, nw, ns in PERF_CONFIGS[precision(dt)]:
                rows.append(timed_row("dual_attention", dict(case, config=f"{bm}x{bn}w{nw}s{ns}"), "triton",
                                      partial(dual_attention_triton, q, k, v, block_m=bm, block_n=bn, num_warps=nw,
                                              num_stages=ns), device))
            rows.append(timed_row("dual_attention", case, "two_sdpa_reference",
                                  partial(dual_attention_reference, q, k, v), device))
            rows.append(timed_row("dual_attention", case, "one_sdpa_floor", partial(vv_attention_reference, v), device))
    return rows
