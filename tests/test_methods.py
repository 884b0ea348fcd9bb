"""Methods: registry and configs, prompts against open_clip's text tower, stages, forward against an independent
AnomalyCLIP reference, losses and gradients."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_images
from scipy.ndimage import gaussian_filter

import zsad.methods as M
from zsad import ZsadError
from zsad.methods import run_stages
from zsad.methods.anomalyclip import AnomalyClip
from zsad.modules.graph import knn_graph
from zsad.modules.losses import dice_loss, focal_loss

# AnomalyCLIP and the registered methods built on it (BAG-CLIP): the tests below check their shared structure
ANOMALYCLIP_FAMILY = [n for n in M.available() if issubclass(M.METHODS[n], AnomalyClip)]


# -- registry / configs -----------------------------------------------------------------------------------------
def test_registry_and_config_errors():
    assert {"anomalyclip", "bagclip", "afclip", "sowa"} <= set(M.available()) and M.available() == sorted(M.METHODS)
    with pytest.raises(ZsadError, match="unknown method 'patchcore'"):
        M.create("patchcore", "tiny")
    with pytest.raises(ZsadError, match="unknown profile 'huge'"):
        M.create("bagclip", "huge")
    with pytest.raises(ZsadError, match=r"unknown key\(s\) \['knn'\]"):
        M.resolve_config("bagclip", "tiny", graph={"knn": 4})
    with pytest.raises(ZsadError, match="edge_weight"):
        M.resolve_config("bagclip", "tiny", graph={"edge_weight": "heavy"})


def test_profiles_are_the_published_settings():
    a = M.resolve_config("anomalyclip", "paper")
    assert a.taps == [6, 12, 18, 24] and a.dual_start == 6 and a.attention == "dual"
    assert a.global_ln_post is False  # AnomalyCLIP's released global feature
    assert (a.prompt.n_ctx, a.prompt.deep_length, a.prompt.deep_depth) == (12, 4, 9)
    assert (a.train.lr, a.train.betas, a.train.epochs, a.train.batch_size, a.train.seed) \
        == (1e-3, [0.5, 0.999], 15, 8, 111)
    assert a.loss.seg_weight == 4.0 and a.temperature == 0.07 and a.sigma == 4.0
    b = M.resolve_config("bagclip", "paper")
    g = b.graph
    assert (g.knn_k, g.edge_weight, g.symmetrize, g.gcn_layers, g.safr_reduction, g.jff_gamma_init) == \
        (8, "binary", "max", 1, 16, 0.1)
    assert b.global_ln_post is True
    t = M.resolve_config("bagclip", "tiny", graph={"knn_k": 4})
    assert t.backbone.arch == "zsad-tiny" and t.graph.knn_k == 4 and t.graph.edge_weight == "binary"


def test_creation_is_deterministic():
    a, b = M.create("bagclip", "tiny"), M.create("bagclip", "tiny")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    c = M.create("bagclip", "tiny", backbone={"init_seed": 1})
    assert not torch.equal(a.backbone.visual.conv1.weight, c.backbone.visual.conv1.weight)


# -- prompts ----------------------------------------------------------------------------------------------------
def test_prompted_text_equals_open_clip_when_context_is_the_placeholder_tokens():
    m = M.create("anomalyclip", "tiny", prompt={"deep_depth": 1})
    bb = m.backbone
    tokens = bb.tokenize(["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."])
    with torch.no_grad():
        m.prompts.ctx.copy_(bb.token_embeddings(tokens)[:, 1:13])
        ref = F.normalize(bb.clip.encode_text(tokens), dim=-1)
        got = m.text_embeddings()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_deep_prompts_overwrite_positions_at_later_blocks():
    m = M.create("anomalyclip", "tiny")  # deep_depth 3: blocks 2 and 3 get learnable tokens
    bb, p = m.backbone, m.prompts
    clip = bb.clip
    with torch.no_grad():
        x = torch.cat([p.prefix, p.ctx, p.suffix], 1) + clip.positional_embedding
        for i, blk in enumerate(clip.transformer.resblocks):
            if i in (1, 2):
                x = x.clone()
                x[:, 1:5] = p.deep[i - 1]
            x = blk(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)[torch.arange(2), p.eot_index] @ clip.text_projection
        torch.testing.assert_close(m.text_embeddings(), F.normalize(x, dim=-1), rtol=1e-5, atol=1e-6)
    assert len(p.deep) == 2 and p.ctx.shape == (2, 12, 128)


# -- stages and forward -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ANOMALYCLIP_FAMILY)
def test_stages_in_sequence_equal_forward(tiny_method, name):
    m = tiny_method(name)
    stages = m.stages()
    # BAG-CLIP's kNN selection is a stage output of its own (zsad.selection), between SAFR and the GCN
    assert [s.name for s in stages] == ["encoder", *(["graph"] if name == "bagclip" else []), "head", "postprocess"]
    x = random_images(3)
    with torch.no_grad():
        out = m(x)
        env = {"images": x}
        for st in stages:  # by hand, checking every declared name and shape on the way
            res = st.module(*[env[n] for n in st.inputs])
            for (oname, shape), t in zip(st.outputs.items(), res, strict=True):
                assert tuple(t.shape) == tuple(3 if d == "B" else d for d in shape), (st.name, oname)
                env[oname] = t
    assert torch.equal(env["score"], out.score) and torch.equal(env["anomaly_map"], out.anomaly_map)
    assert out.score.shape == (3,) and out.anomaly_map.shape == (3, 224, 224)
    assert stages[0].dynamic_axes()["images"] == {0: "batch"}


def test_run_stages_reports_a_broken_chain(tiny_method):
    stages = tiny_method("anomalyclip").stages()
    with pytest.raises(ZsadError, match=r"stage 'postprocess' needs \['image_prob', 'patch_map'\]"):
        run_stages([stages[0], stages[2]], images=random_images(1))


def test_anomalyclip_forward_against_independent_reference(tiny_method):
    """Recompute AnomalyCLIP's map and score from the backbone with plain torch/scipy (the paper's recipe)."""
    m = tiny_method("anomalyclip")
    x = random_images(2, seed=5)
    with torch.no_grad():
        out = m(x)
        t = m.text_embeddings()
        bb = m.backbone
        glob, taps = bb.forward_taps(x, [1, 2, 3, 4], mode="dual", start=2, global_ln_post=False)
        g = glob / glob.norm(dim=-1, keepdim=True)
        score = torch.softmax(g @ t.t() / 0.07, dim=-1)[:, 1]
        total = 0
        for i in range(4):
            z = bb.visual.ln_post(taps[:, i]) @ bb.visual.proj
            z = z / z.norm(dim=-1, keepdim=True)
            p = torch.softmax(z @ t.t() / 0.07, dim=-1).reshape(2, 14, 14, 2).permute(0, 3, 1, 2)
            total = total + F.interpolate(p, size=(224, 224), mode="bilinear", align_corners=False)[:, 1]
    ref = np.stack([gaussian_filter(a, 4.0) for a in total.numpy().astype(np.float64)])
    torch.testing.assert_close(out.score, score, rtol=1e-5, atol=1e-6)
    assert np.abs(out.anomaly_map.numpy() - ref).max() < 1e-4


def test_bagclip_head_uses_the_graph(tiny_method):
    m = tiny_method("bagclip")
    x = random_images(2, seed=7)
    with torch.no_grad():
        base = m(x).anomaly_map
        gamma = m.jff_gamma.item()
        m.jff_gamma.fill_(0.0)  # JFF off: BAG-CLIP's map becomes AnomalyCLIP's on the same taps
        off = m(x).anomaly_map
        m.jff_gamma.fill_(gamma)
        glob, taps = m.encode(x)
        t = m.text_embeddings()
        z = m.backbone.project_tokens(taps)
        ref = m.postprocess(torch.zeros(2), m.layer_probs(z, t)[:, :, 1].sum(1))[1]
    torch.testing.assert_close(off, ref)
    assert (base - off).abs().max() > 1e-4


# -- BAG-CLIP ablation switches (graph.sag / graph.safr / graph.jff) ----------------------------------------------
def _bagclip_map(m, z):
    """AnomalyCLIP's map from projected patch features z (the shared text alignment and postprocess)."""
    return m.postprocess(torch.zeros(z.shape[0]), m.layer_probs(z, m.text_embeddings())[:, :, 1].sum(1))[1]


