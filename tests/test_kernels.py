"""Triton kernels on CPU through Triton's interpreter, against their torch references evaluated in float64.

TRITON_INTERPRET=1 is set for this whole pytest process; every launch goes through
``kernels._common.for_current_mode``, so the kernels run interpreted here even if a kernel module was imported
(and its ``@triton.jit`` functions wrapped) before. Every test draws its own seeded random inputs, poisons the
outputs before the launch (NaN / -1) and checks that every element was written. Sizes are small but exercise
tiling and masked tails (N = 37, 50, 130 with 16-64 blocks; 144-token windows; L = 577 for one dual case).
GPU-only checks at the real sizes live in tests/test_kernels_gpu.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # conftest sets it on GPU-less machines; launches read it (for_current_mode)

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from zsad.kernels import dual_attention as DA  # noqa: E402
from zsad.kernels import knn_graph as KG  # noqa: E402
from zsad.kernels import window_attention as WA  # noqa: E402
from zsad.kernels._common import (  # noqa: E402
    KernelArgumentError,
    for_current_mode,
    online_softmax_update,
    tl,
    triton,
    use_triton,
)

KERNELS = ((KG, "_knn_topk_kernel"), (KG, "_knn_degree_kernel"), (KG, "_knn_normalize_kernel"),
           (WA, "_window_vv_kernel"), (DA, "_dual_attention_kernel"))


def _triton_or_skip():
    pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreted():
    """The kernels these tests launch are the interpreter's, not compiled GPU kernels."""
    _triton_or_skip()
    for mod, name in KERNELS:
        assert type(for_current_mode(getattr(mod, name))).__name__ == "InterpretedFunction", name


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# == kNN graph ===================================================================================================
def _check_neighbours(idx, val, x, k, tol=1e-6):
    """idx/val [B,N,k] from the kernel against the float64 reference: fully written, in range, no self, and the
    same neighbour list as ``knn_indices`` in float64 wherever the row's k-th / (k+1)-th similarities are apart
    by more than ``tol`` (closer rows may legitimately differ by fp32 rounding; there only the values must agree)."""
    b, n, _ = x.shape
    assert idx.dtype == torch.int32 and val.dtype == torch.float32
    assert bool(((idx >= 0) & (idx < n)).all()), "unwritten or out-of-range neighbour index"
    assert torch.isfinite(val).all(), "unwritten similarity"
    rows = torch.arange(n).view(1, n, 1)
    assert not bool((idx.long() == rows).any()), "self chosen as neighbour"
    sim = KG.cosine_similarity_matrix(x.double())
    ref = KG.knn_indices(sim, k)
    got = idx.long()
    # the kernel's similarities are the float64 ones (to fp32 rounding), listed in rank order
    torch.testing.assert_close(val.double(), sim.gather(-1, got), rtol=0, atol=tol)
    masked = sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    top = masked.sort(dim=-1, descending=True).values
    gap = (top[..., k - 1] - top[..., k]) if k < n - 1 else torch.full((b, n), math.inf, dtype=torch.float64)
    clear = gap > tol
    assert torch.equal(got[clear], ref[clear])
    torch.testing.assert_close(sim.gather(-1, got)[~clear], sim.gather(-1, ref)[~clear], rtol=0, atol=tol)
    return clear


KNN_CASES = [  # (n, d, k, (block_m, block_n, block_d)): several row/column tiles with masked tails, D tails
    (37, 16, 1, (16, 16, 16)),
    (50, 8, 4, (16, 32, 16)),
    (130, 32, 8, (64, 64, 16)),
]


