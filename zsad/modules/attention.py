"""Attention variants over a frozen ``nn.MultiheadAttention``'s weights (qkv with bias, out_proj).

The V-V path (q = k = v) is AnomalyCLIP's "surgery" attention: ``softmax(v v^T / sqrt(d)) v``. ``dual_attention``
computes the stock and the V-V outputs from one qkv projection, as AnomalyCLIP's DPAM and BAG-CLIP's BSA do.

The attention core goes through ``zsad.kernels.dual_attention``'s dispatchers: a fused one-pass Triton kernel
for CUDA tensors at inference, ``F.scaled_dot_product_attention`` (unchanged results) everywhere else.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsad.kernels import dual_attention as _da


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, n_heads, d // n_heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)


def _qkv(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not attn.batch_first:
        raise ValueError("expected a batch_first nn.MultiheadAttention (open_clip >= 2.24 builds them so)")
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    h = attn.num_heads
    return _heads(q, h), _heads(k, h), _heads(v, h)


def _out(attn: nn.MultiheadAttention, o: torch.Tensor) -> torch.Tensor:
    return F.linear(_merge(o), attn.out_proj.weight, attn.out_proj.bias)


def vv_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``out_proj(softmax(v v^T * s) v)`` for tokens ``x`` [B,N,D] (x already layer-normed)."""
    _, _, v = _qkv(attn, x)
    return _out(attn, _da.vv_dispatch(v))


def dual_attention(attn: nn.MultiheadAttention, x: torch.Tensor,
                   qk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock ``softmax(q k^T * s) v`` and V-V ``softmax(v v^T * s) v`` from one qkv projection, both via out_proj.
    ``qk_rows``: the stock output for the first ``qk_rows`` tokens only (queries cut, keys and values all)."""
    q, k, v = _qkv(attn, x)
    if qk_rows is not None:
        return (_out(attn, F.scaled_dot_product_attention(q[:, :, :qk_rows], k, v)),
                _out(attn, _da.vv_dispatch(v)))
    o_qk, o_vv = _da.dispatch(q, k, v)
    return _out(attn, o_qk), _out(attn, o_vv)


def class_token_block(blk: Any, x: torch.Tensor) -> torch.Tensor:
    """A stock CLIP block's output for the class token alone, [B,1,D]: its query attends to every token of ``x``,
    and the MLP runs on that one token (what the global embedding reads after the last block)."""
    q, k, v = _qkv(blk.attn, blk.ln_1(x))
    c = x[:, :1] + blk.ls_1(_out(blk.attn, F.scaled_dot_product_attention(q[:, :, :1], k, v)))
    return c + blk.ls_2(blk.mlp(blk.ln_2(c)))
