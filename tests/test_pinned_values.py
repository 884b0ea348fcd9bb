"""Formulas, constants and protocol steps pinned to values computed outside the code under test.

Each reference here is independent of zsad: PIL's resampling re-implemented in numpy (its documented separable
filter with the support widened by the down-scale factor), numpy's percentile definition, hand-built cases.
"""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from zsad.data.transforms import CLIP_MEAN, CLIP_STD, preprocess, preprocess_mask, resize_map


# == PIL's resampling in numpy (an independent reference for the filters zsad must use) ===========================
def _bicubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _triangle(x):
    return np.clip(1.0 - np.abs(x), 0.0, None)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


def _resample_matrix(n_in, n_out, kind):
    """[n_out, n_in] weights: output pixel centre (i + 0.5) * scale, support widened by the down-scale factor,
    taps clipped to the image and renormalised (PIL's ImagingResample coefficients)."""
    fn, support = _FILTERS[kind]
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support *= fscale
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = fn((j - centre + 0.5) / fscale)
        w[i, lo:hi] = k / k.sum()
    return w


def _resize_np(img, out_h, out_w, kind, uint8=False):
    """image [H, W, ...] -> [out_h, out_w, ...]: horizontal pass then vertical, in float64; ``uint8``: each pass
    rounded and clipped to 0..255 as PIL stores 8-bit images between the passes."""
    img = np.asarray(img, np.float64)
    wx = _resample_matrix(img.shape[1], out_w, kind)
    wy = _resample_matrix(img.shape[0], out_h, kind)
    to8 = (lambda a: np.clip(np.round(a), 0, 255)) if uint8 else (lambda a: a)
    return to8(np.einsum("oh,hw...->ow...", wy, to8(np.einsum("ow,hw...->ho...", wx, img))))


def _test_image(h, w):
    i, j = np.mgrid[0:h, 0:w]
    return np.stack([(i * 37 + j * 91 + c * 53) % 256 for c in range(3)], axis=-1).astype(np.uint8)


def _normalise(x01):
    return (x01 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)


def test_clip_constants_are_openais():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("shape,size", [((13, 9), 8), ((5, 6), 8), ((20, 20), 7)])
def test_preprocess_is_bicubic_then_clip_normalised(shape, size):
    img = _test_image(*shape)
    got = preprocess(img, size)
    assert got.shape == (3, size, size) and got.dtype == np.float32
    # PIL's own bicubic (uint8 in, uint8 out) and the normalisation done by hand: equal to float32 rounding
    pil = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC), np.float64) / 255.0
    np.testing.assert_allclose(got, _normalise(pil).transpose(2, 0, 1), rtol=0, atol=2e-6)
    # the filter itself, from its definition: within PIL's two uint8 roundings (one level each pass)
    ref = _resize_np(img, size, size, "bicubic", uint8=True) / 255.0
    step = 2.01 / 255.0 / min(CLIP_STD)
    assert np.abs(got - _normalise(ref).transpose(2, 0, 1)).max() <= step
    # and the case tells the filters apart: bilinear is far off
    other = _resize_np(img, size, size, "bilinear", uint8=True) / 255.0
    assert np.abs(got - _normalise(other).transpose(2, 0, 1)).max() > 2 * step


