"""Scale-Adaptive Feature Recalibration (BAG-CLIP's SAFR, reconstructed from its SE / CBAM / ASFF citations).

For L tapped scales D_l [B,N,D]:
1. SE channel recalibration per scale: s_l = sigmoid(W2 ReLU(W1 mean_tokens(D_l))), D'_l = D_l * s_l
   (W1: D -> D/r, W2: D/r -> D);
2. ASFF-style per-token scale weights: c_l = D'_l V_l (D -> m per scale), w = softmax(U [c_1..c_L]) over the L
   scales (U: L*m -> L);
3. fused F = sum_l w_l * D'_l  [B,N,D].
"""
from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // reduction)
        self.fc2 = nn.Linear(dim // reduction, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B,N,D]
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=1)))))
        return x * s.unsqueeze(1)


class ScaleAdaptiveRecalibration(nn.Module):
    def __init__(self, dim: int, n_scales: int, reduction: int = 16, fusion_dim: int = 16):
        super().__init__()
        self.se = nn.ModuleList([SqueezeExcite(dim, reduction) for _ in range(n_scales)])
        self.compress = nn.ModuleList([nn.Linear(dim, fusion_dim) for _ in range(n_scales)])
        self.weights = nn.Linear(n_scales * fusion_dim, n_scales)

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """taps [B,L,N,D] -> fused [B,N,D]."""
        scaled = [se(taps[:, i]) for i, se in enumerate(self.se)]
        codes = torch.cat([c(x) for c, x in zip(self.compress, scaled, strict=True)], dim=-1)
        w = self.weights(codes).softmax(dim=-1)  # [B,N,L]
        # a running sum, not a stack along a new last axis: OpenVINO concatenates that interleaved [B,N,D,L] tensor
        # with its reference kernel (13.8 of the 40 ms graph stage at the paper profile)
        fused = scaled[0] * w[..., :1]
        for i in range(1, len(scaled)):
            fused = fused + scaled[i] * w[..., i:i + 1]
        return fused