@pytest.mark.parametrize("n,d,k,blocks", KNN_CASES)
def test_knn_topk_matches_float64_reference(interpreted, n, d, k, blocks):
    x = torch.randn(2, n, d, generator=_gen(1000 + n))
    out_idx = torch.full((2, n, k), -1, dtype=torch.int32)
    out_val = torch.full((2, n, k), float("nan"))
    adj = torch.zeros(2, n, n)  # the scatter target must start at zero (contract of knn_topk_triton)
    bm, bn, bd = blocks
    idx, val = KG.knn_topk_triton(x, k, out_idx=out_idx, out_val=out_val, adjacency=adj, edge_weight="relu_cos",
                                  block_m=bm, block_n=bn, block_d=bd)
    assert idx is out_idx and val is out_val
    clear = _check_neighbours(idx, val, x, k)
    assert bool(clear.all()), "random test data should have no near-ties"
    torch.testing.assert_close(adj.double(), KG.knn_adjacency(x.double(), k, "relu_cos"), rtol=0, atol=1e-6)


GRAPH_CASES = [  # (n, d, k, edge_weight, symmetrize, topk blocks, normalisation blocks)
    (37, 16, 1, "binary", "max", (16, 16, 16), (16, 16)),
    (50, 8, 4, "relu_cos", "mean", (16, 32, 16), (16, 32)),
    (130, 32, 8, "binary", "mean", (64, 64, 16), (64, 64)),
    (130, 32, 8, "relu_cos", "max", (64, 64, 32), (32, 64)),
]


@pytest.mark.parametrize("n,d,k,edge_weight,symmetrize,tb,nb", GRAPH_CASES)
def test_knn_graph_matches_float64_reference(interpreted, n, d, k, edge_weight, symmetrize, tb, nb):
    x = torch.randn(3, n, d, generator=_gen(2000 + n + k))
    out = torch.full((3, n, n), float("nan"))
    a_hat = KG.knn_graph_triton(x, k, edge_weight, symmetrize, out=out, topk_blocks=tb, norm_blocks=nb)
    assert a_hat is out and torch.isfinite(out).all(), "Â not fully written"
    ref = KG.knn_graph_reference(x.double(), k, edge_weight, symmetrize)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out, out.transpose(-1, -2))  # symmetric by construction, bit for bit


@pytest.mark.parametrize("edge_weight,symmetrize", [("binary", "max"), ("relu_cos", "mean")])
def test_split_dispatch_takes_the_triton_path_and_matches_the_reference(interpreted, monkeypatch, edge_weight,
                                                                         symmetrize):
    """BAG-CLIP's two graph steps (selection, then Â from the selected indices) with dispatch forced to Triton:
    the neighbour sets equal the float64 reference's (as sets, ascending int64) and Â equals the reference built
    from the same indices."""
    calls = []
    for name in ("knn_select_triton", "knn_normalize_triton"):
        real = getattr(KG, name)
        monkeypatch.setattr(KG, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    monkeypatch.setattr(KG, "use_triton", lambda *t: True)
    x = torch.randn(2, 50, 8, generator=_gen(31))
    idx = KG.dispatch_select(x, 4, resolution_bits=14)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort(dim=-1).values)
    assert torch.equal(idx, KG.knn_select(x.double(), 4, 14))
    a_hat = KG.dispatch_graph_from_index(x, idx, edge_weight, symmetrize, 14)
    ref = KG.graph_from_index_reference(x.double(), idx, edge_weight, symmetrize, 14)
    torch.testing.assert_close(a_hat.double(), ref, rtol=1e-5, atol=1e-6)
    assert calls == ["knn_select_triton", "knn_normalize_triton"]


@pytest.mark.parametrize("symmetrize", KG.SYMMETRIZE)
def test_knn_normalize_on_an_arbitrary_directed_adjacency(interpreted, symmetrize):
    g = _gen(7)
    a = torch.rand(2, 50, 50, generator=g) * (torch.rand(2, 50, 50, generator=g) < 0.1)  # weighted, sparse, asymmetric
    out = torch.full((2, 50, 50), float("nan"))
    KG.knn_normalize_triton(a, symmetrize, out=out, block_m=16, block_n=32)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), KG.normalize_adjacency(a.double(), symmetrize), rtol=1e-5, atol=1e-7)


