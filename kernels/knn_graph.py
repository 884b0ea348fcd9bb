"""kNN graph over patch features (BAG-CLIP's SAG): the torch reference, a fused Triton kernel, and ``dispatch()``.

This module is the one implementation of the graph; ``zsad.modules.graph`` re-exports its functions.

Definition, for features X [B,N,D] (the reference below is plain torch and is what ONNX export traces):

1. cosine similarity S = X̂ X̂ᵀ with X̂ = X / max(||X||, eps), in fp32 at least (fp16 ties change neighbour sets);
2. per row the top-k columns with self excluded (S_ii = -inf). **Tie rule**: among equal similarities the
   **lowest column index wins** (a stable descending sort; ONNX TopK has the same rule). **Zero vectors**: a
   zero row normalises to 0, so it has similarity exactly 0 to every node (and every node to it); a zero row's
   neighbours are therefore the k lowest other indices, and zero rows tie with every orthogonal row;
   **Resolution** (``resolution_bits``, r): with r > 0 the similarities are first rounded to multiples of 2^-r
   (round half to even), so values that differ only by GEMM rounding (~1e-7: a different accumulation order in
   ONNX Runtime, TensorRT or this kernel) compare equal and the tie rule decides, the same way everywhere.
   BAG-CLIP uses r = 14 (steps of 6.1e-5); r = 0 compares the raw fp32 values;
3. A_ij = 1 for those j (``edge_weight="binary"``) or max(S_ij, 0) (``"relu_cos"``, with the rounded S);
4. symmetrise: A = max(A, Aᵀ) (``"max"``) or (A + Aᵀ)/2 (``"mean"``);
5. self-loops and symmetric normalisation: Â = D^-1/2 (A + I) D^-1/2 with D_ii = Σ_j (A + I)_ij (>= 1).

``knn_indices`` states the order with a stable sort; ``knn_adjacency`` builds the same neighbour sets with the
threshold trick (TopK values, ties at the threshold counted off by index), because ONNX export cannot take a stable
sort (torch 2.13's exporter has no ``aten.sort.stable``) and TopK + CumSum export cleanly (tested with ONNX Runtime).

Triton path (CUDA tensors only, see ``dispatch``), three launches:

- ``_knn_topk_kernel``: one program per (row block, image). It streams column tiles of X̂X̂ᵀ (fp32 ``tl.dot`` with
  ``input_precision="ieee"``, never TF32), keeps a running top-k per row in registers (an unsorted list of k
  int64 rank keys, similarity in the high bits and the inverted column index in the low bits, so one max / min
  reduction applies the tie rule; a tile's best entry replaces the worst kept slot when it ranks above it), writes the
  k neighbours per row sorted like the reference (value descending, index ascending): ELL indices [B,N,k] int32
  and their similarities [B,N,k] fp32. The N x N similarity never exists in memory.
  The same kernel scatters the edge weights into a zero-filled directed adjacency A [B,N,N].
- ``_knn_degree_kernel`` then ``_knn_normalize_kernel``: read tiles of A and (transposed) Aᵀ, symmetrise, compute
  D^-1/2, and write every entry of the dense Â [B,N,N].

The propagation Â @ H stays a dense batched GEMM (cuBLAS): a fused sparse aggregation was not written because it
could not be measured here (no GPU); ``perf_sweep`` times the dense GEMM so a GPU run can decide.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F

from ._common import (
    KernelArgumentError,
    capability,
    for_current_mode,
    next_pow2,
    skipped_rows,
    sweep_unavailable_reason,
    timed_row,
    tl,
    triton,
    use_triton,
)

EDGE_WEIGHTS = ("binary", "relu_cos")
SYMMETRIZE = ("max", "mean")


# == torch reference ============================================================================================
def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_k(n: int, k: int) -> None:
    if not 1 <= k < n:
        raise KernelArgumentError(f"k must be in 1..{n - 1} for a graph of {n} nodes, got {k}")


def _check_edge_weight(edge_weight: str) -> None:
    if edge_weight not in EDGE_WEIGHTS:
        raise KernelArgumentError(f"edge_weight must be one of {EDGE_WEIGHTS}, got '{edge_weight}'")


def _check_symmetrize(symmetrize: str) -> None:
    if symmetrize not in SYMMETRIZE:
        raise KernelArgumentError(f"symmetrize must be one of {SYMMETRIZE}, got '{symmetrize}'")


def cosine_similarity_matrix(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """S = X̂ X̂ᵀ [B,N,N] in fp32 (fp64 stays fp64, for reference checks), with autocast on or off."""
    # autocast would run this Gram in bf16 / fp16 (spacing 2^-8 / 2^-11 near 1) although its inputs are fp32, and the
    # selection compares S at 2^-14: it stays off here (a no-op context where autocast is off: export traces none)
    kind = x.device.type
    with torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else contextlib.nullcontext():
        xn = F.normalize(_at_least_fp32(x), dim=-1, eps=eps)
        return xn @ xn.transpose(-1, -2)


def quantize_similarity(sim: torch.Tensor, resolution_bits: int = 0) -> torch.Tensor:
    """Round to multiples of 2^-resolution_bits (half to even; exact in fp32 for |S| <= 1); 0 leaves S as is."""
    if not resolution_bits:
        return sim
    scale = float(2 ** int(resolution_bits))
    return torch.round(sim * scale) / scale


def knn_indices(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k column indices per row of ``sim`` [B,N,N], self excluded, lowest index first among ties."""
    n = sim.shape[-1]
    _check_k(n, k)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    masked = sim.masked_fill(eye, float("-inf"))
    return torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]


