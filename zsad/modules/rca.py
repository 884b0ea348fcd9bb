"""Residual cross-modal attention (RCA, Bayes-PFL section 3.5): text embeddings refined by the patch features.

For L tapped layers F_l [B,N,D] and text embeddings Z [B,T,E] (unit length):

    F_l^s = normalize(F_l W_l)                          W_l: D -> E, no bias, one per layer
    q     = Z W_q + b_q                                 one query projection shared by the layers
    Z~_l  = normalize(MHA(q, k = v = F_l^s) + Z)        ``heads`` heads of E/heads, softmax over the N patches

The attention scale is E^-1/2 (the full width, not the head width), keys and values are the projected patches
themselves (no key/value/output projections), and the residual adds the unrefined Z. The released code's
query projection is a Conv1d with kernel 1, i.e. this Linear (same parameters, weight [E,E] instead of [E,E,1]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError


class ResidualCrossModalAttention(nn.Module):
    def __init__(self, vision_width: int, embed_dim: int, n_layers: int, heads: int = 4):
        super().__init__()
        if embed_dim % heads:
            raise ZsadError(f"RCA: embedding width {embed_dim} is not divisible by {heads} heads")
        self.heads = int(heads)
        self.embed_dim = int(embed_dim)
        self.patch_proj = nn.ModuleList([nn.Linear(vision_width, embed_dim, bias=False) for _ in range(n_layers)])
        self.query = nn.Linear(embed_dim, embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def project(self, taps: torch.Tensor) -> torch.Tensor:
        """taps [B,L,N,D] -> unit-length patch embeddings [B,L,N,E] (layer l through its own W_l)."""
        if taps.shape[1] != len(self.patch_proj):
            raise ZsadError(f"RCA was built for {len(self.patch_proj)} layers, got taps {tuple(taps.shape)}")
        weight = torch.stack(list(self.patch_proj.parameters()))  # [L,E,D]: each Linear's weight (bias=False)
        return F.normalize(torch.einsum("blnd,led->blne", taps, weight), dim=-1)

    def refine(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """patches [B,L,N,E] (projected), text [B,T,E] -> refined text [B,L,T,E] (unit length)."""
        b, n_layers, n, e = patches.shape
        t, h = text.shape[1], self.heads
        q = self.query(text).reshape(b, 1, t, h, e // h).transpose(2, 3)  # [B,1,h,T,e/h]
        kv = patches.reshape(b, n_layers, n, h, e // h).transpose(2, 3)  # [B,L,h,N,e/h]
        attn = torch.softmax(q @ kv.transpose(-1, -2) * (e ** -0.5), dim=-1)  # [B,L,h,T,N]
        out = (attn @ kv).transpose(2, 3).reshape(b, n_layers, t, e)
        return F.normalize(out + text.unsqueeze(1), dim=-1)

    def forward(self, taps: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """taps [B,L,N,D], text [B,T,E] -> (patch embeddings [B,L,N,E], refined text [B,L,T,E])."""
        patches = self.project(taps)
        return patches, self.refine(patches, text)