def _tie_features(b, n, d, seed):
    """Rows with 4 entries of +-1 (so normalised entries are +-0.5 and every similarity is a multiple of 0.25,
    computed exactly in fp32 and fp64: many exact ties), plus exact and 2x-scaled duplicates and zero rows."""
    g = _gen(seed)
    x = torch.zeros(b, n, d)
    for bi in range(b):
        for i in range(n):
            pos = torch.randperm(d, generator=g)[:4]
            x[bi, i, pos] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    x[:, 5] = x[:, 1]  # duplicated row
    x[:, 17] = 2 * x[:, 1]  # same direction, exact after normalisation
    x[:, 30] = x[:, 9]
    x[:, [0, 12, 13, 39]] = 0.0  # zero vectors: similarity 0 to everything
    return x


@pytest.mark.parametrize("k", [1, 4, 8])
def test_knn_ties_duplicates_and_zero_vectors(interpreted, k):
    x = _tie_features(2, 40, 16, seed=k)
    idx, val = KG.knn_topk_triton(x, k, block_m=16, block_n=16, block_d=16)
    ref32 = KG.knn_indices(KG.cosine_similarity_matrix(x), k)
    ref64 = KG.knn_indices(KG.cosine_similarity_matrix(x.double()), k)
    assert torch.equal(ref32, ref64)  # the ties are exact in both precisions
    assert torch.equal(idx.long(), ref64)  # so the tie rule decides, and the kernel follows it exactly
    sim = KG.cosine_similarity_matrix(x.double())
    assert torch.equal(val.double(), sim.gather(-1, idx.long()))
    # the rule, spelled out: a zero row's neighbours are the k lowest other indices
    for z in (0, 12, 13, 39):
        expect = [j for j in range(40) if j != z][:k]
        assert idx[:, z].tolist() == [expect, expect]
    # duplicates see each other first (similarity 1), lowest index first
    assert idx[0, 1, 0].item() == 5 and idx[0, 5, 0].item() == 1
    if k >= 2:
        assert idx[0, 1, :2].tolist() == [5, 17] and idx[0, 17, :2].tolist() == [1, 5]
    out = torch.full((2, 40, 40), float("nan"))
    KG.knn_graph_triton(x, k, "relu_cos", "max", out=out, topk_blocks=(16, 16, 16), norm_blocks=(16, 16))
    torch.testing.assert_close(out.double(), KG.knn_graph_reference(x.double(), k, "relu_cos", "max"),
                               rtol=1e-6, atol=1e-7)


def test_quantized_similarity_rounds_half_to_even():
    s = torch.tensor([0.5 / 4, 1.5 / 4, 2.5 / 4, -0.5 / 4, 0.3, 1.0, -1.0, 0.1 + 1e-9], dtype=torch.float32)
    q = KG.quantize_similarity(s, 2)  # multiples of 1/4; exact halves go to the even multiple
    assert q.tolist() == [0.0, 0.5, 0.5, -0.0, 0.25, 1.0, -1.0, 0.0]
    assert KG.quantize_similarity(s, 0) is s