def knn_mask(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [B,N,N], True at each row's k neighbours: the same set as ``knn_indices`` (self excluded, lowest
    index first among ties), built by the threshold trick (TopK values, then counting the ties at the threshold)
    so that it exports to ONNX (TopK / CumSum; no sort, no scatter)."""
    n = sim.shape[-1]
    _check_k(n, k)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    masked = sim.masked_fill(eye, float("-inf"))
    kth = torch.topk(masked, k, dim=-1).values[..., k - 1:k]  # each row's k-th largest similarity
    above = masked > kth  # fewer than k of these: all are neighbours
    at = masked == kth  # ties at the threshold fill the remaining places, lowest column index first
    need = k - above.sum(dim=-1, keepdim=True)
    return above | (at & (torch.cumsum(at.to(torch.int32), dim=-1) <= need))


def mask_to_index(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The k True columns of each row of ``mask`` [B,N,M] (exactly k per row) as int64 indices [B,N,k], ascending.

    Selected columns get the keys 2M - j, the others -j: all distinct, so TopK has no tie to break and the order is
    defined (a stable sort does not export; TopK does)."""
    m = mask.shape[-1]
    col = torch.arange(m, device=mask.device, dtype=torch.float32)
    key = torch.where(mask, 2.0 * m - col, -col)
    return torch.topk(key, k, dim=-1).indices


def knn_select(x: torch.Tensor, k: int, resolution_bits: int = 0) -> torch.Tensor:
    """Each node's k neighbours [B,N,k] int64 (ascending column order): the selection step of the graph.

    This is the one discontinuous step of BAG-CLIP's inference, so it is its own stage output: the parity gate
    compares it by the tie rule (zsad.selection) and every continuous step after it on the same neighbours."""
    sim = quantize_similarity(cosine_similarity_matrix(x), resolution_bits)
    return mask_to_index(knn_mask(sim, k), k)