def test_bagclip_sag_and_safr_off(monkeypatch):
    import zsad.methods.bagclip as bag_module

    x = random_images(2, seed=3)
    both_off = M.create("bagclip", "tiny", graph={"sag": False, "safr": False}).eval()
    assert both_off.gcn is None and both_off.safr is None
    assert not any(k.startswith(("gcn.", "safr.")) for k in both_off.trainable_state_dict())

    def no_graph(*args, **kwargs):
        raise AssertionError("SAG off must not build a kNN graph")

    monkeypatch.setattr(bag_module, "knn_select", no_graph)
    monkeypatch.setattr(bag_module, "graph_from_index", no_graph)
    with torch.no_grad():
        out = both_off(x).anomaly_map
        _, taps = both_off.encode(x)
        # neither module: H = the plain mean of the scales, Z_l = ln_post(D_l + gamma mean_l D_l) @ proj
        ref = _bagclip_map(both_off, both_off.backbone.project_tokens(taps + 0.1 * taps.mean(dim=1, keepdim=True)))
    torch.testing.assert_close(out, ref)
    sag_off = M.create("bagclip", "tiny", graph={"sag": False}).eval()
    with torch.no_grad():
        _, taps = sag_off.encode(x)
        ref = _bagclip_map(sag_off, sag_off.backbone.project_tokens(taps + 0.1 * sag_off.safr(taps).unsqueeze(1)))
        torch.testing.assert_close(sag_off(x).anomaly_map, ref)
    monkeypatch.undo()

    safr_off = M.create("bagclip", "tiny", graph={"safr": False}).eval()
    with torch.no_grad():
        _, taps = safr_off.encode(x)
        mean = taps.mean(dim=1)
        h = safr_off.gcn(mean, knn_graph(mean, 8, "binary", "max", 14))
        ref = _bagclip_map(safr_off, safr_off.backbone.project_tokens(taps + 0.1 * h.unsqueeze(1)))
        torch.testing.assert_close(safr_off(x).anomaly_map, ref)
    with pytest.raises(ZsadError, match="graph.jff"):
        M.create("bagclip", "tiny", graph={"jff": "sum"})