@pytest.mark.parametrize("k", [1, 4, 8])
def test_knn_kernel_follows_the_resolution_rule(interpreted, k):
    """With resolution_bits the kernel rounds exactly like the reference: same neighbours, same weights, including
    rows built to have near-equal similarities (1e-7 apart: equal after rounding, so the lowest index wins)."""
    g = _gen(300 + k)
    x = torch.randn(2, 50, 16, generator=g)
    x[:, 10] = x[:, 3] + 1e-7 * torch.randn(2, 16, generator=g)  # near-duplicates of row 3
    x[:, 20] = x[:, 3] + 1e-7 * torch.randn(2, 16, generator=g)
    idx, val = KG.knn_topk_triton(x, k, block_m=16, block_n=32, block_d=16, resolution_bits=14)
    raw = KG.cosine_similarity_matrix(x.double())
    sim = KG.quantize_similarity(raw, 14)
    # a row with any of its k+1 best values within fp32 noise of a rounding boundary may round either way: the k-th
    # or (k+1)-th decides the neighbours, any of the first k the reported weights
    masked = raw.masked_fill(torch.eye(50, dtype=torch.bool), float("-inf"))
    top = masked.sort(dim=-1, descending=True).values[..., :k + 1] * 2.0 ** 14
    clear = ((top - top.floor() - 0.5).abs() > 1e-6 * 2.0 ** 14).all(-1)
    ref = KG.knn_indices(sim, k)
    assert torch.equal(idx.long()[clear], ref[clear])
    assert idx[:, 3, 0].tolist() == [10, 10]  # 10 and 20 are equal to 3 after rounding: the lower index wins
    assert torch.equal(val.double()[clear], sim.gather(-1, idx.long())[clear])  # reports the rounded similarities
    # the whole graph (its degrees read every row) on rows of +-1: every cosine a multiple of 1/16, exact in fp32 and
    # on the 2^-14 grid, so nothing rounds either way, and ties everywhere for the lowest-index rule
    signs = torch.randint(0, 2, (2, 50, 16), generator=g).float() * 2 - 1
    out = torch.full((2, 50, 50), float("nan"))
    KG.knn_graph_triton(signs, k, "relu_cos", "max", out=out, topk_blocks=(16, 32, 16), norm_blocks=(16, 16),
                        resolution_bits=14)
    torch.testing.assert_close(out.double(), KG.knn_graph_reference(signs.double(), k, "relu_cos", "max", 14),
                               rtol=1e-6, atol=1e-7)


def test_knn_hand_checked_example(interpreted):
    """The model's documented example (tests/test_graph.py): duplicates, an orthogonal row, zero rows."""
    x = torch.zeros(1, 8, 4)
    x[0, 0] = x[0, 3] = x[0, 5] = torch.tensor([1.0, 0, 0, 0])
    x[0, 6] = torch.tensor([0.0, 1.0, 0, 0])
    idx, _ = KG.knn_topk_triton(x, 2, block_m=16, block_n=16)
    assert idx[0, 0].tolist() == [3, 5] and idx[0, 3].tolist() == [0, 5]
    assert idx[0, 2].tolist() == [0, 1] and idx[0, 1].tolist() == [0, 2] and idx[0, 6].tolist() == [0, 1]