def knn_edge_weights(x: torch.Tensor, index: torch.Tensor, edge_weight: str = "binary",
                     resolution_bits: int = 0) -> torch.Tensor:
    """The weight [B,N,k] of each selected edge i -> index[i, r]: 1 (binary) or max(S_ij, 0) with S rounded as for
    the selection (relu_cos; only the selected pairs' cosines are computed, by gathering their rows)."""
    _check_edge_weight(edge_weight)
    xf = _at_least_fp32(x)
    if edge_weight == "binary":
        return torch.ones(index.shape, dtype=xf.dtype, device=x.device)
    b, n, d = xf.shape
    xn = F.normalize(xf, dim=-1)
    offset = (torch.arange(b, device=x.device) * n).view(b, 1, 1)
    rows = torch.index_select(xn.reshape(b * n, d), 0, (index + offset).reshape(-1)).reshape(*index.shape, d)
    sim = (rows * xn.unsqueeze(-2)).sum(dim=-1)
    return quantize_similarity(sim, resolution_bits).clamp_min(0)


def index_adjacency(index: torch.Tensor, n: int, weights: torch.Tensor) -> torch.Tensor:
    """The directed adjacency A [B,N,n]: A[b, i, index[b,i,r]] = weights[b,i,r], zero elsewhere."""
    a = torch.zeros(*index.shape[:-1], n, dtype=weights.dtype, device=weights.device)
    return a.scatter(-1, index, weights)


def knn_adjacency(x: torch.Tensor, k: int, edge_weight: str = "binary", resolution_bits: int = 0) -> torch.Tensor:
    """The directed kNN adjacency A [B,N,N] (row i holds i's k neighbours), before symmetrisation."""
    _check_edge_weight(edge_weight)
    index = knn_select(x, k, resolution_bits)
    return index_adjacency(index, x.shape[-2], knn_edge_weights(x, index, edge_weight, resolution_bits))


def normalize_adjacency(a: torch.Tensor, symmetrize: str = "max") -> torch.Tensor:
    """Symmetrise, add self-loops, D^-1/2 (A + I) D^-1/2."""
    _check_symmetrize(symmetrize)
    at = a.transpose(-1, -2)
    a = torch.maximum(a, at) if symmetrize == "max" else 0.5 * (a + at)
    a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    d = a.sum(dim=-1).rsqrt()
    return d.unsqueeze(-1) * a * d.unsqueeze(-2)


def graph_from_index_reference(x: torch.Tensor, index: torch.Tensor, edge_weight: str = "binary",
                               symmetrize: str = "max", resolution_bits: int = 0) -> torch.Tensor:
    """Â [B,N,N] of the graph whose directed edges are ``index`` [B,N,k] (from ``knn_select``) over ``x``."""
    _check_symmetrize(symmetrize)
    weights = knn_edge_weights(x, index, edge_weight, resolution_bits)
    return normalize_adjacency(index_adjacency(index, x.shape[-2], weights), symmetrize)


def knn_graph_reference(x: torch.Tensor, k: int, edge_weight: str = "binary", symmetrize: str = "max",
                        resolution_bits: int = 0) -> torch.Tensor:
    """Normalised adjacency Â [B,N,N] of the kNN graph of ``x`` [B,N,D] (fp32; fp64 in, fp64 out)."""
    _check_edge_weight(edge_weight)
    _check_symmetrize(symmetrize)
    return graph_from_index_reference(x, knn_select(x, k, resolution_bits), edge_weight, symmetrize, resolution_bits)


def dispatch_select(x: torch.Tensor, k: int, resolution_bits: int = 0) -> torch.Tensor:
    """``knn_select``: the fused Triton top-k kernel for CUDA tensors (inference), the torch reference elsewhere."""
    if use_triton(x):
        return knn_select_triton(x, k, resolution_bits=resolution_bits)
    return knn_select(x, k, resolution_bits)


def dispatch_graph_from_index(x: torch.Tensor, index: torch.Tensor, edge_weight: str = "binary",
                              symmetrize: str = "max", resolution_bits: int = 0) -> torch.Tensor:
    """``graph_from_index_reference``, with the Triton normalisation kernels for CUDA tensors (inference)."""
    if use_triton(x):
        weights = knn_edge_weights(x, index, edge_weight, resolution_bits).float()
        return knn_normalize_triton(index_adjacency(index, x.shape[-2], weights), symmetrize)
    return graph_from_index_reference(x, index, edge_weight, symmetrize, resolution_bits)


