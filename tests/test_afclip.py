"""AF-CLIP / AF-CLIP+: profiles, the paper's trainable budget, stages, forward and few-shot against an independent
re-computation from open_clip's own intermediates, the loss, and learning on the synthetic set."""
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_images
from scipy.ndimage import gaussian_filter

import zsad.methods as M
from zsad import ZsadError
from zsad.data import AnomalyDataset, load_samples
from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, SYNTHETIC_TRAIN_CLASSES
from zsad.evaluate import evaluate
from zsad.methods.afclip import AfClip
from zsad.train.loop import train


# -- profiles and budget ----------------------------------------------------------------------------------------
def test_profiles_are_the_released_settings():
    c = M.resolve_config("afclip", "paper")
    assert "afclip" in M.available()
    assert c.backbone.arch == "ViT-L-14-336" and c.backbone.image_size == 518 and c.backbone.quick_gelu is True
    assert c.taps == [6, 12, 18, 24] and c.temperature == 0.07 and c.sigma == 4.0 and c.align_corners is False
    p = c.prompt
    assert (p.n_ctx, p.shared_context, p.placement, p.init_std) == (12, True, "before_sot", 0.01)
    assert (c.adaptor.heads, c.adaptor.head_dim, c.adaptor.dropout) == (8, 64, 0.0)
    assert (c.aggregation.kernel_sizes, c.aggregation.sigma, c.aggregation.border) == ([1, 3, 5], 4.0, "zero")
    assert (c.loss.focal_gamma, c.loss.seg_weight, c.loss.pal_weight) == (4.0, 1.0, 1.0)
    assert (c.few_shot.image_weight, c.few_shot.map_weight) == (0.1, 0.1)
    t = c.train
    assert (t.optimizer, t.lr, t.betas, t.weight_decay, t.epochs, t.batch_size, t.seed) == \
        ("adam", 1e-4, [0.5, 0.999], 0.0, 2, 8, 122)
    tiny = M.resolve_config("afclip", "tiny")
    assert tiny.backbone.arch == "zsad-tiny" and tiny.taps == [1, 2, 3, 4]
    with pytest.raises(ZsadError, match="border"):
        M.resolve_config("afclip", "tiny", aggregation={"border": "reflect"})
    with pytest.raises(ZsadError, match="kernel_sizes"):
        M.resolve_config("afclip", "tiny", aggregation={"kernel_sizes": [2]})
    with pytest.raises(ZsadError, match=r"unknown key\(s\) \['alpha'\]"):
        M.resolve_config("afclip", "tiny", few_shot={"alpha": 0.2})


def test_trainable_budget_is_the_papers_2109440(tiny_method):
    """Paper profile without building ViT-L: adaptor at width 1024 (8 x 64) + 12 x 768 shared prompt vectors."""
    budget = AfClip.trainable_budget(M.resolve_config("afclip", "paper"))
    d, inner = 1024, 8 * 64
    assert budget == {"adaptor": 2 * d + 3 * d * inner + inner * d + d, "prompts": 12 * 768}
    assert sum(budget.values()) == 2_109_440
    # the same function describes the model that is actually built (tiny: width 128, 4 x 32 heads)
    m = tiny_method("afclip")
    built = m.trainable_parameters()
    assert sum(AfClip.trainable_budget(m.config).values()) == sum(p.numel() for p in built.values())
    assert set(k.split(".")[0] for k in built) == {"prompts", "adaptor"}


