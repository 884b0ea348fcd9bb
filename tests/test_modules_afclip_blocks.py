"""AF-CLIP's building blocks against independent formulations: multi-scale aggregation (explicit neighbourhood
sums), the attention adaptor (per-head loop), its parameter count (arithmetic), the generalised prompt learner
(AF-CLIP's before-SOT shared context against open_clip's own text tower), the focal / L1 / patch-alignment losses
(explicit pair matrices) and the shared memory bank (brute-force nearest neighbour)."""
import math

import pytest
import torch
import torch.nn.functional as F

import zsad.methods as M
from zsad import ZsadError
from zsad.modules.adaptor import AttentionAdaptor
from zsad.modules.aggregation import MultiScaleAggregation, gaussian_kernel2d
from zsad.modules.losses import binary_focal_loss, patch_alignment_loss
from zsad.modules.memory_bank import MemoryBank


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- aggregation ------------------------------------------------------------------------------------------------
def test_gaussian_kernels_are_the_released_weights():
    """sigma 4: 3x3 weights 0.1158 / 0.1123 / 0.1088 (centre / edge / corner), 5x5 from 0.0452 to 0.0352."""
    k3, k5 = gaussian_kernel2d(3, 4.0), gaussian_kernel2d(5, 4.0)
    assert k3[1, 1].item() == pytest.approx(0.1158, abs=5e-5)
    assert k3[0, 1].item() == pytest.approx(0.1123, abs=5e-5)
    assert k3[0, 0].item() == pytest.approx(0.1088, abs=5e-5)
    assert k5[2, 2].item() == pytest.approx(0.0452, abs=5e-5) and k5[0, 0].item() == pytest.approx(0.0352, abs=5e-5)
    assert k3.sum().item() == pytest.approx(1.0) and k5.sum().item() == pytest.approx(1.0)
    with pytest.raises(ZsadError, match="odd"):
        gaussian_kernel2d(4, 4.0)


def _aggregate_by_hand(tokens, r, sigma, renormalize):
    """Explicit neighbourhood loop: out[p] = sum_{q in r x r window, inside the grid} w[q-p] x[q] (/ sum w)."""
    b, n_layers, t, d = tokens.shape
    g = int(math.isqrt(t - 1))
    grid = tokens[:, :, 1:].reshape(b, n_layers, g, g, d)
    half = r // 2
    x = torch.arange(r, dtype=torch.float64) - half
    w = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
    w = (w / w.sum()).float()
    out = torch.zeros_like(grid)
    for i in range(g):
        for j in range(g):
            acc, mass = 0, 0.0
            for di in range(-half, half + 1):
                for dj in range(-half, half + 1):
                    ii, jj = i + di, j + dj
                    if 0 <= ii < g and 0 <= jj < g:
                        acc = acc + w[di + half, dj + half] * grid[:, :, ii, jj]
                        mass += float(w[di + half, dj + half])
            out[:, :, i, j] = acc / mass if renormalize else acc
    return torch.cat([tokens[:, :, :1], out.reshape(b, n_layers, g * g, d)], dim=2)


@pytest.mark.parametrize("border", ["zero", "renormalize"])
def test_aggregation_against_explicit_neighbourhood_sums(border):
    tokens = torch.randn(2, 3, 1 + 7 * 7, 5, generator=_gen(1))
    agg = MultiScaleAggregation((1, 3, 5), sigma=4.0, border=border)
    out = agg(tokens)
    assert out.shape == (2, 3, 3, 50, 5)
    torch.testing.assert_close(out[:, :, 0], tokens)  # r = 1 is the identity
    for k, r in enumerate((1, 3, 5)):
        ref = _aggregate_by_hand(tokens, r, 4.0, border == "renormalize")
        torch.testing.assert_close(out[:, :, k], ref, rtol=1e-5, atol=1e-5)
    # the class token passes untouched at every scale
    assert all(torch.equal(out[:, :, k, 0], tokens[:, :, 0]) for k in range(3))


