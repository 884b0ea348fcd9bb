"""AF-CLIP's attention adaptor: one trainable multi-head self-attention over a token map, no residual.

    u = LayerNorm(c);  Q, K, V = u W_q, u W_k, u W_v  (D -> heads * head_dim, no bias)
    a = softmax(Q K^T / sqrt(head_dim)) V  per head (full bidirectional attention, class token included)
    out = a W_o + b_o  (heads * head_dim -> D)

The output *replaces* the input (no residual connection), as in AF-CLIP's released code (spec A1.3 / A8.1).
At ViT-L width D = 1024 with 8 heads x 64 this is 2,100,224 parameters; with AF-CLIP's 12 x 768 prompt vectors
the method trains the paper's 2,109,440.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionAdaptor(nn.Module):
    def __init__(self, width: int, heads: int = 8, head_dim: int = 64, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = int(heads)
        self.head_dim = int(head_dim)
        self.dropout = float(dropout)
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_k = nn.Linear(width, inner, bias=False)
        self.to_v = nn.Linear(width, inner, bias=False)
        self.to_out = nn.Linear(inner, width)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        u = self.norm(x)
        q, k, v = self._split(self.to_q(u)), self._split(self.to_k(u)), self._split(self.to_v(u))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(a.transpose(1, 2).flatten(2))
