"""Few-shot memory bank of normal patch features, shared by AF-CLIP+ and SOWA's K-shot mode.

The bank keeps, per feature level l (AF-CLIP: 4 taps x 3 aggregation scales = 12; SOWA: 4 taps), the
L2-normalised patch features of K normal reference images: [L, K*N, D]. A query patch's distance is the
nearest-neighbour cosine distance to its own level's bank:

    dist[b, l, i] = min_m (1 - <q̂[b, l, i], bank[l, m]>)        (= 1 - max cosine)

AF-CLIP+ uses dist / 2 averaged over its 12 levels; SOWA sums the 4 levels after upsampling. The bank is a
buffer: a stage that holds it exports it as a constant (one export per class, as the specs suggest for a
per-category engine). ``chunk`` bounds the [N, M] similarity block computed at once (rows of the bank), so a
4-shot ViT-L bank (5476 rows) does not need a B x N x M matrix per level in memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError


class MemoryBank(nn.Module):
    bank: torch.Tensor  # buffer (register_buffer), declared for type checkers

    def __init__(self, features: torch.Tensor, chunk: int = 0):
        """``features`` [K, L, N, D] (K reference images) or a ready bank [L, M, D] (normalised here)."""
        super().__init__()
        if features.dim() == 4:
            k, n_levels, n, d = features.shape
            features = features.permute(1, 0, 2, 3).reshape(n_levels, k * n, d)
        if features.dim() != 3 or features.shape[1] == 0:
            raise ZsadError(f"memory bank features must be [K,L,N,D] or [L,M,D] with rows, got {tuple(features.shape)}")
        self.chunk = int(chunk)
        self.register_buffer("bank", F.normalize(features.detach().float(), dim=-1).contiguous())

    @property
    def levels(self) -> int:
        return self.bank.shape[0]

    @property
    def rows(self) -> int:
        return self.bank.shape[1]

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` [B, L, N, D] -> nearest-neighbour cosine distance [B, L, N]."""
        if query.dim() != 4 or query.shape[1] != self.levels or query.shape[-1] != self.bank.shape[-1]:
            raise ZsadError(f"memory bank holds {self.levels} levels of width {self.bank.shape[-1]}; "
                            f"query has shape {tuple(query.shape)}")
        q = F.normalize(query, dim=-1)
        bank = self.bank.to(q.dtype)
        out = []
        for level in range(self.levels):  # a static Python loop: unrolled at export
            ql, bl = q[:, level], bank[level]  # [B, N, D], [M, D]
            step = self.chunk if self.chunk > 0 else bl.shape[0]
            best = (ql @ bl[:step].t()).amax(dim=-1)
            for start in range(step, bl.shape[0], step):
                best = torch.maximum(best, (ql @ bl[start:start + step].t()).amax(dim=-1))
            out.append(1.0 - best)
        return torch.stack(out, dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, rows={self.rows}, width={self.bank.shape[-1]}"