def test_aggregation_zero_border_attenuates_a_constant_map():
    tokens = torch.ones(1, 1, 1 + 6 * 6, 2)
    out = MultiScaleAggregation((3,), 4.0, "zero")(tokens)[0, 0, 0, 1:, 0].reshape(6, 6)
    assert out[2, 2].item() == pytest.approx(1.0, abs=1e-6) and out[0, 0].item() < 0.5
    assert torch.allclose(MultiScaleAggregation((3,), 4.0, "renormalize")(tokens), tokens.unsqueeze(2))
    with pytest.raises(ZsadError, match="border"):
        MultiScaleAggregation((3,), 4.0, "reflect")


# -- adaptor ----------------------------------------------------------------------------------------------------
def test_adaptor_against_a_per_head_loop():
    torch.manual_seed(0)
    ad = AttentionAdaptor(width=24, heads=3, head_dim=5).eval()
    x = torch.randn(2, 9, 24, generator=_gen(2))
    u = F.layer_norm(x, (24,), ad.norm.weight, ad.norm.bias)
    q, k, v = u @ ad.to_q.weight.t(), u @ ad.to_k.weight.t(), u @ ad.to_v.weight.t()
    heads = []
    for h in range(3):
        sl = slice(5 * h, 5 * h + 5)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(5), dim=-1)
        heads.append(a @ v[..., sl])
    ref = torch.cat(heads, dim=-1) @ ad.to_out.weight.t() + ad.to_out.bias
    torch.testing.assert_close(ad(x), ref, rtol=1e-5, atol=1e-5)  # no residual: the output replaces x


def test_adaptor_parameter_count_is_the_papers():
    """LN (2 D) + q/k/v (3 D x 512, no bias) + out (512 D + D) at D = 1024: 2,100,224; + 12 x 768 prompt."""
    d, inner = 1024, 8 * 64
    arithmetic = 2 * d + 3 * d * inner + inner * d + d
    assert arithmetic == 2_100_224
    assert sum(p.numel() for p in AttentionAdaptor(1024, 8, 64).parameters()) == arithmetic
    assert arithmetic + 12 * 768 == 2_109_440


# -- prompts ----------------------------------------------------------------------------------------------------
def test_before_sot_shared_prompts_against_open_clip():
    """Set the 12 shared vectors to token embeddings of real words: the learner's [V][SOT] text [EOT] sequence
    must equal the text tower run by hand over exactly those tokens (vectors before SOT, end token at 12 + its
    index), for both prompts."""
    m = M.create("afclip", "tiny")
    bb, p = m.backbone, m.prompts
    clip = bb.clip
    assert p.ctx.shape == (1, 12, 128) and p.placement == "before_sot"
    words = bb.tokenize(["a b c d e f g h i j k l"])[0, 1:13]  # 12 ordinary word tokens
    with torch.no_grad():
        p.ctx.copy_(bb.token_embeddings(words)[None])
        got = m.encode_text()
        rows = []
        for text in ("without defect.", "with defect."):
            t = bb.tokenize([text])[0]
            x = clip.token_embedding(torch.cat([words, t])[:77][None]) + clip.positional_embedding
            for blk in clip.transformer.resblocks:
                x = blk(x, attn_mask=clip.attn_mask)
            rows.append(clip.ln_final(x)[0, 12 + int(t.argmax())] @ clip.text_projection)
        ref = F.normalize(torch.stack(rows), dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# -- losses -----------------------------------------------------------------------------------------------------
def test_binary_focal_against_formula():
    p = torch.rand(3, 4, 4, generator=_gen(3))
    y = (torch.rand(3, 4, 4, generator=_gen(4)) > 0.5).float()
    eps = 1e-5
    pt = torch.where(y > 0, p * (1 - eps) + (1 - p) * eps, (1 - p) * (1 - eps) + p * eps) + eps
    torch.testing.assert_close(binary_focal_loss(p, y, gamma=4.0), (-(1 - pt) ** 4 * pt.log()).mean())
    # image level ([B] probabilities): BCE * (1 - p_t)^4 up to the 1e-5 smoothing
    pi, yi = torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0])
    ref = (-(0.1 ** 4) * math.log(0.9) - (0.2 ** 4) * math.log(0.8)) / 2
    assert binary_focal_loss(pi, yi, 4.0).item() == pytest.approx(ref, rel=1e-3)