def test_preprocess_golden_values():
    """A 2x2 image needs no resize at size 2: the values are (v/255 - mean) / std, written out by hand."""
    img = np.array([[[0, 128, 255], [255, 0, 0]], [[10, 20, 30], [200, 100, 50]]], np.uint8)
    got = preprocess(img, 2)
    assert got[0, 0, 0] == pytest.approx((0 / 255 - 0.48145466) / 0.26862954, abs=1e-6)  # -1.792263
    assert got[1, 0, 0] == pytest.approx((128 / 255 - 0.4578275) / 0.26130258, abs=1e-6)
    assert got[2, 0, 0] == pytest.approx((255 / 255 - 0.40821073) / 0.27577711, abs=1e-6)  # 2.145897
    assert got[0, 1, 1] == pytest.approx((200 / 255 - 0.48145466) / 0.26862954, abs=1e-6)
    assert got[0, 0, 0] == pytest.approx(-1.7922626, abs=1e-6) and got[2, 0, 0] == pytest.approx(2.1458969, abs=1e-6)
    # grey and RGBA inputs: replicated / alpha dropped
    grey = np.array([[0, 255], [51, 102]], np.uint8)
    assert got.shape == preprocess(grey, 2).shape
    assert preprocess(grey, 2)[:, 1, 0] == pytest.approx(_normalise(np.full(3, 51 / 255.0)), abs=1e-6)
    rgba = np.concatenate([img, np.full((2, 2, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(preprocess(rgba, 2), got)


@pytest.mark.parametrize("src,dst", [((4, 6), (9, 10)), ((12, 12), (5, 7)), ((7, 3), (7, 8))])
def test_resize_map_is_bilinear(src, dst):
    m = np.random.default_rng(0).random(src).astype(np.float32) * 3.0 - 1.0
    got = resize_map(m, *dst)
    assert got.shape == dst and got.dtype == np.float32
    ref = _resize_np(m, *dst, "bilinear")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.abs(got - _resize_np(m, *dst, "bicubic")).max() > 1e-2  # the case separates the filters


def test_preprocess_mask_bilinear_then_half():
    mask = np.zeros((8, 8), bool)
    mask[0:3, 0:3] = True  # down to 4x4: bilinear 2x averages -> the corner blocks (1, 0.5...) threshold at 0.5
    ref = (_resize_np(mask.astype(np.float64), 4, 4, "bilinear") > 0.5).astype(np.float32)
    got = preprocess_mask(mask, 4)
    np.testing.assert_array_equal(got, ref)
    assert got.sum() == 1 and got[0, 0] == 1  # a 3x3 block keeps ~its area (9/4): one pixel, not 4 nor 0


# == bench: percentiles and speed-up ==============================================================================
def test_percentiles_match_numpys_linear_definition():
    from zsad.bench.timing import percentiles

    samples = [float(v) for v in range(101)]  # 0..100: the q-th linear percentile is q itself
    p = percentiles(samples)
    assert (p["p50_ms"], p["p90_ms"], p["p99_ms"], p["mean_ms"]) == (50.0, 90.0, 99.0, 50.0)
    # 10 samples: rank (n-1) q = 8.91 for p99 -> 9 + 0.91 * (100 - 9); p50 between the 5th and 6th
    p = percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 100])
    assert p["p99_ms"] == pytest.approx(9 + 0.91 * 91) and p["p50_ms"] == pytest.approx(5.5)
    assert p["p90_ms"] == pytest.approx(9 + 0.1 * 91) and p["mean_ms"] == pytest.approx(14.5)


def test_speedup_is_baseline_time_over_row_time():
    from zsad.bench.report import add_speedups

    rows = [{"backend": "torch-fp32", "batch": 1, "status": "ok", "p50_ms_per_image": 10.0},
            {"backend": "ort", "batch": 8, "status": "ok", "p50_ms_per_image": 2.5},
            {"backend": "torch-fp16", "batch": 1, "status": "skipped", "p50_ms_per_image": None}]
    add_speedups(rows)
    assert rows[0]["speedup_vs_torch_fp32_b1"] == 1.0
    assert rows[1]["speedup_vs_torch_fp32_b1"] == 4.0  # 4x faster per image
    assert "speedup_vs_torch_fp32_b1" not in rows[2]


# == BAG-CLIP's similarity rounding (2^-14) ========================================================================
def _rows_with_cosines(d, cosines):
    """Unit rows: e0 first, then one row per cosine to e0 (each in its own plane, so they are far apart)."""
    x = torch.zeros(1 + len(cosines), d, dtype=torch.float64)
    x[0, 0] = 1.0
    for i, c in enumerate(cosines, start=1):
        x[i, 0], x[i, i] = c, math.sqrt(1.0 - c * c)
    return x


def test_knn_rounds_similarities_to_2_pow_minus_14():
    from zsad.modules.graph import knn_adjacency

    # cos(0, 1) = 0.75 = 12288 / 2^14 exactly; cos(0, 2) = 0.75 + 2e-5 rounds to the same step (half step 3.05e-5);
    # cos(0, 3) = 0.75 + 4e-5 rounds up to 12289 / 2^14
    x = _rows_with_cosines(6, [0.75, 0.75 + 2e-5, -1.0])[None]
    assert knn_adjacency(x, 1, "binary", resolution_bits=0)[0, 0].nonzero().flatten().tolist() == [2]
    assert knn_adjacency(x, 1, "binary", resolution_bits=14)[0, 0].nonzero().flatten().tolist() == [1]  # tie: low idx
    x = _rows_with_cosines(6, [0.75, 0.75 + 4e-5, -1.0])[None]
    assert knn_adjacency(x, 1, "binary", resolution_bits=14)[0, 0].nonzero().flatten().tolist() == [2]
    w = knn_adjacency(x, 1, "relu_cos", resolution_bits=14)[0, 0, 2]
    assert float(w) == 12289 / 2 ** 14  # relu_cos weights are the rounded similarities


def test_bagclip_uses_its_2_pow_minus_14_resolution():
    import zsad.methods as M
    from zsad.modules.graph import knn_graph

    m = M.create("bagclip", "tiny", graph={"knn_k": 1, "safr": False})
    assert m.config.graph.sim_resolution_bits == 14
    n, d = m.backbone.info.grid ** 2, m.backbone.info.width
    fused = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.01
    rows = _rows_with_cosines(8, [0.75, 0.75 + 2e-5])
    # partners: 3 next to 1, 4 next to 2, so 1 and 2 do not pick 0 (the symmetrised graph would hide 0's choice)
    partners = rows[1:3] + 0.1 * torch.eye(8, dtype=torch.float64)[5:7]
    fused[:5] = 0.0
    fused[:5, :8] = torch.cat([rows, partners]).float() * 10.0
    fused = fused[None]
    taps = fused[:, None].expand(1, len(m.config.taps), n, d)  # safr off: F = the mean over the scales = fused
    with torch.no_grad():
        got = m.graph_features(taps)
        want = m.gcn(fused, knn_graph(fused, 1, "binary", "max", 14))
        raw = m.gcn(fused, knn_graph(fused, 1, "binary", "max", 0))
    assert torch.equal(got, want) and not torch.equal(got, raw)


# == dispatch really running the Triton interpreter on CPU ========================================================
def test_dispatch_runs_the_triton_kernel_when_selected(monkeypatch):
    """With the dispatch rule forced to Triton, the kNN graph runs the kernel in Triton's interpreter and must
    equal a from-scratch dense computation (not the module's reference)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (conftest sets it without a GPU)")
    from zsad.kernels import knn_graph as KG

    calls = []
    real = KG.knn_graph_triton
    monkeypatch.setattr(KG, "use_triton", lambda *t: True)
    monkeypatch.setattr(KG, "knn_graph_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(5))
    got = KG.dispatch(x, 3, "relu_cos", "max").double()
    assert calls, "dispatch did not take the Triton path"
    xn = x[0].double() / x[0].double().norm(dim=-1, keepdim=True)
    sim = (xn @ xn.T).numpy()
    np.fill_diagonal(sim, -np.inf)
    a = np.zeros((20, 20))
    for i in range(20):
        for j in np.argsort(-sim[i], kind="stable")[:3]:
            a[i, j] = max(sim[i, j], 0.0)
    a = np.maximum(a, a.T) + np.eye(20)
    d = 1.0 / np.sqrt(a.sum(1))
    np.testing.assert_allclose(got[0].numpy(), d[:, None] * a * d[None, :], rtol=1e-5, atol=1e-6)
    # negative similarities must rank in float order (-0.5 above -1): a hexagon, k = 4 of the 5 other vertices
    ang = torch.arange(6, dtype=torch.float32) * (math.pi / 3)
    hexagon = torch.stack([ang.cos(), ang.sin()], dim=-1)[None]
    idx, _ = KG.knn_topk_triton(hexagon, 4, block_m=16, block_n=16)
    for i in range(6):  # neighbours: i +- 1 (cos 0.5), i +- 2 (cos -0.5); never the opposite vertex (cos -1)
        assert sorted(idx[0, i].tolist()) == sorted((i + s) % 6 for s in (-2, -1, 1, 2))


# == training: learning-rate schedule, data order per epoch, atomic writes ========================================
def test_lr_factor_cosine_with_warmup_by_hand():
    from types import SimpleNamespace

    from zsad.train.loop import lr_factor

    cfg = SimpleNamespace(schedule="cosine", warmup=0.1)
    total = 20  # warm-up round(0.1 * 20) = 2 steps: 1/2, 2/2, then 0.5 (1 + cos(pi (s - 2) / 18))
    assert [lr_factor(cfg, s, total) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(cfg, 2, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 11, total) == pytest.approx(0.5)
    assert lr_factor(cfg, 8, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 18)))
    assert lr_factor(SimpleNamespace(schedule="constant", warmup=0.0), 7, total) == 1.0


def test_data_order_differs_per_epoch_and_repeats_per_seed():
    from zsad.train.loop import DistInfo, _epoch_loader

    ds = torch.utils.data.TensorDataset(torch.arange(16))

    def order(seed, epoch):
        return [int(v) for (b,) in _epoch_loader(ds, 4, seed, epoch, 0, DistInfo()) for v in b]

    assert order(3, 0) == order(3, 0) and sorted(order(3, 0)) == list(range(16))
    assert order(3, 0) != order(3, 1)  # a new order every epoch
    assert order(3, 1) != order(4, 1)


def test_atomic_write_survives_a_crash_inside_the_write(tmp_path):
    from zsad.checkpoint import atomic_write

    target = tmp_path / "state.bin"
    target.write_bytes(b"old complete contents")

    def half_then_crash(p):
        p.write_bytes(b"new but trunc")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old complete contents"
    assert [f.name for f in tmp_path.iterdir()] == ["state.bin"]  # the temp file is gone too
    atomic_write(target, lambda p: p.write_bytes(b"new"))
    assert target.read_bytes() == b"new"


# == post-processing radius and the relu_cos edge weights ===========================================================
@pytest.mark.parametrize("sigma", [1.9, 0.7, 4.0])
def test_gaussian_radius_rounds_like_scipy(sigma):
    """scipy's radius is int(4 sigma + 0.5): 8 for sigma 1.9 (7.6), 3 for 0.7 (2.8); integer sigmas hide a
    missing + 0.5."""
    from scipy.ndimage import gaussian_filter

    from zsad.postprocess import gaussian_blur, gaussian_radius

    assert gaussian_radius(sigma) == {1.9: 8, 0.7: 3, 4.0: 16}[sigma]
    x = np.random.default_rng(1).random((2, 23, 19))
    ref = np.stack([gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in x])
    np.testing.assert_allclose(gaussian_blur(torch.from_numpy(x), sigma).numpy(), ref, rtol=0, atol=1e-12)


def test_relu_cos_weights_clamp_negative_similarities():
    from zsad.modules.graph import knn_adjacency

    x = torch.tensor([[[1.0, 0.0], [-0.6, 0.8], [-0.6, -0.8], [0.8, 0.6]]], dtype=torch.float64)
    # cosines: 0-1 -0.6, 0-2 -0.6, 0-3 0.8, 1-2 -0.28, 1-3 0.0, 2-3 -0.96; k = 1 picks the largest (low index on ties)
    a = knn_adjacency(x, 1, "relu_cos")[0]
    want = torch.zeros(4, 4, dtype=torch.float64)
    want[0, 3] = 0.8  # 0 -> 3 (0.8); 1 -> 3 (0.0: clamped weight 0); 2 -> 1 (-0.28 -> 0); 3 -> 0 (0.8)
    want[3, 0] = 0.8
    torch.testing.assert_close(a, want, rtol=0, atol=1e-12)
    binary = knn_adjacency(x, 1, "binary")[0]
    assert binary.nonzero().tolist() == [[0, 3], [1, 3], [2, 1], [3, 0]]
