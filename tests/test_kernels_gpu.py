"""The Triton kernels compiled for a real GPU, at the real sizes, against the torch references (CUDA only).

Skipped without CUDA (tests/conftest.py skips the ``gpu`` marker). tests/test_kernels.py sets TRITON_INTERPRET=1 for
its whole pytest process; the fixture below removes it for each test here, and every launch takes the kernel in the
mode that variable says now (``kernels._common.for_current_mode``), so these compile for real even in the same run:
``pytest -m gpu``.
Paper sizes have masked tails everywhere (N = 1369 nodes, 144-token windows, 577 / 1370 tokens); batch 2 throughout.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from zsad.kernels import dual_attention as DA
from zsad.kernels import knn_graph as KG
from zsad.kernels import window_attention as WA
from zsad.kernels._common import for_current_mode, use_triton

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kernel in (KG._knn_topk_kernel, WA._window_vv_kernel, DA._dual_attention_kernel):
        assert type(for_current_mode(kernel)).__name__ == "JITFunction"  # compiled, not the CPU interpreter


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("n,k", [(576, 8), (1369, 4), (1369, 8), (1369, 24)])
def test_knn_graph_at_paper_sizes(n, k):
    x = torch.randn(2, n, 1024, device="cuda", generator=_gen(n + k))
    assert use_triton(x)
    idx, val = KG.knn_topk_triton(x, k)
    sim = KG.cosine_similarity_matrix(x.double())
    ref = KG.knn_indices(sim, k)
    torch.testing.assert_close(val.double(), sim.gather(-1, idx.long()), rtol=0, atol=1e-5)
    masked = sim.masked_fill(torch.eye(n, dtype=torch.bool, device="cuda"), float("-inf"))
    top = masked.sort(dim=-1, descending=True).values
    clear = (top[..., k - 1] - top[..., k]) > 1e-5  # rows whose k-th neighbour is not within fp32 noise of the next
    assert torch.equal(idx.long()[clear], ref[clear])
    if bool(clear.all()):
        a_hat = KG.dispatch(x, k)
        torch.testing.assert_close(a_hat.double(), KG.knn_graph_reference(x.double(), k), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [4, 8])
def test_knn_ties_follow_the_lowest_index_rule_at_paper_size(k):
    """Rows repeated many times (exact ties at similarity 1) with BAG-CLIP's resolution of 2^-14: a row whose
    duplicate group has more than k members must get the k lowest other indices of its group (hand rule)."""
    g = _gen(7)
    base = torch.randn(60, 1024, device="cuda", generator=g)
    group = torch.randint(0, 60, (2, 1369), device="cuda", generator=g)
    x = base[group]
    idx, _ = KG.knn_topk_triton(x, k, resolution_bits=14)
    checked = 0
    for b in range(2):
        members = {}
        for i, gi in enumerate(group[b].tolist()):
            members.setdefault(gi, []).append(i)
        for i, gi in enumerate(group[b].tolist()):
            others = [j for j in members[gi] if j != i]
            if len(others) >= k:
                assert idx[b, i].tolist() == others[:k], (b, i)
                checked += 1
    assert checked > 1000
    torch.testing.assert_close(KG.dispatch(x, k, resolution_bits=14),
                               KG.knn_graph_reference(x, k, resolution_bits=14), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_window_attention_at_sowa_sizes(dtype, atol):
    g = _gen(1)
    v = (torch.randn(2, 576, 1024, device="cuda", generator=g) * 3).to(dtype)
    scale = WA.logit_scale(torch.full((8,), math.log(10.0), device="cuda"))
    bias = 16 * torch.sigmoid(torch.randn(8, 144, 144, device="cuda", generator=g))
    out = WA.dispatch(v, 8, scale, bias, window=12)
    ref = WA.window_vv_attention_reference(v.double(), 8, scale.double(), bias.double(), window=12)
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=atol)


@pytest.mark.parametrize("n", [577, 1370])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_dual_attention_at_vit_lengths(n, dtype, atol):
    qkv = torch.randn(2, n, 3 * 1024, device="cuda", generator=_gen(n)).to(dtype)
    q, k, v = (t.reshape(2, n, 16, 64).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    o_qk, o_vv = DA.dispatch(q, k, v)
    torch.testing.assert_close(o_qk, F.scaled_dot_product_attention(q, k, v), rtol=1e-3, atol=atol)
    torch.testing.assert_close(o_vv, F.scaled_dot_product_attention(v, v, v), rtol=1e-3, atol=atol)
    torch.testing.assert_close(DA.vv_dispatch(v), o_vv, rtol=0, atol=atol)


def test_backbone_dual_mode_uses_the_kernel_and_agrees_with_sdpa(monkeypatch):
    from zsad.backbone import load_clip

    bb = load_clip("zsad-tiny").to("cuda").eval()
    images = torch.randn(2, 3, bb.info.image_size, bb.info.image_size, device="cuda", generator=_gen(3))
    with torch.no_grad():
        g_kernel, taps_kernel = bb.forward_taps(images, [1, 2], mode="dual")
        monkeypatch.setenv("ZSAD_KERNELS", "0")
        g_ref, taps_ref = bb.forward_taps(images, [1, 2], mode="dual")
    torch.testing.assert_close(g_kernel, g_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(taps_kernel, taps_ref, rtol=1e-4, atol=1e-4)


def test_perf_sweep_times_every_implementation():
    rows = KG.perf_sweep("cuda", [dict(batch=1, nodes=576, dim=1024, k=8)])
    rows += WA.perf_sweep("cuda", [dict(batch=1, grid=24, channels=1024, heads=8, window=12, dtype="float16")])
    rows += DA.perf_sweep("cuda", [dict(batch=1, tokens=577, heads=16, head_dim=64, dtype="float16")])
    assert rows and all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows), rows
