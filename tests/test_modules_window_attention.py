"""SOWA's FWA adapter against independent formulations: window partition by explicit indexing, the V-V cosine
window attention against a naive loop over windows and heads, the Swin-V2 coordinate table and index against
their formulas, the folded position bias against the MLP, and the trainable-parameter count by arithmetic."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError
from zsad.kernels.window_attention import window_partition, window_reverse
from zsad.modules.window_attention import (
    ContinuousPositionBias,
    FrozenWindowAdapter,
    relative_coords_table,
    relative_position_index,
    window_vv_attention,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_window_partition_by_explicit_indexing():
    grid, window, d = 6, 3, 4
    x = torch.randn(2, grid * grid, d, generator=_gen(0))
    w = window_partition(x, (grid, grid), window)
    assert w.shape == (2 * 4, 9, d)
    for b in range(2):
        for wi in range(2):
            for wj in range(2):
                k = b * 4 + wi * 2 + wj  # windows row-major over the window grid, per image
                for ti in range(window):
                    for tj in range(window):
                        row, col = wi * window + ti, wj * window + tj
                        assert torch.equal(w[k, ti * window + tj], x[b, row * grid + col])
    assert torch.equal(window_reverse(w, (grid, grid), window), x)


def _naive_window_attention(x, v_w, v_b, o_w, o_b, scale, bias, grid, window):
    """Loop over images, windows and heads; gather each window's tokens by their (row, col) positions."""
    b, n, d = x.shape
    heads = scale.shape[0]
    hd = d // heads
    out = torch.zeros_like(x)
    v_all = x @ v_w.t() + (v_b if v_b is not None else 0)
    for img in range(b):
        for r0 in range(0, grid, window):
            for c0 in range(0, grid, window):
                idx = [(r0 + i) * grid + (c0 + j) for i in range(window) for j in range(window)]
                v = v_all[img, idx]  # [T, D]
                head_out = []
                for h in range(heads):
                    vh = v[:, h * hd:(h + 1) * hd]
                    vn = vh / vh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    logits = vn @ vn.t() * scale[h] + bias[h]
                    head_out.append(torch.softmax(logits, dim=-1) @ vh)
                out[img, idx] = torch.cat(head_out, dim=-1) @ o_w.t() + o_b
    return out


@pytest.mark.parametrize("with_bias", [False, True])
def test_window_vv_attention_against_a_naive_loop(with_bias):
    grid, window, d, heads = 8, 4, 12, 3
    t = window * window
    g = _gen(1)
    x = torch.randn(2, grid * grid, d, generator=g)
    v_w, o_w = torch.randn(d, d, generator=g) / 3, torch.randn(d, d, generator=g) / 3
    v_b = torch.randn(d, generator=g) if with_bias else None
    o_b = torch.randn(d, generator=g)
    scale = torch.tensor([10.0, 3.0, 50.0])
    bias = 16 * torch.sigmoid(torch.randn(heads, t, t, generator=g))
    got = window_vv_attention(x, v_w, v_b, o_w, o_b, scale, bias, grid, window)
    ref = _naive_window_attention(x, v_w, v_b, o_w, o_b, scale, bias, grid, window)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ZsadError, match="does not divide"):
        window_vv_attention(x, v_w, v_b, o_w, o_b, scale, torch.zeros(heads, 9, 9), grid, 3)


def test_relative_coordinate_table_and_index_against_formulas():
    w = 4
    table = relative_coords_table(w)
    assert table.shape == ((2 * w - 1) ** 2, 2)
    for k, (dy, dx) in enumerate((dy, dx) for dy in range(-(w - 1), w) for dx in range(-(w - 1), w)):
        for c, val in enumerate((dy, dx)):
            v = 8 * val / (w - 1)
            expect = math.copysign(math.log2(abs(v) + 1) / 3.0, v) if v else 0.0
            assert table[k, c].item() == pytest.approx(expect, abs=1e-6)
    index = relative_position_index(w)
    assert index.shape == (w * w, w * w)
    for q in range(w * w):
        for k in range(w * w):
            dy, dx = q // w - k // w, q % w - k % w
            assert index[q, k].item() == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)


