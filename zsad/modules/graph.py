"""Dynamic kNN graph over patch features (BAG-CLIP's SAG, parameter-free) and GCN propagation.

The graph itself lives in ``zsad.kernels.knn_graph``, beside its Triton kernels: one implementation of the math
(the torch reference), which every name below calls. Definition, for features X [B,N,D]:

1. cosine similarity S = X̂ X̂ᵀ with X̂ = X / max(||X||, eps), in fp32 (fp16 ties change neighbour sets);
2. per row the top-k columns with self excluded (S_ii = -inf). Tie rule, defined once: among equal
   similarities the **lowest column index wins** (a stable descending sort; ONNX TopK has the same rule).
   A zero vector has similarity 0 to every node, so its neighbours are the k lowest other indices;
3. A_ij = 1 for those j (``edge_weight="binary"``) or max(S_ij, 0) (``"relu_cos"``);
4. symmetrise: A = max(A, Aᵀ) (``"max"``) or (A + Aᵀ)/2 (``"mean"``);
5. self-loops and symmetric normalisation: Â = D^-1/2 (A + I) D^-1/2 with D_ii = Σ_j (A + I)_ij (>= 1).

The selection (step 2) is a function of its own, ``knn_select`` (indices [B,N,k]), and ``graph_from_index`` does
steps 3-5 from those indices: BAG-CLIP exports them as two stages, so the parity gate can compare the selection by
its tie rule and everything after it on the same neighbours (zsad.selection). ``knn_graph`` is the two composed.
Each goes through a ``dispatch``: the fused Triton kernels for CUDA tensors at inference, the torch
reference everywhere else (CPU results are exactly the reference's).

GCN layer: H = LayerNorm(F + GELU(Â F W + b)).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError
from zsad.kernels import knn_graph as _kg
from zsad.kernels._common import KernelArgumentError

EDGE_WEIGHTS = _kg.EDGE_WEIGHTS
SYMMETRIZE = _kg.SYMMETRIZE


def _zsad_errors(fn):
    """The kernels package is a leaf (no zsad import): turn its argument errors into ZsadError here."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KernelArgumentError as e:
            raise ZsadError(str(e)) from e
    return wrapper


cosine_similarity_matrix = _zsad_errors(_kg.cosine_similarity_matrix)
knn_indices = _zsad_errors(_kg.knn_indices)
knn_adjacency = _zsad_errors(_kg.knn_adjacency)
normalize_adjacency = _zsad_errors(_kg.normalize_adjacency)


quantize_similarity = _kg.quantize_similarity


@_zsad_errors
def knn_select(x: torch.Tensor, k: int, resolution_bits: int = 0) -> torch.Tensor:
    """Each node's k neighbours [B,N,k] int64, ascending (the discontinuous step); see zsad.kernels.knn_graph."""
    return _kg.dispatch_select(x, k, resolution_bits)


@_zsad_errors
def graph_from_index(x: torch.Tensor, index: torch.Tensor, edge_weight: str = "binary", symmetrize: str = "max",
                     resolution_bits: int = 0) -> torch.Tensor:
    """Â [B,N,N] of the graph whose edges ``index`` [B,N,k] (from ``knn_select``) gives over ``x`` [B,N,D]."""
    return _kg.dispatch_graph_from_index(x, index, edge_weight, symmetrize, resolution_bits)


@_zsad_errors
def knn_graph(x: torch.Tensor, k: int, edge_weight: str = "binary", symmetrize: str = "max",
              resolution_bits: int = 0) -> torch.Tensor:
    """Normalised adjacency Â [B,N,N] of the kNN graph of ``x`` [B,N,D] (fp32); see zsad.kernels.knn_graph."""
    return _kg.dispatch(x, k, edge_weight, symmetrize, resolution_bits)


def propagate(adj: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Â F for Â [B,N,N], F [B,N,D]. An odd N (1369 patches at 518 px) gets one zero node appended to the inner
    dimension: oneDNN's AMX bf16 matmul packs that dimension in pairs, and OpenVINO 2026.4 runs an odd one on plain
    AVX-512 instead (23.3 vs 3.6 ms at 1369 x 1369 x 1024 on a 2-core AMX Xeon). A zero column times a zero row adds
    exact zeros, so the result is unchanged."""
    if adj.shape[-1] % 2:
        adj, f = F.pad(adj, (0, 1)), F.pad(f, (0, 0, 0, 1))
    return adj @ f


class GCNLayer(nn.Module):
    """H = LayerNorm(F + GELU(Â F W + b))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, f: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return self.norm(f + F.gelu(self.linear(propagate(adj.to(f.dtype), f))))

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
