"""Stages against a reference written from the methods' formulas (not forward == run_stages(stages())).

AnomalyCLIP: p_l = softmax(cos(ln_post(tap_l) proj, t) / T); map = Gaussian(upsample(sum_l p_l[abnormal]));
score = softmax(cos(g, t) / T)[abnormal]. BAG-CLIP adds H = LN(F + GELU(Â F W + b)) over the kNN graph of the
SAFR output (Â built here in numpy, 2^-14 rounding, binary edges, max-symmetrised) and Z_l = ln_post(D_l + γ H) proj.
The Gaussian is scipy's; the backbone's taps are checked against open_clip in tests/test_backbone.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

import zsad.methods as M
from zsad.methods.stages import run_stages


def _adjacency_np(f, k, bits):
    """Normalised kNN adjacency of one image's features [N, D], from the definition (float64)."""
    x = f / np.linalg.norm(f, axis=-1, keepdims=True)
    sim = np.round((x @ x.T) * 2.0 ** bits) / 2.0 ** bits
    np.fill_diagonal(sim, -np.inf)
    n = len(x)
    a = np.zeros((n, n))
    for i in range(n):
        a[i, np.argsort(-sim[i], kind="stable")[:k]] = 1.0
    a = np.maximum(a, a.T) + np.eye(n)
    d = 1.0 / np.sqrt(a.sum(1))
    return d[:, None] * a * d[None, :]


def _reference(m, images, graph=False):
    c, v = m.config, m.backbone.visual
    with torch.no_grad():
        g, taps = m.backbone.forward_taps(images, c.taps, mode=c.attention, start=c.dual_start,
                                          global_ln_post=c.global_ln_post)
        text = m.text_embeddings()
        if graph:
            fused = m.safr(taps)
            adj = torch.from_numpy(np.stack([_adjacency_np(f.double().numpy(), c.graph.knn_k,
                                                           c.graph.sim_resolution_bits) for f in fused]))
            layer = m.gcn.layers[0]
            h = layer.norm(fused + F.gelu(layer.linear(adj.float() @ fused)))
            taps = taps + m.jff_gamma * h[:, None]
        z = v.ln_post(taps) @ v.proj  # [B, L, N, E]
        t = F.normalize(text, dim=-1)
        prob = (F.normalize(g, dim=-1) @ t.T / c.temperature).softmax(-1)[:, 1]
        p = (F.normalize(z, dim=-1) @ t.T / c.temperature).softmax(-1)[..., 1].sum(1)  # [B, N]
        side = m.backbone.info.grid
        up = F.interpolate(p.reshape(-1, 1, side, side), size=m.image_size, mode="bilinear",
                           align_corners=c.align_corners)[:, 0]
    amap = np.stack([gaussian_filter(u, c.sigma, mode="reflect", truncate=4.0) for u in up.double().numpy()])
    return prob.numpy(), amap


@pytest.mark.parametrize("name", ["anomalyclip", "bagclip"])
def test_stages_match_the_formulas(name):
    m = M.create(name, "tiny").eval()
    if name == "bagclip":
        with torch.no_grad():
            m.jff_gamma.fill_(0.7)  # a visible graph contribution
    assert m.config.score_map_weight == 0.0
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prob, amap = _reference(m, images, graph=name == "bagclip")
    with torch.no_grad():
        env = run_stages(m.stages(), images=images)
    assert [s.name for s in m.stages()] == ["encoder", *(["graph"] if name == "bagclip" else []), "head",
                                            "postprocess"]
    if name == "bagclip":  # the graph stage's neighbours: each row's k best by the definition (rounded, stable)
        fused = env["fused"][0].double().numpy()
        x = fused / np.linalg.norm(fused, axis=-1, keepdims=True)
        sim = np.round((x @ x.T) * 2.0 ** 14) / 2.0 ** 14
        np.fill_diagonal(sim, -np.inf)
        want = np.sort(np.argsort(-sim, axis=1, kind="stable")[:, :8], axis=1)
        np.testing.assert_array_equal(np.sort(env["knn_index"][0].numpy(), axis=1), want)
    np.testing.assert_allclose(env["score"].numpy(), prob, rtol=0, atol=1e-5)
    scale = np.abs(amap).max()
    assert np.abs(env["anomaly_map"].numpy() - amap).max() <= 1e-5 * scale
    assert amap.std() > 1e-3 * scale  # a map with structure, not a constant
