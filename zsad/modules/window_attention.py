"""SOWA's FWA adapter: frozen-weight V-V cosine window attention with a Swin-V2 continuous position bias.

``window_vv_attention`` is the adapter's attention around ``zsad.kernels.window_attention`` (its plain-torch
reference is what CPU runs and export traces; its Triton kernel runs on CUDA). ``FrozenWindowAdapter`` wraps it
with SOWA's trainable parts (design spec bagclip_sowa.md, see docs/methods/sowa.md;
section 3.1):

1. the patch tokens (class token dropped) of one tapped block, [B, N, D] on a grid x grid layout, are split into
   (grid/window)^2 non-overlapping windows of window^2 tokens (no shift, no mask);
2. v = x W_v^T (+ b_v) with W_v = the *frozen* value rows of that CLIP block's ``attn.in_proj_weight``
   (``in_proj_bias`` is not used by default, as in SOWA's code); split into ``heads`` heads (SOWA: 8 x 128 at
   width 1024, i.e. each adapter head spans two CLIP heads);
3. per head h: logits = (v̂ v̂^T) * scale_h + bias_h with v̂ = v / ||v||, scale_h = exp(min(theta_h, ln 100))
   (theta learnable, init ln 10) and bias_h = 16 * sigmoid(CPB_h), CPB = MLP 2 -> 64 (ReLU) -> heads (no bias on
   the last layer) over Swin-V2's log-spaced relative-coordinate table; softmax; attention dropout (training);
   out = P v with the *raw* v;
4. heads concatenated -> the frozen ``attn.out_proj`` (with bias) -> windows merged back to [B, N, D];
5. x1 = x + LN1(attn_out);  x2 = x1 + LN2(x1 W_a)  (res-post-norm, LN1/LN2 and the D x D W_a trainable, no bias).

Trainable parameters per adapter: heads (theta) + 2*hidden + hidden + hidden*heads (CPB) + 4 D (two LNs) + D^2
= 1,053,384 at D = 1024, 8 heads, hidden 64.

Export: ``position_terms()`` returns (scale [H], bias [H, T, T]) from the parameters; a stage computes them once
and passes them to ``forward`` as constants, so the exported graph holds a (H, T, T) table and no MLP.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError
from zsad.kernels import window_attention as _wa


def window_vv_attention(
    x: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
    scale: torch.Tensor,
    bias: torch.Tensor,
    grid: int,
    window: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The adapter's attention: value projection, window V-V cosine attention, output projection.

    Shapes (H = heads = ``scale.shape[0]``, T = window*window): ``x`` [B, N, D] with N = grid*grid patch tokens in
    row-major order; ``v_weight``/``out_weight`` [D, D] and ``v_bias``/``out_bias`` [D] or None (SOWA: the value
    rows of the frozen CLIP ``in_proj_weight``, no bias; the frozen ``out_proj``); ``scale`` [H] the finished
    per-head multiplier exp(min(theta, ln 100)); ``bias`` [H, T, T] the finished position bias. Returns [B, N, D].

    The windowed attention itself is ``zsad.kernels.window_attention`` (its torch reference on CPU and in export,
    the fused Triton kernel on CUDA at inference); the projections are per-token, so they commute with the window
    partition and stay outside the kernel.
    """
    if grid % window:
        raise ZsadError(f"window {window} does not divide the {grid}x{grid} patch grid")
    v = F.linear(x, v_weight, v_bias)
    try:
        y = _wa.dispatch(v, scale.shape[0], scale, bias, window, grid, dropout_p=dropout_p, training=dropout_p > 0)
    except _wa.KernelArgumentError as e:
        raise ZsadError(f"SOWA window attention: {e}") from None
    return F.linear(y, out_weight, out_bias)


def relative_coords_table(window: int) -> torch.Tensor:
    """Swin-V2's log-spaced relative coordinates: [(2w-1)^2, 2] = sign(c) log2(8|c|/(w-1) + 1) / log2(8)."""
    r = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)  # [(2w-1), (2w-1), 2] (dy, dx)
    if window > 1:
        table = table / (window - 1)
    table = table * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.reshape(-1, 2)


def relative_position_index(window: int) -> torch.Tensor:
    """[T, T] index into the relative-coordinate table for every (query, key) token pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [T, T, 2], >= 0
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class ContinuousPositionBias(nn.Module):
    """Swin-V2 CPB: MLP(2 -> hidden, ReLU, -> heads, no bias) over the coordinate table; bias = 16 sigmoid(.)."""

    coords_table: torch.Tensor  # buffers (register_buffer), declared for type checkers
    index: torch.Tensor

    def __init__(self, window: int, heads: int, hidden: int = 64):
        super().__init__()
        self.window = int(window)
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, heads, bias=False))
        self.register_buffer("coords_table", relative_coords_table(window), persistent=False)
        self.register_buffer("index", relative_position_index(window), persistent=False)

    def forward(self) -> torch.Tensor:
        """-> [heads, T, T]."""
        table = self.mlp(self.coords_table)  # [(2w-1)^2, H]
        t = self.window * self.window
        bias = table[self.index.reshape(-1)].reshape(t, t, -1).permute(2, 0, 1)
        return 16.0 * torch.sigmoid(bias)


class FrozenWindowAdapter(nn.Module):
    """One FWA adapter around a frozen CLIP block's ``nn.MultiheadAttention`` (borrowed, kept frozen)."""

    def __init__(self, attn: nn.MultiheadAttention, grid: int, window: int = 12, heads: int = 8,
                 cpb_hidden: int = 64, attn_drop: float = 0.1, use_qkv_bias: bool = False):
        super().__init__()
        width = attn.embed_dim
        if grid % window:
            raise ZsadError(f"SOWA window {window} does not divide the {grid}x{grid} patch grid "
                            f"(choose a window that divides {grid}, e.g. 12 at 336 px with patch 14)")
        if width % heads:
            raise ZsadError(f"SOWA heads {heads} do not divide the width {width}")
        self.grid, self.window, self.heads = int(grid), int(window), int(heads)
        self.attn_drop = float(attn_drop)
        self.use_qkv_bias = bool(use_qkv_bias)
        self.frozen_attn = attn.requires_grad_(False)
        self.logit_scale = nn.Parameter(torch.full((heads,), math.log(10.0)))
        self.cpb = ContinuousPositionBias(window, heads, cpb_hidden)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width, bias=False)

    def position_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [H], bias [H, T, T]) from the parameters: what export folds into constants."""
        return _wa.logit_scale(self.logit_scale), self.cpb()

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]; ``scale``/``bias`` given = the folded constants (else computed)."""
        if scale is None or bias is None:
            scale, bias = self.position_terms()
        a = self.frozen_attn
        d = a.embed_dim
        v_bias = a.in_proj_bias[2 * d:] if (self.use_qkv_bias and a.in_proj_bias is not None) else None
        y = window_vv_attention(x, a.in_proj_weight[2 * d:], v_bias, a.out_proj.weight, a.out_proj.bias,
                                scale, bias, self.grid, self.window,
                                self.attn_drop if self.training else 0.0)
        x1 = x + self.norm1(y)
        return x1 + self.norm2(self.linear(x1))

    def extra_repr(self) -> str:
        return (f"grid={self.grid}, window={self.window}, heads={self.heads}, attn_drop={self.attn_drop}, "
                f"use_qkv_bias={self.use_qkv_bias}")