def test_bagclip_jff_concat_variant():
    m = M.create("bagclip", "tiny", graph={"jff": "concat"}).eval()
    d = m.backbone.info.width
    w = m.jff_linear.weight
    assert w.shape == (d, 2 * d) and not hasattr(m, "jff_gamma")
    torch.testing.assert_close(w, torch.cat([torch.eye(d), 0.1 * torch.eye(d)], dim=1))  # starts as the add variant
    x = random_images(2, seed=4)
    with torch.no_grad():
        m.jff_linear.weight.add_(0.01 * torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(0)))
        m.jff_linear.bias.normal_(0, 0.01)
        _, taps = m.encode(x)
        h = m.graph_features(taps).unsqueeze(1)
        w, b = m.jff_linear.weight, m.jff_linear.bias
        mixed = taps @ w[:, :d].T + h @ w[:, d:].T + b  # W [D_l ; H] + b written out
        torch.testing.assert_close(m(x).anomaly_map, _bagclip_map(m, m.backbone.project_tokens(mixed)))
        env = run_stages(m.stages(), images=x)  # the export plan carries the variant
        assert torch.equal(env["anomaly_map"], m(x).anomaly_map)
    m.train()
    batch = {"image": random_images(2), "label": torch.tensor([0, 1]),
             "mask": (torch.rand(2, 224, 224, generator=torch.Generator().manual_seed(0)) > 0.9).float()}
    m.loss(batch)["total"].backward()
    assert m.jff_linear.weight.grad.abs().sum() > 0