def test_backbone_is_stock_quickgelu(tiny_method):
    from zsad._compat import import_open_clip

    open_clip = import_open_clip()
    m = tiny_method("afclip")
    assert m.backbone.info.quick_gelu
    assert isinstance(m.backbone.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


# -- stages and forward -------------------------------------------------------------------------------------------
def _run_by_hand(stages, x):
    env = {"images": x}
    for st in stages:
        res = st.module(*[env[n] for n in st.inputs])
        res = res if isinstance(res, tuple) else (res,)
        assert len(res) == len(st.outputs), st.name
        for (name, shape), t in zip(st.outputs.items(), res, strict=True):
            assert tuple(t.shape) == tuple(x.shape[0] if d == "B" else d for d in shape), (st.name, name)
            env[name] = t
    return env


def test_stages_in_sequence_equal_forward(tiny_method):
    m = tiny_method("afclip")
    stages = m.stages()
    assert [s.name for s in stages] == ["encoder", "head", "postprocess"]
    assert stages[0].outputs == {"tokens": ("B", 4, 197, 128)}
    assert isinstance(stages[1].module.text, torch.Tensor) and stages[1].module.text.shape == (2, 128)
    assert "text" in dict(stages[1].module.named_buffers())  # baked: the export holds it as a constant
    x = random_images(3)
    with torch.no_grad():
        out = m(x)
        env = _run_by_hand(stages, x)
    assert torch.equal(env["score"], out.score) and torch.equal(env["anomaly_map"], out.anomaly_map)
    assert out.anomaly_map.shape == (3, 224, 224)


def _reference(m, x, support=None):
    """AF-CLIP (+) from scratch: open_clip's forward_intermediates, conv2d aggregation per channel, a hand-written
    multi-head attention, ln_post @ proj, summed logits, scipy Gaussian. Returns (score, map) numpy."""
    bb = m.backbone
    v = bb.visual

    def tokens_of(images):
        out = v.forward_intermediates(images, indices=[0, 1, 2, 3], output_fmt="NLC", intermediates_only=True,
                                      output_extra_tokens=True)
        pairs = zip(out["image_intermediates_prefix"], out["image_intermediates"], strict=True)
        return [torch.cat([c, p], dim=1) for c, p in pairs]

    def aggregate(t):  # [B, 1+N, D] -> 3 x [B, 1+N, D]
        b, n1, d = t.shape
        g = int(math.isqrt(n1 - 1))
        grid = t[:, 1:].transpose(1, 2).reshape(b, d, g, g)
        sets = []
        for r in (1, 3, 5):
            ax = torch.arange(r, dtype=torch.float64) - r // 2
            k = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / 32.0)
            k = (k / k.sum()).float()
            y = F.conv2d(grid, k.expand(d, 1, r, r), padding=r // 2, groups=d)
            sets.append(torch.cat([t[:, :1], y.reshape(b, d, g * g).transpose(1, 2)], dim=1))
        return sets

    def adaptor(c):
        a = m.adaptor
        u = F.layer_norm(c, (c.shape[-1],), a.norm.weight, a.norm.bias)
        q, k, vv = u @ a.to_q.weight.t(), u @ a.to_k.weight.t(), u @ a.to_v.weight.t()
        hd = a.head_dim
        outs = [torch.softmax(q[..., h * hd:(h + 1) * hd] @ k[..., h * hd:(h + 1) * hd].transpose(1, 2) / math.sqrt(hd),
                              -1) @ vv[..., h * hd:(h + 1) * hd] for h in range(a.heads)]
        return torch.cat(outs, -1) @ a.to_out.weight.t() + a.to_out.bias

    text = m.text_embeddings()
    toks = tokens_of(x)
    logits = 0
    for t in toks:
        for c in aggregate(t):
            z = v.ln_post(adaptor(c)) @ v.proj
            logits = logits + F.normalize(z, dim=-1) @ text.t() / 0.07
    p = logits.softmax(-1)[..., 1]
    b, g = x.shape[0], m.backbone.info.grid
    p_cls, p_map = p[:, 0], p[:, 1:].reshape(b, g, g)
    if support is not None:
        banks = [[F.normalize(s[:, 1:], dim=-1).reshape(-1, s.shape[-1]) for s in aggregate(t)]
                 for t in tokens_of(support)]  # [tap][scale]: [K*N, D]
        dist = []
        for li, t in enumerate(toks):
            for ri, c in enumerate(aggregate(t)):
                cos = F.normalize(c[:, 1:], dim=-1) @ banks[li][ri].t()
                dist.append((1 - cos.max(dim=-1).values) / 2)
        a = torch.stack(dist).mean(0)
        p_cls = a.max(dim=-1).values + 0.1 * p_cls
        p_map = a.reshape(b, g, g) + 0.1 * p_map
    up = F.interpolate(p_map[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    amap = np.stack([gaussian_filter(a_, 4.0) for a_ in up.numpy().astype(np.float64)])
    return p_cls.numpy(), amap


def test_forward_against_independent_reference(tiny_method):
    m = tiny_method("afclip")
    x = random_images(2, seed=3)
    with torch.no_grad():
        out = m(x)
        score, amap = _reference(m, x)
    np.testing.assert_allclose(out.score.numpy(), score, rtol=1e-5, atol=1e-6)
    assert np.abs(out.anomaly_map.numpy() - amap).max() < 1e-4


def test_few_shot_stages_and_values_against_reference():
    m = M.create("afclip", "tiny")
    support, x = random_images(2, seed=10), random_images(3, seed=11)
    m.fit_memory(support)
    assert m.memory.bank.shape == (12, 2 * 196, 128)
    stages = m.stages()
    assert [s.name for s in stages] == ["encoder", "head", "fewshot", "postprocess"]
    assert stages[2].outputs == {"fewshot_prob": ("B",), "fewshot_map": ("B", 14, 14)}
    assert any(b is m.memory.bank for b in stages[2].module.buffers())  # the bank is baked into the stage
    with torch.no_grad():
        out = m(x)
        env = _run_by_hand(stages, x)
        score, amap = _reference(m, x, support)
    assert torch.equal(env["score"], out.score) and torch.equal(env["anomaly_map"], out.anomaly_map)
    np.testing.assert_allclose(out.score.numpy(), score, rtol=1e-5, atol=1e-6)
    assert np.abs(out.anomaly_map.numpy() - amap).max() < 1e-4
    # a support image scored against its own bank: zero distance, only the beta * P̃ term is left
    with torch.no_grad():
        tok = m.encode(support[:1])
        p_cls, p_map = m.head(tok, m.text_embeddings())
        s_img, s_map = m.few_shot_fusion(tok, p_cls, p_map, m.memory)
    torch.testing.assert_close(s_map, 0.1 * p_map, rtol=1e-4, atol=1e-5)
    m.clear_memory()
    assert [s.name for s in m.stages()] == ["encoder", "head", "postprocess"]


# -- training -----------------------------------------------------------------------------------------------------
def test_loss_terms_and_gradients():
    m = M.create("afclip", "tiny").train()
    mask = torch.zeros(2, 224, 224)
    mask[1, 40:120, 60:150] = 1
    batch = {"image": random_images(2), "label": torch.tensor([0, 1]), "mask": mask}
    losses = m.loss(batch)
    assert set(losses) == {"total", "cls_focal", "seg_focal", "seg_l1", "pal"}
    parts = losses["cls_focal"] + losses["seg_focal"] + losses["seg_l1"] + losses["pal"]
    torch.testing.assert_close(losses["total"].detach(), parts)  # lambda1 = lambda2 = 1
    # the grid mask is the bilinearly resized GT (sampled at patch centres 16 i + 7.5) thresholded at 0.5
    gt = m.grid_mask(mask)
    inside = lambda lo, hi: [i for i in range(14) if lo <= 16 * i + 7 and 16 * i + 8 < hi]  # noqa: E731
    ref = torch.zeros(14, 14)
    ref[np.ix_(inside(40, 120), inside(60, 150))] = 1
    assert gt.shape == (2, 14, 14) and gt[0].sum() == 0 and torch.equal(gt[1], ref)
    losses["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters().values())
    assert all(p.grad is None for p in m.backbone.parameters())


@pytest.mark.slow
def test_learning_on_synthetic_defects(synthetic):
    """Tiny AF-CLIP (random CLIP) must learn to localise held-out synthetic defects (tiny profile's recipe).

    Measured on this box (2026-11-23): held-out pixel AUROC 0.427 untrained -> 0.601 after the tiny recipe's 3
    epochs at lr 1e-3, batch 4 (other recipes measured: lr 1e-3 / 2e-3 / 5e-3 at batch 8 for 4 epochs -> 0.579 /
    0.556 / 0.602; lr 5e-3 batch 4 -> 0.58 and no further). AF-CLIP's global, residual-free adaptor learns less
    on a random backbone than BAG-CLIP's heads.
    Since the trainable init is seeded from the profile's train.seed (2026-11-29), the untrained adaptor starts
    higher: 0.568 -> 0.604 (3 epochs); 6 epochs -> 0.610, lr 2e-3 -> 0.591: the recipe plateaus near 0.60 whatever
    the start. Asserted: at least 0.58 after training and a gain of at least 0.03 (no update at all leaves 0.568).
    """
    torch.manual_seed(0)
    train_set = AnomalyDataset(load_samples(synthetic, "test", classes=list(SYNTHETIC_TRAIN_CLASSES)), 224)
    held_out = load_samples(synthetic, "test", classes=list(SYNTHETIC_TEST_CLASSES))
    m = M.create("afclip", "tiny")
    t0 = time.perf_counter()
    before = evaluate(m, held_out, progress=False)["mean"]["pixel_auroc"]
    train(m, train_set, Path(os.environ.get("TMPDIR", "/tmp")) / "zsad-afclip-learning", progress=False)
    after = evaluate(m, held_out, progress=False)["mean"]["pixel_auroc"]
    print(f"afclip held-out pixel AUROC {before:.3f} -> {after:.3f} ({m.config.train.epochs} epochs, "
          f"lr {m.config.train.lr}, {time.perf_counter() - t0:.0f} s)")
    assert after - before >= 0.03
    assert after >= 0.58


# -- few-shot through zsad-eval -------------------------------------------------------------------------------------
def _write_mvtec(root, rng):
    """An MVTec-layout class 'bottle': 3 normal train images, 2 normal + 2 defective test images with masks."""
    from PIL import Image

    def save(path, arr):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)

    for i in range(3):
        save(root / "bottle" / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for i in range(2):
        save(root / "bottle" / "test" / "good" / f"{i:03d}.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        img, mask = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), np.zeros((64, 64), np.uint8)
        mask[10:30, 20:40] = 255
        img[mask > 0] = 255
        save(root / "bottle" / "test" / "broken" / f"{i:03d}.png", img)
        save(root / "bottle" / "ground_truth" / "broken" / f"{i:03d}_mask.png", mask)


def test_few_shot_eval_cli(tmp_path, tiny_method):
    import json

    from click.testing import CliRunner

    from zsad.checkpoint import save_checkpoint
    from zsad.evaluate_cli import main as eval_cli

    _write_mvtec(tmp_path / "mvtec", np.random.default_rng(0))
    save_checkpoint(tmp_path / "ckpt", tiny_method("afclip"), epochs=0)
    save_checkpoint(tmp_path / "bag", M.create("bagclip", "tiny"), epochs=0)
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "mvtec"), "--dataset-name", "MVTec AD",
            "--heatmaps", "0", "--no-progress", "--device", "cpu"]
    res = CliRunner().invoke(eval_cli, args + ["--shots", "2", "--support", str(tmp_path / "mvtec"),
                                               "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["setting"] == "few-shot-2" and report["few_shot"]["shots"] == 2
    picked = report["few_shot"]["images"][0]["bottle"]  # one list entry per draw
    assert len(set(picked)) == 2 and all("/train/good/" in p for p in picked)
    assert report["paper"]["image_auroc"]["value"] == 96.5  # AF-CLIP+ 2-shot on MVTec AD, AF-CLIP's Table 2
    assert "AF-CLIP+ on MVTec AD (few-shot-2)" in res.output
    # a plain folder of normal images works as the support too
    folder = tmp_path / "mvtec" / "bottle" / "train" / "good"
    res = CliRunner().invoke(eval_cli, args + ["--shots", "1", "--support", str(folder), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["few_shot"]["images"][0]["bottle"][0].startswith(
        str(folder))
    for extra, msg in [(["--shots", "2"], "needs both --shots"),
                       (["--shots", "4", "--support", str(tmp_path / "mvtec")], "fewer than --shots 4"),
                       (["--shots", "1", "--support", str(tmp_path / "nowhere")], "not a directory")]:
        res = CliRunner().invoke(eval_cli, args + extra)
        assert res.exit_code == 2 and msg in res.stderr, (extra, res.output)
    res = CliRunner().invoke(eval_cli, ["--checkpoint", str(tmp_path / "bag"), "--data", str(tmp_path / "mvtec"),
                                        "--shots", "1", "--support", str(folder), "--no-progress"])
    assert res.exit_code == 2 and "bagclip has no few-shot mode" in res.stderr


@pytest.mark.slow
def test_paper_profile_builds_at_real_size():
    """ViT-L-14-336 at 518 px with random weights: the built model trains exactly the paper's 2,109,440."""
    m = M.create("afclip", "paper", backbone={"pretrained": None})
    info = m.backbone.info
    assert (info.grid, info.width, info.layers, info.embed_dim, info.quick_gelu) == (37, 1024, 24, 768, True)
    assert sum(p.numel() for p in m.trainable_parameters().values()) == 2_109_440
    assert m.stages()[0].outputs["tokens"] == ("B", 4, 1370, 1024)
    with torch.no_grad():
        out = m(torch.randn(1, 3, 518, 518))
    assert out.anomaly_map.shape == (1, 518, 518) and torch.isfinite(out.anomaly_map).all()
