"""Every method's stage chain on CUDA (marker ``gpu``; skipped without CUDA): fp16 and bf16 autocast against fp32,
at the tiny and the paper profile (random weights), and the chain captured as one CUDA graph against eager.

Kernels are compiled for real here: the fixture removes TRITON_INTERPRET (tests/test_kernels.py sets it for its
own process; kernels/_common.py rebuilds the kernels when it changes), so one ``pytest -m gpu`` covers everything.
The CPU-side guarantee that capture can work (no host synchronisation in any chain) is tests/test_bench.py's
``capture_hazards`` test.
"""
import numpy as np
import pytest
import torch

import zsad.methods as M

pytestmark = pytest.mark.gpu

# score / map max relative error against fp32 eager on the same images (the bench's parity tolerances)
TOL = {torch.float16: 5e-2, torch.bfloat16: 1e-1}
_BUILT: dict = {}


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _method(name, profile):
    """One instance per (method, profile) on the GPU, kept for the session: the paper ViT-L takes seconds to build."""
    if (name, profile) not in _BUILT:
        overrides = {"backbone": {"pretrained": None}} if profile == "paper" else {}
        _BUILT[(name, profile)] = M.create(name, profile, **overrides).to("cuda").eval()
    return _BUILT[(name, profile)]


def _images(method, n=2):
    from zsad.export.parity import synthetic_images

    return torch.from_numpy(synthetic_images(method.image_size, n=n))


def _run(method, images, dtype=None):
    from zsad.data.feeds import synthetic_feed

    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        env = M.run_stages(method.stages(), **synthetic_feed(method, images.to("cuda")))
    return env["score"].float().cpu().numpy(), env["anomaly_map"].float().cpu().numpy()


def _rel(ref, got):
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.mark.parametrize("profile", ["tiny", "paper"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", M.available())
def test_half_precision_chain_matches_fp32(name, dtype, profile):
    method = _method(name, profile)
    images = _images(method)
    score, amap = _run(method, images)
    score_h, amap_h = _run(method, images, dtype)
    assert np.isfinite(score_h).all() and np.isfinite(amap_h).all()
    assert _rel(score, score_h) <= TOL[dtype] and _rel(amap, amap_h) <= TOL[dtype], (
        _rel(score, score_h), _rel(amap, amap_h))


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", M.available())
def test_cuda_graph_chain_equals_eager(name, dtype):
    """One replay of the captured chain gives eager's result for new images copied into the static inputs (the
    graph really recomputes), batch 1 and 2, with the Triton kernels compiled inside the graph."""
    from zsad.export.runtimes.python_torch import GraphedChain

    method = _method(name, "tiny")
    graphed = GraphedChain(method, "cuda", dtype)
    for n in (1, 2):
        first, second = _images(method, n + 1)[:n], _images(method, n + 1)[1:]
        graphed(first)  # captures this shape
        out = graphed(second)
        got = [out[n].float().cpu().numpy() for n in ("score", "anomaly_map")]
        ref = _run(method, second, dtype)
        tol = 1e-5 if dtype is None else TOL[dtype] / 10  # same kernels, same order: only rounding differs
        assert _rel(ref[0], got[0]) <= tol and _rel(ref[1], got[1]) <= tol


def test_graph_replays_the_triton_kernels():
    """Inside the captured BAG-CLIP chain, dispatch picks the Triton kernels (not the torch reference)."""
    from zsad.export.runtimes.python_torch import GraphedChain
    from zsad.kernels import dual_attention, knn_graph

    calls = []
    method = _method("bagclip", "tiny")
    originals = (knn_graph.knn_select_triton, knn_graph.knn_normalize_triton, dual_attention.dual_attention_triton)

    def spy(fn):
        def wrapped(*a, **k):
            calls.append(fn.__name__)
            return fn(*a, **k)
        return wrapped

    (knn_graph.knn_select_triton, knn_graph.knn_normalize_triton,
     dual_attention.dual_attention_triton) = (spy(f) for f in originals)
    try:
        GraphedChain(method, "cuda", torch.float16)(_images(method, 1))
    finally:
        knn_graph.knn_select_triton, knn_graph.knn_normalize_triton, dual_attention.dual_attention_triton = originals
    assert {"knn_select_triton", "knn_normalize_triton", "dual_attention_triton"} <= set(calls), calls
