"""SOWA's window V-V cosine attention (the FWA adapter's attention): torch reference, Triton kernel, ``dispatch()``.

Definition (methods/bagclip_sowa.md section 3.1, step 3), for raw values v [B, H*W, C] in token order (row-major
grid, class token already dropped), ``n_heads`` heads of C / n_heads channels, windows of ``window`` x ``window``
tokens (no shift, no mask):

    per window and head h, with v̂ = v / max(||v||, eps) (L2 over the head's channels):
    logits_h = (v̂ v̂ᵀ) * scale_h + bias_h
    out_h    = softmax(logits_h) @ v      (the RAW values, not v̂)

``scale`` [n_heads] is the finished per-head multiplier, scale_h = exp(min(θ_h, ln 100)) with θ SOWA's learnable
log-scale (Swin-v2's clamped cosine-attention scale): compute it with ``logit_scale(theta)`` (differentiable), as
``zsad.modules.window_attention.FrozenWindowAdapter.position_terms()`` does, so export can fold it into a
constant. ``bias`` [n_heads, T, T] (T = window^2) is the finished additive position bias (SOWA: 16 * sigmoid(CPB)).
The output [B, H*W, C] is in token order with the heads concatenated, ready for ``out_proj``; the window partition
and reverse are part of the op. ``grid`` is the token grid: an int (square), (H, W), or None (square, inferred).

SOWA's adapter projects v = x W_vᵀ and applies out_proj around this op; both are per-token linears, so they commute
with the window partition and stay outside. Attention dropout (SOWA trains with 0.1) exists only in the reference
(``dropout_p``); the Triton kernel is for inference.

Triton kernel: one launch, grid (B * windows * heads, query blocks). Each program gathers its window's rows
straight from v by index arithmetic (the partition/reverse is the indexing), L2-normalises query and key rows in
fp32, adds the bias tile, runs the shared online-softmax step (``_common.online_softmax_update``, base 2: scale and
bias come premultiplied by log2 e) over key blocks of the window (masked tail: T = 144 is not a power of two),
accumulating P @ v with the raw values, and writes its rows back to their token positions.
"""
from __future__ import annotations

import math
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

MAX_LOGIT_SCALE = 100.0


# == torch reference ============================================================================================
def logit_scale(theta: torch.Tensor, max_scale: float = MAX_LOGIT_SCALE) -> torch.Tensor:
    """Swin-v2's clamped cosine-attention scale from the learnable log-scale θ: exp(min(θ, ln max_scale))."""
    return torch.exp(torch.clamp(theta, max=math.log(max_scale)))


def resolve_grid(n_tokens: int, grid: int | tuple[int, int] | None, window: int) -> tuple[int, int]:
    """(H, W) of the token grid: given (int = square), or the square one; sides must be multiples of ``window``."""
    if grid is None:
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise KernelArgumentError(f"{n_tokens} tokens are not a square grid: pass grid=(H, W)")
        grid = (side, side)
    elif isinstance(grid, int):
        grid = (grid, grid)
    gh, gw = int(grid[0]), int(grid[1])
    if gh * gw != n_tokens:
        raise KernelArgumentError(f"grid {gh}x{gw} does not hold {n_tokens} tokens")
    if window < 1 or gh % window or gw % window:
        raise KernelArgumentError(f"grid {gh}x{gw} is not a whole number of {window}x{window} windows (pad first)")
    return gh, gw