def test_continuous_position_bias_against_the_mlp_per_pair():
    torch.manual_seed(0)
    w, heads = 3, 4
    cpb = ContinuousPositionBias(w, heads, hidden=16)
    bias = cpb()
    assert bias.shape == (heads, w * w, w * w)
    lin1, lin2 = cpb.mlp[0], cpb.mlp[2]
    for q in range(w * w):
        for k in range(w * w):
            dy, dx = q // w - k // w, q % w - k % w
            c = torch.tensor([dy, dx], dtype=torch.float32) * 8 / (w - 1)
            c = torch.sign(c) * torch.log2(c.abs() + 1) / 3.0
            h = F.relu(c @ lin1.weight.t() + lin1.bias) @ lin2.weight.t()
            torch.testing.assert_close(bias[:, q, k], 16 * torch.sigmoid(h), rtol=1e-5, atol=1e-6)


def _adapter(width=16, grid=6, window=3, heads=4, seed=0):
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(width, 2, batch_first=True)
    return FrozenWindowAdapter(attn, grid, window, heads, cpb_hidden=8, attn_drop=0.1)


def test_adapter_forward_is_post_norm_residual_around_the_reference():
    ad = _adapter().eval()
    x = torch.randn(2, 36, 16, generator=_gen(3))
    a = ad.frozen_attn
    scale = torch.exp(ad.logit_scale.clamp(max=math.log(100)))
    y = _naive_window_attention(x, a.in_proj_weight[32:], None, a.out_proj.weight, a.out_proj.bias, scale, ad.cpb(),
                                6, 3)
    x1 = x + F.layer_norm(y, (16,), ad.norm1.weight, ad.norm1.bias)
    ref = x1 + F.layer_norm(x1 @ ad.linear.weight.t(), (16,), ad.norm2.weight, ad.norm2.bias)
    torch.testing.assert_close(ad(x), ref, rtol=1e-4, atol=1e-5)
    # the borrowed CLIP weights stay frozen; theta starts at ln 10, and is clamped at ln 100
    assert not any(p.requires_grad for p in a.parameters())
    torch.testing.assert_close(ad.logit_scale, torch.full((4,), math.log(10.0)))
    with torch.no_grad():
        ad.logit_scale.fill_(10.0)
    torch.testing.assert_close(ad.position_terms()[0], torch.full((4,), 100.0))


def test_folded_position_terms_equal_the_unfolded_adapter():
    ad = _adapter(seed=4).eval()
    with torch.no_grad():
        ad.logit_scale.copy_(torch.tensor([0.5, 1.0, 2.0, 5.0]))
    x = torch.randn(3, 36, 16, generator=_gen(5))
    with torch.no_grad():
        scale, bias = ad.position_terms()
        folded = ad(x, scale.clone(), bias.clone())
    torch.testing.assert_close(folded, ad(x), rtol=0, atol=0)
    assert bias.shape == (4, 9, 9)


def test_adapter_trainable_parameter_count_by_arithmetic():
    """theta (H) + CPB (2*64 + 64 + 64*H) + LN1 + LN2 (4 D) + W_a (D^2), at D 1024, H 8: 1,053,384 per adapter;
    x4 + the two 12 x 768 prompt contexts + the 768 x 768 (+ bias) text fusion = SOWA's 4,822,560."""
    d, heads, hidden = 1024, 8, 64
    per = heads + (2 * hidden + hidden + hidden * heads) + 4 * d + d * d
    assert per == 1_053_384
    attn = nn.MultiheadAttention(d, 16, batch_first=True)
    ad = FrozenWindowAdapter(attn, grid=24, window=12, heads=heads, cpb_hidden=hidden)
    assert sum(p.numel() for p in ad.parameters() if p.requires_grad) == per
    assert 4 * per + 2 * 12 * 768 + (768 * 768 + 768) == 4_822_560


def test_adapter_errors():
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    with pytest.raises(ZsadError, match="does not divide the 7x7"):
        FrozenWindowAdapter(attn, 7, 3, 4)
    with pytest.raises(ZsadError, match="heads 5"):
        FrozenWindowAdapter(attn, 6, 3, 5)