def test_knn_reference_exports_to_onnx_and_keeps_the_tie_rule(tmp_path):
    """The reference is what ONNX export traces: it must export (TopK, no sort/scatter) and ONNX Runtime must give
    the same graph, ties and zero rows included, at a dynamic batch."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import warnings

    class Graph(torch.nn.Module):
        def forward(self, x):
            return KG.knn_graph_reference(x, 4, "relu_cos", "max")

    x = _tie_features(2, 40, 16, seed=21)
    path = tmp_path / "graph.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Graph(), (x,), str(path), dynamo=True, opset_version=18, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=8)}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feats in (x, _tie_features(3, 40, 16, seed=22)):
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: feats.numpy()})[0])
        ref = KG.knn_graph_reference(feats.double(), 4, "relu_cos", "max")
        assert torch.equal(got > 0, ref > 0)  # the same edges
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)


def test_knn_argument_errors(interpreted):
    x = torch.randn(1, 10, 4)
    for fn in (KG.knn_graph_reference, KG.knn_graph_triton):
        for k in (0, 10):
            with pytest.raises(KernelArgumentError, match="k must be in 1..9"):
                fn(x, k)
        with pytest.raises(KernelArgumentError, match="edge_weight"):
            fn(x, 3, edge_weight="gauss")
        with pytest.raises(KernelArgumentError, match="symmetrize"):
            fn(x, 3, symmetrize="min")


# == SOWA window attention =======================================================================================
def _naive_window_attention(v, n_heads, scale, bias, window, grid):
    """Independent float64 construction: slice each window out of the 2-D grid, loop over heads, write back."""
    b, _, c = v.shape
    gh, gw = grid
    hd = c // n_heads
    img = v.double().reshape(b, gh, gw, c)
    out = torch.zeros_like(img)
    for bi in range(b):
        for y0 in range(0, gh, window):
            for x0 in range(0, gw, window):
                tokens = img[bi, y0:y0 + window, x0:x0 + window].reshape(window * window, c)
                for h in range(n_heads):
                    vh = tokens[:, h * hd:(h + 1) * hd]
                    vn = vh / vh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    p = torch.softmax(vn @ vn.T * float(scale[h]) + bias[h].double(), dim=-1)
                    out[bi, y0:y0 + window, x0:x0 + window, h * hd:(h + 1) * hd] = (p @ vh).reshape(window, window, hd)
    return out.reshape(b, gh * gw, c)


WINDOW_CASES = [  # (batch, grid, heads, head_dim, window, block_m, block_n)
    (2, (24, 24), 2, 16, 12, 64, 64),   # SOWA's layout: 2x2 windows of 144 tokens (3 key blocks, 16-row tail)
    (1, (12, 24), 2, 16, 12, 64, 32),   # non-square grid
    (2, (8, 12), 2, 24, 4, 16, 16),     # small window, head dim not a power of two (masked channels)
]


@pytest.mark.parametrize("b,grid,heads,hd,window,bm,bn", WINDOW_CASES)
def test_window_attention_matches_float64_reference(interpreted, b, grid, heads, hd, window, bm, bn):
    g = _gen(300 + window + grid[1])
    n = grid[0] * grid[1]
    v = 3 * torch.randn(b, n, heads * hd, generator=g)
    v[0, 5] = 0.0  # a zero value row: v̂ = 0 (F.normalize eps), logits = bias only
    theta = torch.tensor([math.log(10.0), math.log(1000.0)])  # the second head is clamped to 100
    scale = WA.logit_scale(theta)
    t = window * window
    bias = 16 * torch.sigmoid(torch.randn(heads, t, t, generator=g))
    out = torch.full_like(v, float("nan"))
    WA.window_vv_attention_triton(v, heads, scale, bias, window, grid, out=out, block_m=bm, block_n=bn)
    assert torch.isfinite(out).all(), "output not fully written"
    ref = WA.window_vv_attention_reference(v.double(), heads, scale.double(), bias.double(), window, grid)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)


def test_window_reference_is_the_spec():
    """The reference itself against an explicit per-window loop (guards the partition / reverse indexing)."""
    g = _gen(5)
    v = torch.randn(2, 8 * 12, 2 * 8, generator=g, dtype=torch.float64)
    scale = WA.logit_scale(torch.tensor([math.log(10.0), 6.0], dtype=torch.float64))
    bias = torch.randn(2, 16, 16, generator=g, dtype=torch.float64)
    ref = WA.window_vv_attention_reference(v, 2, scale, bias, window=4, grid=(8, 12))
    torch.testing.assert_close(ref, _naive_window_attention(v, 2, scale, bias, 4, (8, 12)), rtol=1e-12, atol=1e-12)
    assert torch.allclose(scale, torch.tensor([10.0, 100.0], dtype=torch.float64))  # exp(min(θ, ln 100))
    vw = WA.window_partition(v, (8, 12), 4)
    assert vw.shape == (2 * 6, 16, 16) and torch.equal(WA.window_reverse(vw, (8, 12), 4), v)


def test_window_argument_errors():
    v = torch.randn(1, 100, 16)
    s, bias = torch.ones(2), torch.zeros(2, 144, 144)
    with pytest.raises(KernelArgumentError, match="not a whole number"):
        WA.window_vv_attention_reference(v, 2, s, bias, window=12)
    with pytest.raises(KernelArgumentError, match="not a square grid"):
        WA.window_vv_attention_reference(torch.randn(1, 98, 16), 2, s, bias)
    with pytest.raises(KernelArgumentError, match="bias must be"):
        WA.window_vv_attention_reference(torch.randn(1, 144, 16), 2, s, torch.zeros(2, 12, 12))
    with pytest.raises(KernelArgumentError, match="one per head"):
        WA.window_vv_attention_reference(torch.randn(1, 144, 16), 2, torch.ones(3), bias)


# == dual-stream attention =======================================================================================
def _softmax_attention64(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _packed_qkv(b, n, h, hd, seed, dtype=torch.float32):
    """q, k, v as the strided head views of one packed projection, like zsad.modules.attention._qkv."""
    qkv = torch.randn(b, n, 3 * h * hd, generator=_gen(seed)).to(dtype)
    return tuple(t.reshape(b, n, h, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


DUAL_CASES = [  # (batch, tokens, heads, head_dim, block_m, block_n)
    (2, 37, 2, 16, 16, 16),
    (2, 50, 2, 24, 32, 16),
    (2, 130, 2, 16, 32, 32),
    (1, 577, 1, 64, 64, 64),  # ViT-L/14 at 336 px: 577 = 9 x 64 + 1, a one-row tail
]


@pytest.mark.parametrize("b,n,h,hd,bm,bn", DUAL_CASES)
def test_dual_attention_matches_float64_and_two_sdpa_calls(interpreted, b, n, h, hd, bm, bn):
    q, k, v = _packed_qkv(b, n, h, hd, seed=400 + n)
    assert not q.is_contiguous()  # the kernel reads the strided views in place
    out_qk = torch.full((b, h, n, hd), float("nan"))
    out_vv = torch.full((b, h, n, hd), float("nan"))
    DA.dual_attention_triton(q, k, v, out_qk=out_qk, out_vv=out_vv, block_m=bm, block_n=bn)
    assert torch.isfinite(out_qk).all() and torch.isfinite(out_vv).all(), "outputs not fully written"
    torch.testing.assert_close(out_qk.double(), _softmax_attention64(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_vv.double(), _softmax_attention64(v, v, v), rtol=1e-5, atol=1e-5)
    sdpa_qk, sdpa_vv = DA.dual_attention_reference(q, k, v)  # the two SDPA calls the backbone made before
    torch.testing.assert_close(out_qk, sdpa_qk, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_vv, sdpa_vv, rtol=1e-4, atol=1e-5)
    # the V-V-only variant (the backbone's vv mode), default output layout
    vv = DA.vv_attention_triton(v, block_m=bm, block_n=bn)
    torch.testing.assert_close(vv.double(), _softmax_attention64(v, v, v), rtol=1e-5, atol=1e-5)
    assert vv.transpose(1, 2).is_contiguous()  # [B, L, heads, hd] memory: merging heads is free


def test_dual_attention_fp16(interpreted):
    q, k, v = _packed_qkv(2, 50, 2, 16, seed=9, dtype=torch.float16)
    o_qk, o_vv = DA.dual_attention_triton(q, k, v, block_m=16, block_n=32)
    assert o_qk.dtype == torch.float16
    torch.testing.assert_close(o_qk.double(), _softmax_attention64(q, k, v), rtol=0, atol=5e-3)
    torch.testing.assert_close(o_vv.double(), _softmax_attention64(v, v, v), rtol=0, atol=5e-3)


# == the online-softmax step shared by the attention kernels ======================================================
@triton.jit
def _online_softmax_probe(S, V, OUT, M, L, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """softmax2(S) @ V for S [BLOCK_M, N], V [N, D], folded in key blocks of BLOCK_N (masked tail) by the helper."""
    rm = tl.arange(0, BLOCK_M)
    dd = tl.arange(0, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        ok = rn < N
        s = tl.load(S + rm[:, None] * N + rn[None, :], mask=ok[None, :], other=float("-inf"))
        v = tl.load(V + rn[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, s, v, DOT_PREC)
    tl.store(OUT + rm[:, None] * D + dd[None, :], acc / l_i[:, None])
    tl.store(M + rm, m_i)
    tl.store(L + rm, l_i)


def test_online_softmax_update_folds_blocks_into_one_softmax(interpreted):
    """The shared step, block by block, equals one float64 softmax in base 2: running max = the row max, the
    denominator = sum 2^(s - max), the output = softmax(s ln 2) @ v, including rows whose max arrives late (every
    earlier block rescaled) or early, and a masked tail block."""
    g = _gen(77)
    m, n, d = 16, 50, 16  # key blocks of 16: 16 + 16 + 16 + a 2-key tail
    s = 4 * torch.randn(m, n, generator=g)
    s[0] += torch.linspace(0, 40, n)  # max in the last block: the accumulator is rescaled at every block
    s[1, 3] = 60.0  # max in the first block: later blocks add terms far below it
    s[2] -= 100.0  # all logits very negative: only the running max keeps exp2 finite
    v = torch.randn(n, d, generator=g)
    out, m_out, l_out = torch.full((m, d), float("nan")), torch.full((m,), float("nan")), torch.full((m,), float("nan"))
    for_current_mode(_online_softmax_probe)[(1,)](s, v, out, m_out, l_out, n, BLOCK_M=m, BLOCK_N=16, D=d,
                                                  DOT_PREC="ieee")
    s64 = s.double()
    torch.testing.assert_close(m_out.double(), s64.max(dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(l_out.double(), torch.exp2(s64 - s64.max(dim=1, keepdim=True).values).sum(1),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(out.double(), torch.softmax(s64 * math.log(2.0), dim=1) @ v.double(),
                               rtol=1e-5, atol=1e-6)


def test_launches_follow_triton_interpret_at_each_call(monkeypatch):
    """Compiled without TRITON_INTERPRET, interpreted with it, whatever it was when the module was imported: the
    attention kernels' copies call the shared helper in the same mode, and the modules' own objects never change."""
    _triton_or_skip()
    own = {name: getattr(mod, name) for mod, name in KERNELS}
    for value, kind in (("0", "JITFunction"), ("1", "InterpretedFunction")):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        for mod, name in KERNELS:
            assert type(for_current_mode(getattr(mod, name))).__name__ == kind, name
        for kernel in (WA._window_vv_kernel, DA._dual_attention_kernel):
            helper = for_current_mode(kernel).fn.__globals__["online_softmax_update"]
            assert type(helper).__name__ == kind
        assert type(for_current_mode(KG._knn_topk_kernel).fn.__globals__["_rank_key"]).__name__ == kind
    assert {name: getattr(mod, name) for mod, name in KERNELS} == own
    v = torch.randn(1, 64, 32, generator=_gen(8))  # and, back in the interpreter, still right
    scale, bias = torch.tensor([10.0, 30.0]), torch.randn(2, 16, 16, generator=_gen(9))
    got = WA.window_vv_attention_triton(v, 2, scale, bias, window=4, block_m=16, block_n=16)
    torch.testing.assert_close(got.double(), _naive_window_attention(v, 2, scale, bias, 4, (8, 8)),
                               rtol=1e-5, atol=2e-5)


# == dispatch, integration, sweeps, TensorRT ======================================================================
def test_dispatch_runs_the_reference_on_cpu():
    x = torch.randn(2, 30, 8, generator=_gen(11))
    assert not use_triton(x)
    assert torch.equal(KG.dispatch(x, 4, "relu_cos", "mean"), KG.knn_graph_reference(x, 4, "relu_cos", "mean"))
    q, k, v = _packed_qkv(1, 20, 2, 8, seed=12)
    for a, r in zip(DA.dispatch(q, k, v), DA.dual_attention_reference(q, k, v), strict=True):
        assert torch.equal(a, r)
    assert torch.equal(DA.vv_dispatch(v), F.scaled_dot_product_attention(v, v, v))
    vw = torch.randn(1, 144, 16, generator=_gen(13))
    s, bias = torch.tensor([10.0, 20.0]), torch.randn(2, 144, 144, generator=_gen(14))
    assert torch.equal(WA.dispatch(vw, 2, s, bias), WA.window_vv_attention_reference(vw, 2, s, bias))


def test_graph_module_calls_the_kernels_reference():
    from zsad import ZsadError
    from zsad.modules import graph

    x = torch.randn(2, 25, 6, generator=_gen(15))
    assert torch.equal(graph.knn_graph(x, 3), KG.knn_graph_reference(x, 3))
    assert graph.EDGE_WEIGHTS == KG.EDGE_WEIGHTS and graph.SYMMETRIZE == KG.SYMMETRIZE
    with pytest.raises(ZsadError, match="k must be"):
        graph.knn_graph(x, 25)
    with pytest.raises(ZsadError, match="symmetrize"):
        graph.normalize_adjacency(graph.knn_adjacency(x, 3), "min")


def test_importing_zsad_or_the_kernels_package_does_not_import_triton():
    """Only the kernel modules import triton (guarded); the core package and the kernels package itself do not."""
    code = "import sys, zsad, zsad.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_without_triton_everything_imports_and_dispatch_runs_the_reference():
    """triton hidden from sys.modules (as on a machine without it): the kernel modules and their users import, the
    kernels stay plain functions, dispatch() gives the references' results, and a direct launch says why it cannot."""
    code = """
import sys
sys.modules["triton"] = None  # 'import triton' now raises ImportError
sys.modules["triton.language"] = None
import torch
import zsad.modules.attention, zsad.modules.graph, zsad.modules.window_attention, zsad.kernels.trt_plugins
from zsad.kernels import _common, dual_attention as DA, knn_graph as KG, window_attention as WA
assert _common.HAS_TRITON is False and _common.tl is None
assert type(KG._knn_topk_kernel).__name__ == "function" and type(WA._window_vv_kernel).__name__ == "function"
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 30, 8, generator=g)
assert torch.equal(KG.dispatch(x, 4), KG.knn_graph_reference(x, 4))
q, k, v = torch.randn(3, 1, 2, 20, 8, generator=g)
assert all(torch.equal(a, b) for a, b in zip(DA.dispatch(q, k, v), DA.dual_attention_reference(q, k, v)))
vw, s, b = torch.randn(1, 144, 16, generator=g), torch.tensor([10.0, 20.0]), torch.randn(2, 144, 144, generator=g)
assert torch.equal(WA.dispatch(vw, 2, s, b), WA.window_vv_attention_reference(vw, 2, s, b))
assert _common.sweep_unavailable_reason("cuda") is not None
try:
    KG.knn_topk_triton(x, 4)
except RuntimeError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("a launch without triton did not fail")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_perf_sweep_on_cpu_reports_skipped_rows_without_numbers():
    from zsad import kernels

    rows = kernels.perf_sweep("cpu")
    expected = len(KG.PERF_CASES) + len(WA.PERF_CASES) + len(DA.PERF_CASES)
    assert len(rows) == expected
    assert {r["kernel"] for r in rows} == {"knn_graph", "window_vv_attention", "dual_attention"}
    for r in rows:
        assert r["status"] == "skipped" and r["median_ms"] is None and "CUDA" in r["reason"]


def test_trt_plugins_register():
    pytest.importorskip("tensorrt")
    import tensorrt.plugin as trtp

    from zsad.kernels import trt_plugins

    assert trt_plugins.register_plugins() == ("zsad::knn_graph", "zsad::window_vv_attention", "zsad::dual_attention")
    for name in trt_plugins.PLUGINS:
        assert hasattr(trtp.op.zsad, name)


def test_trt_plugins_fail_clearly_without_tensorrt():
    try:
        import tensorrt.plugin  # noqa: F401
        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    from zsad.kernels import trt_plugins

    with pytest.raises(RuntimeError, match="TensorRT .* is not installed"):
        trt_plugins.register_plugins()