def window_partition(x: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """[B, H*W, C] (token order) -> [B * nW, window*window, C], windows in row-major order per image."""
    b, _, c = x.shape
    gh, gw = grid
    x = x.reshape(b, gh // window, window, gw // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(w: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Inverse of ``window_partition``: [B * nW, window*window, C] -> [B, H*W, C]."""
    gh, gw = grid
    c = w.shape[-1]
    x = w.reshape(-1, gh // window, gw // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, gh * gw, c)


def _check_args(v: torch.Tensor, n_heads: int, scale: torch.Tensor, bias: torch.Tensor, window: int,
                grid: int | tuple[int, int] | None) -> tuple[int, int]:
    if v.dim() != 3:
        raise KernelArgumentError(f"expected values [B, H*W, C], got shape {tuple(v.shape)}")
    c = v.shape[-1]
    if n_heads < 1 or c % n_heads:
        raise KernelArgumentError(f"{c} channels do not split into {n_heads} heads")
    if scale.numel() != n_heads:
        raise KernelArgumentError(f"scale needs {n_heads} values (one per head), got {scale.numel()}")
    t = window * window
    if tuple(bias.shape) != (n_heads, t, t):
        raise KernelArgumentError(f"bias must be [{n_heads}, {t}, {t}] for {window}x{window} windows, "
                                  f"got {tuple(bias.shape)}")
    return resolve_grid(v.shape[1], grid, window)


def window_vv_attention_reference(
    v: torch.Tensor,
    n_heads: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
    window: int = 12,
    grid: int | tuple[int, int] | None = None,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Window V-V cosine attention in plain torch: v [B, H*W, C] -> [B, H*W, C] (see the module docstring)."""
    grid = _check_args(v, n_heads, scale, bias, window, grid)
    t = window * window
    c = v.shape[-1]
    vw = window_partition(v, grid, window)                                  # [B*nW, T, C]
    vh = vw.reshape(-1, t, n_heads, c // n_heads).transpose(1, 2)           # [B*nW, heads, T, hd]
    vn = F.normalize(vh, dim=-1, eps=eps)
    logits = (vn @ vn.transpose(-1, -2)) * scale.reshape(1, n_heads, 1, 1).to(vn.dtype) + bias.to(vn.dtype).unsqueeze(0)
    attn = torch.softmax(logits, dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=training)
    out = (attn @ vh).transpose(1, 2).reshape(-1, t, c)                   # raw values
    return window_reverse(out, grid, window)


def dispatch(
    v: torch.Tensor,
    n_heads: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
    window: int = 12,
    grid: int | tuple[int, int] | None = None,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The Triton kernel for CUDA tensors at inference (no dropout, no grad), the torch reference elsewhere."""
    if not (training and dropout_p > 0.0) and use_triton(v, scale, bias):
        return window_vv_attention_triton(v, n_heads, scale, bias, window, grid, eps)
    return window_vv_attention_reference(v, n_heads, scale, bias, window, grid, eps, dropout_p, training)


# == Triton kernel ===============================================================================================
@triton.jit
def _window_vv_kernel(
    V, SCALE, BIAS, OUT,
    n_heads, n_win, n_win_w, grid_w,
    stride_vb, stride_vl, stride_ob, stride_ol, stride_bh, stride_bq,
    eps,
    WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Query rows [BLOCK_M] of one (image, window, head). SCALE and BIAS come multiplied by log2(e): the
    online softmax works in base 2 (exp2)."""
    T = WINDOW * WINDOW  # constexpr
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    h = pid % n_heads
    w = (pid // n_heads) % n_win
    b = pid // (n_heads * n_win)
    wy = w // n_win_w
    wx = w % n_win_w
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM
    v_b = V + b * stride_vb + h * HEAD_DIM
    # query rows: window-local index -> token index (the window partition, folded into the addressing)
    tq = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = tq < T
    rq = (wy * WINDOW + tq // WINDOW) * grid_w + wx * WINDOW + tq % WINDOW
    q = tl.load(v_b + rq[:, None] * stride_vl + dd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32)
    qn = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), eps)[:, None]
    scale = tl.load(SCALE + h)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        tk = start + tl.arange(0, BLOCK_N)
        k_ok = tk < T
        rk = (wy * WINDOW + tk // WINDOW) * grid_w + wx * WINDOW + tk % WINDOW
        kv = tl.load(v_b + rk[:, None] * stride_vl + dd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        kf = kv.to(tl.float32)
        kn = kf / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=1)), eps)[:, None]
        s = tl.dot(qn.to(kv.dtype), tl.trans(kn.to(kv.dtype)), input_precision=DOT_PREC) * scale
        s += tl.load(BIAS + h * stride_bh + tq[:, None] * stride_bq + tk[None, :],
                     mask=q_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, s, kv, DOT_PREC)
    out = acc / l_i[:, None]
    tl.store(OUT + b * stride_ob + rq[:, None] * stride_ol + h * HEAD_DIM + dd[None, :],
             out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


# The launch choice (block_m, block_n, num_warps, num_stages) by input precision, the same on every target. Built
# ahead of time for sm_80 / sm_89 / sm_90a by kernels/aot.py (bench/results/*-kernels-aot.md): in fp32 (its dots on
# the FMA units, "ieee") 64 x 64 blocks spill on all three (4 or 8 warps, 2 or 3 stages; 32 registers and a 6.5 KB
# stack frame on sm_90a), and so does every 2-stage pipeline tried; 32 x 32 blocks in one stage fit (109-209
# registers). fp16 / bf16 fit with 64 x 64 on 8 warps.
LAUNCH_CONFIGS: dict[str, tuple[int, int, int, int]] = {"fp32": (32, 32, 4, 1), "half": (64, 64, 8, 2)}


def precision(dtype: torch.dtype) -> str:
    """'fp32' or 'half' (fp16 / bf16): the kernel's two code paths (FMA or tensor-core dots)."""
    return "fp32" if dtype == torch.float32 else "half"


def window_vv_attention_triton(
    v: torch.Tensor,
    n_heads: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
    window: int = 12,
    grid: int | tuple[int, int] | None = None,
    eps: float = 1e-12,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The Triton kernel (same contract as the reference, without dropout). ``out`` [B, H*W, C] (last dim
    contiguous) may be given to write into. Computes in fp32; fp16/bf16 inputs use half-precision ``tl.dot``.
    Launch parameters left out are ``LAUNCH_CONFIGS``'s for the input's precision."""
    gh, gw = _check_args(v, n_heads, scale, bias, window, grid)
    check_float("v", v)
    cfg = LAUNCH_CONFIGS[precision(v.dtype)]
    block_m, block_n, num_warps, num_stages = (given or chosen for given, chosen in
                                               zip((block_m, block_n, num_warps, num_stages), cfg, strict=True))
    b, n_tok, c = v.shape
    hd = c // n_heads
    if v.stride(-1) != 1:
        v = v.contiguous()
    scale = (scale.detach().reshape(-1).to(torch.float32) * LOG2E).contiguous()
    bias = (bias.detach().to(torch.float32) * LOG2E).contiguous()
    if out is None:
        out = torch.empty_like(v, memory_format=torch.contiguous_format)
    if out.shape != v.shape or out.stride(-1) != 1:
        raise KernelArgumentError(f"out must have shape {tuple(v.shape)} and a contiguous last dim")
    n_win_w = gw // window
    n_win = (gh // window) * n_win_w
    t = window * window
    grid_ = (b * n_win * n_heads, -(-t // block_m))
    for_current_mode(_window_vv_kernel)[grid_](
        v, scale, bias, out,
        n_heads, n_win, n_win_w, gw,
        v.stride(0), v.stride(1), out.stride(0), out.stride(1), bias.stride(0), bias.stride(1),
        eps,
        WINDOW=window, HEAD_DIM=hd, BLOCK_D=max(16, next_pow2(hd)), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PREC="ieee" if v.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )
    return out


# == perf sweep ==================================================================================================
# SOWA at 336 px: 24 x 24 grid, 4 windows of 12 x 12, 8 heads x 128 (C = 1024)
PERF_CASES: list[dict[str, Any]] = [
    dict(batch=1, grid=24, channels=1024, heads=8, window=12, dtype="float32"),
    dict(batch=1, grid=24, channels=1024, heads=8, window=12, dtype="float16"),
    dict(batch=8, grid=24, channels=1024, heads=8, window=12, dtype="float32"),
    dict(batch=8, grid=24, channels=1024, heads=8, window=12, dtype="float16"),
]
# untuned launch configurations to try on a GPU, by precision: (block_m, block_n, num_warps, num_stages); the first
# is the dispatcher's choice; each is built ahead of time for sm_80 / sm_89 / sm_90a without a spill (kernels/aot.py;
# (64, 64, 4, 2) and (64, 32, 4, 3) in fp16 spill on sm_80 and sm_89 and are not tried)
PERF_CONFIGS: dict[str, list[tuple[int, int, int, int]]] = {
    "half": [LAUNCH_CONFIGS["half"], (32, 64, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    "fp32": [LAUNCH_CONFIGS["fp32"], (16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1)],
}


def _sdpa_folded(v, n_heads, scale, bias, window, grid, eps=1e-12):
    """The same op as one SDPA call (q = v̂ * s_h, k = v̂, value = v, attn_mask = bias): a cuDNN/flash baseline."""
    t = window * window
    c = v.shape[-1]
    vh = window_partition(v, grid, window).reshape(-1, t, n_heads, c // n_heads).transpose(1, 2)
    vn = F.normalize(vh, dim=-1, eps=eps)
    q = vn * scale.reshape(1, n_heads, 1, 1).to(vn.dtype)
    o = F.scaled_dot_product_attention(q, vn, vh, attn_mask=bias.to(vn.dtype).unsqueeze(0), scale=1.0)
    return window_reverse(o.transpose(1, 2).reshape(-1, t, c), grid, window)


def perf_sweep(device: str = "cuda", cases: list[dict] | None = None) -> list[dict]:
    """Median ms per case: Triton kernel, torch reference, and the SDPA-folded form. Rows for zsad-bench; without
    CUDA every row is ``status="skipped"`` with the reason and no number."""
    cases = cases or PERF_CASES
    reason = sweep_unavailable_reason(device)
    if reason:
        return skipped_rows("window_vv_attention", cases, reason, device)
    rows = []
    for case in cases:
        dt = getattr(torch, case["dtype"])
        g = torch.Generator(device=device).manual_seed(0)
        n, c, h, w = case["grid"] ** 2, case["channels"], case["heads"], case["window"]
        v = torch.randn(case["batch"], n, c, device=device, generator=g).to(dt)
        scale = logit_scale(torch.full((h,), math.log(10.0), device=device))
        bias = 16 * torch.sigmoid(torch.randn(h, w * w, w * w, device=device, generator=g))
        grid = (case["grid"], case["grid"])
        with torch.no_grad():
            for bm, bn, nw, ns in PERF_CONFIGS[precision(dt)]:
                rows.append(timed_row("window_vv_attention", dict(case, config=f"{bm}x{bn}w{nw}s{ns}"), "triton",
                                      partial(window_vv_attention_triton, v, h, scale, bias, w, block_m=bm,
                                              block_n=bn, num_warps=nw, num_stages=ns), device))
            rows.append(timed_row("window_vv_attention", case, "torch_reference",
                                  partial(window_vv_attention_reference, v, h, scale, bias, w), device))
            rows.append(timed_row("window_vv_attention", case, "sdpa_folded",
                                  partial(_sdpa_folded, v, h, scale, bias, w, grid), device))
    return rows
