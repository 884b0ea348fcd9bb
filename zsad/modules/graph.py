"""Dynamic kNN graph over patch features (BAG-CLIP's SAG, parameter-free) and GCN propagation.

Graph (one per image), for features X [B,N,D]:

1. cosine similarity S = X̂ X̂ᵀ with X̂ = X / max(||X||, eps), in fp32 (fp16 ties change neighbour sets);
2. per row the top-k columns with self excluded (S_ii = -inf). Tie rule, defined once: among equal
   similarities the **lowest column index wins** (``knn_mask``: threshold at the k-th value, ties by index).
   A zero vector has similarity 0 to every node, so its neighbours are the k lowest other indices;
3. A_ij = 1 for those j (``edge_weight="binary"``) or max(S_ij, 0) (``"relu_cos"``);
4. symmetrise: A = max(A, Aᵀ) (``"max"``) or (A + Aᵀ)/2 (``"mean"``);
5. self-loops and symmetric normalisation: Â = D^-1/2 (A + I) D^-1/2 with D_ii = Σ_j (A + I)_ij (>= 1).

GCN layer: H = LayerNorm(F + GELU(Â F W + b)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError

EDGE_WEIGHTS = ("binary", "relu_cos")
SYMMETRIZE = ("max", "mean")


def cosine_similarity_matrix(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    xn = F.normalize(x.float(), dim=-1, eps=eps)
    return xn @ xn.transpose(-1, -2)


def _masked_self(sim: torch.Tensor) -> torch.Tensor:
    n = sim.shape[-1]
    return sim.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), float("-inf"))


def knn_mask(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [B,N,N]: row i marks its k most similar columns, self excluded, lowest index first among ties.

    Exportable without a stable sort (neither ONNX exporter has one): only the k-th largest value of each row is
    taken from TopK (well defined whatever TopK does with ties), then every column strictly above it is kept and
    the remaining slots go to the columns equal to it in index order (cumulative count <= slots left).
    """
    n = sim.shape[-1]
    if not 1 <= k < n:
        raise ZsadError(f"k must be in 1..{n - 1} for a graph of {n} nodes, got {k}")
    masked = _masked_self(sim)
    kth = torch.topk(masked, k, dim=-1).values[..., k - 1:k]
    above = masked > kth
    tied = masked == kth
    slots = k - above.sum(dim=-1, keepdim=True)
    return above | (tied & (torch.cumsum(tied.to(torch.int32), dim=-1) <= slots))


def knn_indices(sim: torch.Tensor, k: int) -> torch.Tensor:
    """The k neighbour indices per row of ``knn_mask`` [B,N,k], ascending by column index."""
    mask = knn_mask(sim, k)
    n = sim.shape[-1]
    cols = torch.arange(n, device=sim.device).expand_as(mask)
    return torch.sort(torch.where(mask, cols, n), dim=-1).values[..., :k]


def knn_adjacency(x: torch.Tensor, k: int, edge_weight: str = "binary") -> torch.Tensor:
    """The directed kNN adjacency A [B,N,N] (row i holds i's k neighbours), before symmetrisation."""
    if edge_weight not in EDGE_WEIGHTS:
        raise ZsadError(f"edge_weight must be one of {EDGE_WEIGHTS}, got '{edge_weight}'")
    sim = cosine_similarity_matrix(x)
    mask = knn_mask(sim, k)
    return mask.to(sim.dtype) if edge_weight == "binary" else torch.where(mask, sim.clamp_min(0), 0.0)


def normalize_adjacency(a: torch.Tensor, symmetrize: str = "max") -> torch.Tensor:
    """Symmetrise, add self-loops, D^-1/2 (A + I) D^-1/2."""
    if symmetrize not in SYMMETRIZE:
        raise ZsadError(f"symmetrize must be one of {SYMMETRIZE}, got '{symmetrize}'")
    at = a.transpose(-1, -2)
    a = torch.maximum(a, at) if symmetrize == "max" else 0.5 * (a + at)
    a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    d = a.sum(dim=-1).rsqrt()
    return d.unsqueeze(-1) * a * d.unsqueeze(-2)


def knn_graph(x: torch.Tensor, k: int, edge_weight: str = "binary", symmetrize: str = "max") -> torch.Tensor:
    """Normalised adjacency Â [B,N,N] of the kNN graph of ``x`` [B,N,D] (fp32)."""
    return normalize_adjacency(knn_adjacency(x, k, edge_weight), symmetrize)


def graph_construction_flops(n: int, d: int) -> int:
    """FLOPs of the dense similarity that dominates graph construction: 2 N^2 D (one N x N Gram at width D)."""
    return 2 * n * n * d


class GCNLayer(nn.Module):
    """H = LayerNorm(F + GELU(Â F W + b))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, f: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return self.norm(f + F.gelu(self.linear(adj.to(f.dtype) @ f)))

    def flops(self, n: int) -> int:
        """Multiply-adds x2 of the propagation (Â F) and the linear, for N nodes."""
        d = self.linear.in_features
        return 2 * n * n * d + 2 * n * d * d


class GCN(nn.Module):
    def __init__(self, dim: int, layers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList([GCNLayer(dim) for _ in range(layers)])

    def forward(self, f: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            f = layer(f, adj)
        return f