def _pal_by_pair_matrix(z, mask):
    """AF-CLIP's formulation: sign matrix m_ij = (2M_i - 1)(2M_j - 1) per image, sim = z z^T, pooled means."""
    pos_sum = neg_sum = 0.0
    pos_n = neg_n = 0
    for b in range(z.shape[0]):
        s = 2 * mask[b] - 1
        sign = s[:, None] * s[None, :]
        sim = z[b] @ z[b].t()
        pos_sum, pos_n = pos_sum + sim[sign > 0].sum(), pos_n + int((sign > 0).sum())
        neg_sum, neg_n = neg_sum + sim[sign < 0].sum(), neg_n + int((sign < 0).sum())
    if neg_n == 0:
        return torch.tensor(0.0)
    return torch.clamp(neg_sum / neg_n - pos_sum / pos_n, min=0)


def test_patch_alignment_against_the_pair_matrix():
    z = F.normalize(torch.randn(3, 20, 6, generator=_gen(5)), dim=-1)
    mask = (torch.rand(3, 20, generator=_gen(6)) > 0.7).float()
    mask[2] = 0  # an all-normal image only contributes same-label pairs
    torch.testing.assert_close(patch_alignment_loss(z, mask), _pal_by_pair_matrix(z, mask))
    # all patches identical: mixed and same-label pairs are equally similar -> exactly 0; two clusters of
    # anomalous / normal patches that point apart -> clamped to 0 as well; mixed-up clusters -> positive
    same = F.normalize(torch.ones(1, 6, 3), dim=-1)
    m2 = torch.tensor([[1.0, 1, 0, 0, 0, 0]])
    assert patch_alignment_loss(same, m2).item() == pytest.approx(0.0, abs=1e-6)
    a, n = F.normalize(torch.tensor([1.0, -1.0, 0.0]), dim=0), F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    apart = torch.stack([a, a, n, n, n, n])[None]
    assert patch_alignment_loss(apart, m2).item() == 0.0
    mixed = torch.stack([a, n, a, n, a, n])[None]
    torch.testing.assert_close(patch_alignment_loss(mixed, m2), _pal_by_pair_matrix(mixed, m2))
    assert patch_alignment_loss(mixed, m2).item() > 0
    assert patch_alignment_loss(z, torch.zeros(3, 20)).item() == 0.0  # no mixed pair at all
    assert patch_alignment_loss(z, torch.ones(3, 20)).item() == 0.0


# -- memory bank ------------------------------------------------------------------------------------------------
def test_memory_bank_against_brute_force():
    feats = torch.randn(3, 2, 10, 8, generator=_gen(8))  # K=3 images, 2 levels, 10 patches, width 8
    query = torch.randn(4, 2, 10, 8, generator=_gen(9))
    bank = MemoryBank(feats)
    assert bank.bank.shape == (2, 30, 8) and bank.rows == 30
    ref = torch.empty(4, 2, 10)
    for b in range(4):
        for level in range(2):
            for i in range(10):
                best = max(F.cosine_similarity(query[b, level, i], feats[k, level, j], dim=0).item()
                           for k in range(3) for j in range(10))
                ref[b, level, i] = 1 - best
    torch.testing.assert_close(bank(query), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(MemoryBank(feats, chunk=7)(query), ref, rtol=1e-5, atol=1e-5)
    # a query that is in the bank has distance 0
    assert bank(feats[1:2]).abs().max() < 1e-5
    with pytest.raises(ZsadError, match="levels"):
        bank(torch.randn(1, 3, 10, 8))