# -- losses -----------------------------------------------------------------------------------------------------
def test_focal_and_dice_against_formulas():
    torch.manual_seed(0)
    p1 = torch.rand(2, 5, 5)
    probs = torch.stack([1 - p1, p1], dim=1)
    gt = (torch.rand(2, 5, 5) > 0.6).float()
    eps = 1e-5
    pt = torch.where(gt > 0, p1 * (1 - eps) + (1 - p1) * eps, (1 - p1) * (1 - eps) + p1 * eps) + eps
    torch.testing.assert_close(focal_loss(probs, gt), (-(1 - pt) ** 2 * pt.log()).mean())
    inter = (p1 * gt).flatten(1).sum(1)
    ref = 1 - ((2 * inter + 1) / (p1.flatten(1).sum(1) + gt.flatten(1).sum(1) + 1)).mean()
    torch.testing.assert_close(dice_loss(p1, gt), ref)


@pytest.mark.parametrize("name", ANOMALYCLIP_FAMILY)
def test_loss_trains_only_the_trainable_parts(name):
    m = M.create(name, "tiny").train()
    batch = {"image": random_images(2), "label": torch.tensor([0, 1]),
             "mask": (torch.rand(2, 224, 224, generator=torch.Generator().manual_seed(0)) > 0.9).float()}
    losses = m.loss(batch)
    assert set(losses) >= {"total", "image_ce", "focal", "dice"}
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    trainable = m.trainable_parameters()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in m.backbone.parameters())
    expected = {"prompts.ctx", "prompts.deep.0", "prompts.deep.1"}
    if name == "bagclip":
        assert {"jff_gamma", "gcn.layers.0.linear.weight", "safr.weights.weight"} <= set(trainable)
    assert expected <= set(trainable)


def test_trainable_state_round_trip(tiny_method):
    m = M.create("bagclip", "tiny")
    state = {k: torch.randn_like(v) for k, v in m.trainable_state_dict().items()}
    m.load_trainable_state_dict(state)
    assert all(torch.equal(m.trainable_parameters()[k], v) for k, v in state.items())
    with pytest.raises(ZsadError, match="does not fit"):
        m.load_trainable_state_dict({k: v for k, v in list(state.items())[1:]})


@pytest.mark.slow
def test_paper_profile_builds_at_real_size():
    """ViT-L-14-336 at 518 px with random weights: shapes, and the trainable budgets of both methods."""
    m = M.create("bagclip", "paper", backbone={"pretrained": None})
    info = m.backbone.info
    assert (info.grid, info.width, info.layers, info.embed_dim, info.quick_gelu) == (37, 1024, 24, 768, True)
    counts = {k.split(".")[0]: 0 for k in m.trainable_parameters()}
    for k, p in m.trainable_parameters().items():
        counts[k.split(".")[0]] += p.numel()
    assert counts["prompts"] == 2 * 12 * 768 + 8 * 4 * 768 == 43_008
    assert counts["gcn"] == 1_051_648
    assert counts["safr"] == 4 * (1024 * 64 + 64 + 64 * 1024 + 1024) + 4 * (1024 * 16 + 16) + (64 * 4 + 4)
    stages = m.stages()
    assert stages[0].outputs["taps"] == ("B", 4, 1369, 1024)
    with torch.no_grad():
        out = m(torch.randn(1, 3, 518, 518))
    assert out.anomaly_map.shape == (1, 518, 518) and torch.isfinite(out.anomaly_map).all()


@pytest.mark.parametrize("name", M.available())
def test_trainable_init_comes_from_the_profile_seed(name):
    """Trainable modules are initialised from train.seed (the paper's seed, set before the model is built as in the
    released train scripts); the random CLIP weights come from backbone.init_seed and do not move with it."""
    import zsad.methods as M

    def build(seed):
        m = M.create(name, "tiny", train={"seed": seed})
        return m.trainable_state_dict(), m.backbone.clip.visual.conv1.weight.detach().clone()

    seed = M.resolve_config(name, "tiny").train.seed
    a, clip_a = build(seed)
    b, _ = build(seed)
    c, clip_c = build(seed + 1)
    assert a.keys() == b.keys() == c.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_init = [k for k in a if not torch.equal(a[k], c[k])]
    assert random_init, "a different seed must give different initial weights"
    assert torch.equal(clip_a, clip_c)