def dispatch(x: torch.Tensor, k: int, edge_weight: str = "binary", symmetrize: str = "max",
             resolution_bits: int = 0) -> torch.Tensor:
    """Â of the kNN graph: the Triton kernels for CUDA tensors (inference), the torch reference everywhere else."""
    if use_triton(x):
        return knn_graph_triton(x, k, edge_weight, symmetrize, resolution_bits=resolution_bits)
    return knn_graph_reference(x, k, edge_weight, symmetrize, resolution_bits)


# == Triton kernels ==============================================================================================
@triton.jit
def _rank_key(v, idx):
    """int64 key whose order is the tie rule: higher similarity first, then lower column index.

    High 32 bits: the fp32 similarity mapped to a signed int with the same order (-0.0 is folded into +0.0 first
    so that equal similarities tie); low 32 bits: 2^31 - 1 - index. Keys are unique per row, so a single max /
    min reduction picks the best / worst entry with the tie rule built in.
    """
    v = tl.where(v == 0.0, 0.0, v)
    u = v.to(tl.int32, bitcast=True)
    u = u ^ ((u >> 31) & 0x7FFFFFFF)
    return (u.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _knn_topk_kernel(
    XN, IDX, VAL, ADJ,
    N, D,
    stride_xb, stride_xn,
    stride_ob, stride_on,
    stride_ab, stride_am,
    K: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_ADJ: tl.constexpr, BINARY: tl.constexpr, QSCALE: tl.constexpr,
):
    """Rows [BLOCK_M] of image b: stream column tiles of X̂X̂ᵀ, keep the running top-k, write it sorted.

    With WRITE_ADJ the edge weights (1, or max(S_ij, 0)) are also scattered into the zero-filled directed
    adjacency ADJ [B,N,N] (the reference's ``knn_adjacency``), which the normalisation kernels read.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    slots = tl.arange(0, KP)
    # key of an entry that can never be chosen (self, out of range, already taken); below the key of -inf
    NONE = -9223372036854775807
    # running top-k as unsorted rank keys: empty slots hold distinct keys just above NONE (any real entry beats
    # them); padding slots (>= K; KP is a power of two) hold the largest key and are never the worst
    best = tl.where(slots < K, NONE + 1 + slots.to(tl.int64), 9223372036854775807)
    best = tl.broadcast_to(best[None, :], [BLOCK_M, KP])
    x_b = XN + b * stride_xb
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            a = tl.load(x_b + rows[:, None] * stride_xn + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            bt = tl.load(x_b + cols[None, :] * stride_xn + dd[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(a, bt, s, input_precision="ieee")
        if QSCALE > 0:  # round to multiples of 1/QSCALE, half to even (torch.round's rule)
            t = s * QSCALE
            r = tl.floor(t + 0.5)
            odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            r = tl.where(((r - t) == 0.5) & odd, r - 1.0, r)
            s = r / QSCALE
        key = _rank_key(s, cols[None, :])
        key = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), key, NONE)  # self is excluded
        # at most (number of tile entries above the current worst) insertions can happen: bound the rounds
        worst = tl.min(best, axis=1)
        n_cand = tl.sum((key > worst[:, None]).to(tl.int32), axis=1)
        rounds = tl.minimum(tl.max(n_cand, axis=0), K)
        for _ in range(0, rounds):
            cand = tl.max(key, axis=1)  # the tile's best remaining entry per row ...
            worst = tl.min(best, axis=1)  # ... replaces the worst kept slot if it ranks above it
            hit = (best == worst[:, None]) & (cand > worst)[:, None]
            best = tl.where(hit, cand[:, None], best)
            key = tl.where(key == cand[:, None], NONE, key)
    # emit the k slots in rank order: similarity descending, index ascending (the reference's stable sort)
    best = tl.where(slots[None, :] < K, best, NONE)
    out = b * stride_ob + rows * stride_on
    for r in tl.static_range(K):
        top = tl.max(best, axis=1)
        best = tl.where(best == top[:, None], NONE, best)
        idx = 0x7FFFFFFF - (top & 0x7FFFFFFF).to(tl.int32)
        hi = (top >> 32).to(tl.int32)
        val = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        tl.store(IDX + out + r, idx, mask=row_ok)
        tl.store(VAL + out + r, val, mask=row_ok)
        if WRITE_ADJ:
            w = tl.full([BLOCK_M], 1.0, tl.float32) if BINARY else tl.maximum(val, 0.0)
            tl.store(ADJ + b * stride_ab + rows * stride_am + idx, w, mask=row_ok)


@triton.jit
def _knn_degree_kernel(
    ADJ, DINV,
    N, stride_ab, stride_am, stride_db,
    SYM_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """D^-1/2 for rows [BLOCK_M] of image b: 1 / sqrt(1 + row sum of sym(A)), A the directed adjacency."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    ri = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ri_ok = ri < N
    adj = ADJ + b * stride_ab
    deg = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cj = start_n + tl.arange(0, BLOCK_N)
        m = ri_ok[:, None] & (cj < N)[None, :]
        a = tl.load(adj + ri[:, None] * stride_am + cj[None, :], mask=m, other=0.0)
        at = tl.load(adj + cj[None, :] * stride_am + ri[:, None], mask=m, other=0.0)  # A[j, i]
        if SYM_MAX:
            deg += tl.sum(tl.maximum(a, at), axis=1)
        else:
            deg += tl.sum(0.5 * (a + at), axis=1)
    tl.store(DINV + b * stride_db + ri, 1.0 / tl.sqrt(deg + 1.0), mask=ri_ok)


@triton.jit
def _knn_normalize_kernel(
    ADJ, DINV, OUT,
    N, stride_ab, stride_am, stride_db, stride_ob, stride_om,
    SYM_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Â tile [BLOCK_M x BLOCK_N] of image b: D^-1/2 (sym(A) + I) D^-1/2, every entry written."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    ri = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (ri < N)[:, None] & (cj < N)[None, :]
    adj = ADJ + b * stride_ab
    a = tl.load(adj + ri[:, None] * stride_am + cj[None, :], mask=m, other=0.0)
    at = tl.load(adj + cj[None, :] * stride_am + ri[:, None], mask=m, other=0.0)
    t = tl.maximum(a, at) if SYM_MAX else 0.5 * (a + at)
    t = t + (ri[:, None] == cj[None, :]).to(tl.float32)
    di = tl.load(DINV + b * stride_db + ri, mask=ri < N, other=0.0)
    dj = tl.load(DINV + b * stride_db + cj, mask=cj < N, other=0.0)
    # t * (d_i d_j): the product of the two scales commutes, so Â comes out exactly symmetric
    tl.store(OUT + b * stride_ob + ri[:, None] * stride_om + cj[None, :], t * (di[:, None] * dj[None, :]), mask=m)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The top-k kernel's launch choice per target, compute capability x 10 -> (block_m, block_n, num_warps); any other
# device (and the interpreter) takes None's. Built ahead of time for every target by kernels/aot.py (table in
# bench/results/*-kernels-aot.md): with 4 warps the kernel spills on sm_80 (255 registers, 312-396 B of spill stores)
# and on sm_89 at N = 576 (16 B); with 8 warps it fits there (80-96 registers). sm_90a fits with 4 (148-162).
TOPK_CONFIGS: dict[int | None, tuple[int, int, int]] = {None: (32, 64, 8), 90: (32, 64, 4)}


def topk_config(cc: int | None) -> tuple[int, int, int]:
    """(block_m, block_n, num_warps) of the top-k kernel on compute capability ``cc``."""
    return TOPK_CONFIGS.get(cc, TOPK_CONFIGS[None])


# == launchers ===================================================================================================
def knn_topk_triton(
    x: torch.Tensor,
    k: int,
    *,
    eps: float = 1e-12,
    out_idx: torch.Tensor | None = None,
    out_val: torch.Tensor | None = None,
    adjacency: torch.Tensor | None = None,
    edge_weight: str = "binary",
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    resolution_bits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Gram + row-wise top-k: neighbour indices [B,N,k] int32 and their cosine similarities [B,N,k] fp32,
    each row sorted by similarity descending, lowest index first among ties (the order of ``knn_indices``).

    ``adjacency`` (a zero-filled fp32 [B,N,N] with a contiguous last dim), when given, also receives the directed
    adjacency for ``edge_weight``. Runs wherever Triton runs (CUDA, or any device under ``TRITON_INTERPRET=1``);
    ``out_idx``/``out_val`` (contiguous [B,N,k]) may be given to write into. Block sizes must be >= 16 (``tl.dot``);
    left out, they are the device's choice (``topk_config``), and ``block_d`` min(64, D rounded up to a power of 2).
    """
    if x.dim() != 3:
        raise KernelArgumentError(f"expected features [B,N,D], got shape {tuple(x.shape)}")
    _check_edge_weight(edge_weight)
    b, n, d = x.shape
    _check_k(n, k)
    # the reference's own normalisation (zero rows stay zero: similarity 0 to everything)
    xn = F.normalize(x.float(), dim=-1, eps=eps).contiguous()
    if out_idx is None:
        out_idx = torch.empty(b, n, k, dtype=torch.int32, device=x.device)
    if out_val is None:
        out_val = torch.empty(b, n, k, dtype=torch.float32, device=x.device)
    for name, t, dt in (("out_idx", out_idx, torch.int32), ("out_val", out_val, torch.float32)):
        if t.shape != (b, n, k) or t.dtype != dt or not t.is_contiguous():
            raise KernelArgumentError(f"{name} must be a contiguous {dt} tensor of shape {(b, n, k)}")
    if adjacency is not None:
        _check_square(adjacency, b, n, "adjacency")
    adj = adjacency if adjacency is not None else out_val  # a placeholder pointer when not written
    cfg_m, cfg_n, cfg_warps = topk_config(capability(x.device))
    block_m, block_n, num_warps = block_m or cfg_m, block_n or cfg_n, num_warps or cfg_warps
    block_d = block_d or min(64, max(16, next_pow2(d)))
    grid = (_cdiv(n, block_m), b)
    for_current_mode(_knn_topk_kernel)[grid](
        xn, out_idx, out_val, adj, n, d,
        xn.stride(0), xn.stride(1), out_idx.stride(0), out_idx.stride(1),
        adj.stride(0), adj.stride(1),
        K=k, KP=max(2, next_pow2(k)), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        WRITE_ADJ=adjacency is not None, BINARY=edge_weight == "binary",
        QSCALE=float(2 ** int(resolution_bits)) if resolution_bits else 0.0, num_warps=num_warps,
    )
    return out_idx, out_val


def knn_select_triton(x: torch.Tensor, k: int, resolution_bits: int = 0, **blocks) -> torch.Tensor:
    """``knn_select`` by the fused top-k kernel: the same neighbour sets, as int64 [B,N,k] in ascending order."""
    idx, _ = knn_topk_triton(x, k, resolution_bits=resolution_bits, **blocks)
    return idx.sort(dim=-1).values.long()


def _check_square(t: torch.Tensor, b: int, n: int, name: str) -> None:
    if t.shape != (b, n, n) or t.dtype != torch.float32 or t.stride(-1) != 1:
        raise KernelArgumentError(f"{name} must be a float32 tensor of shape {(b, n, n)} with a contiguous last dim")


def knn_normalize_triton(
    adjacency: torch.Tensor,
    symmetrize: str = "max",
    *,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """``normalize_adjacency`` by Triton: Â = D^-1/2 (sym(A) + I) D^-1/2 [B,N,N] fp32 from a directed A [B,N,N]."""
    _check_symmetrize(symmetrize)
    if adjacency.dim() != 3 or adjacency.shape[1] != adjacency.shape[2]:
        raise KernelArgumentError(f"expected an adjacency [B,N,N], got shape {tuple(adjacency.shape)}")
    b, n, _ = adjacency.shape
    a = adjacency.to(torch.float32)
    if a.stride(-1) != 1:
        a = a.contiguous()
    if out is None:
        out = torch.empty(b, n, n, dtype=torch.float32, device=a.device)
    _check_square(out, b, n, "out")
    dinv = torch.empty(b, n, dtype=torch.float32, device=a.device)
    sym_max = symmetrize == "max"
    for_current_mode(_knn_degree_kernel)[(_cdiv(n, block_m), b)](
        a, dinv, n, a.stride(0), a.stride(1), dinv.stride(0),
        SYM_MAX=sym_max, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    for_current_mode(_knn_normalize_kernel)[(_cdiv(n, block_m), _cdiv(n, block_n), b)](
        a, dinv, out, n, a.stride(0), a.stride(1), dinv.stride(0), out.stride(0), out.stride(1),
        SYM_MAX=sym_max, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


def knn_graph_triton(
    x: torch.Tensor,
    k: int,
    edge_weight: str = "binary",
    symmetrize: str = "max",
    *,
    out: torch.Tensor | None = None,
    topk_blocks: tuple[int | None, int | None, int | None] = (None, None, None),
    norm_blocks: tuple[int, int] = (64, 64),
    resolution_bits: int = 0,
) -> torch.Tensor:
    """Â [B,N,N] fp32 by the Triton kernels (same argument checks, in the same order, as the reference).
    ``topk_blocks`` (block_m, block_n, block_d) of the top-k kernel: None entries are the device's choice."""
    _check_edge_weight(edge_weight)
    if x.dim() != 3:
        raise KernelArgumentError(f"expected features [B,N,D], got shape {tuple(x.shape)}")
    b, n, _ = x.shape
    _check_k(n, k)
    _check_symmetrize(symmetrize)
    adjacency = torch.zeros(b, n, n, dtype=torch.float32, device=x.device)
    bm, bn, bd = topk_blocks
    knn_topk_triton(x, k, adjacency=adjacency, edge_weight=edge_weight, block_m=bm, block_n=bn, block_d=bd,
                    resolution_bits=resolution_bits)
    return knn_normalize_triton(adjacency, symmetrize, out=out, block_m=norm_blocks[0], block_n=norm_blocks[1])


# == perf sweep ==================================================================================================
PERF_CASES = [
    dict(batch=1, nodes=576, dim=1024, k=8),
    dict(batch=1, nodes=1369, dim=1024, k=4),
    dict(batch=1, nodes=1369, dim=1024, k=8),
    dict(batch=1, nodes=1369, dim=1024, k=16),
    dict(batch=1, nodes=1369, dim=1024, k=24),
    dict(batch=8, nodes=1369, dim=1024, k=8),
]


def perf_sweep(device: str = "cuda", cases: list[dict] | None = None) -> list[dict]:
    """Median ms per case: the Triton graph (and its top-k kernel alone), the torch reference, and the dense
    Â @ H GEMM (the baseline a fused sparse aggregation would have to beat). Rows for zsad-bench; on a machine
    without CUDA every row is ``status="skipped"`` with the reason and no number."""
    cases = cases or PERF_CASES
    reason = sweep_unavailable_reason(device)
    if reason:
        return skipped_rows("knn_graph", cases, reason, device)
    rows = []
    for case in cases:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(case["batch"], case["nodes"], case["dim"], device=device, generator=g)
        k = case["k"]
        with torch.no_grad():
            adj = knn_graph_reference(x, k)
            rows.append(timed_row("knn_graph", case, "triton", partial(knn_graph_triton, x, k), device))
            rows.append(timed_row("knn_graph", case, "triton_topk_only", partial(knn_topk_triton, x, k), device))
            rows.append(timed_row("knn_graph", case, "torch_reference", partial(knn_graph_reference, x, k), device))
            rows.append(timed_row("knn_graph", case, "dense_aggregation_gemm", partial(torch.bmm, adj, x), device))
    return rows
