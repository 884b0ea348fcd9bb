"""Backbone: open_clip loading paths, QuickGELU, positional resize, and the qk / vv / dual tapped forward."""
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zsad import ZsadError
from zsad.backbone import CLIP_CONFIG_DIR, load_clip, resolve_quick_gelu

TAPS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny():
    return load_clip("zsad-tiny")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_qk_mode_reproduces_open_clip_exactly(tiny, images):
    with torch.no_grad():
        glob, taps = tiny.forward_taps(images, TAPS, mode="qk")
        ref_glob = tiny.clip.encode_image(images)
        ref_taps = tiny.visual.forward_intermediates(images, indices=[0, 1, 2, 3], output_fmt="NLC",
                                                     intermediates_only=True)["image_intermediates"]
    assert glob.shape == (2, 128) and taps.shape == (2, 4, 196, 128)
    assert torch.equal(glob, ref_glob)
    for i in range(4):
        assert torch.equal(taps[:, i], ref_taps[i])


# -- naive re-implementations (explicit per-head loops over the frozen weights) ------------------------------------
def _naive_attention(blk, h, kind):
    attn = blk.attn
    d = h.shape[-1]
    nh = attn.num_heads
    hd = d // nh
    qkv = h @ attn.in_proj_weight.t() + attn.in_proj_bias
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    heads = []
    for j in range(nh):
        sl = slice(j * hd, (j + 1) * hd)
        qq, kk, vv = (v[..., sl], v[..., sl], v[..., sl]) if kind == "vv" else (q[..., sl], k[..., sl], v[..., sl])
        w = torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        heads.append(w @ vv)
    return torch.cat(heads, dim=-1) @ attn.out_proj.weight.t() + attn.out_proj.bias


def _naive_forward(bb, images, mode, start):
    v = bb.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    x_vv, taps = None, []
    for i, blk in enumerate(v.transformer.resblocks, start=1):
        if i < start or mode == "qk":
            x = x + _naive_attention(blk, blk.ln_1(x), "qk")
            x = x + blk.mlp(blk.ln_2(x))
            taps.append(x[:, 1:])
        elif mode == "vv":
            x = x + _naive_attention(blk, blk.ln_1(x), "vv")
            x = x + blk.mlp(blk.ln_2(x))
            taps.append(x[:, 1:])
        else:
            x_vv = x if x_vv is None else x_vv
            h = blk.ln_1(x)
            x_vv = x_vv + _naive_attention(blk, h, "vv")
            x = x + _naive_attention(blk, h, "qk")
            x = x + blk.mlp(blk.ln_2(x))
            taps.append(x_vv[:, 1:])
    return v.ln_post(x[:, 0]) @ v.proj, torch.stack(taps, dim=1)


@pytest.mark.parametrize("mode,start", [("vv", 1), ("vv", 3), ("dual", 2), ("dual", 1), ("qk", 1)])
def test_modes_match_naive_reimplementation(tiny, images, mode, start):
    with torch.no_grad():
        glob, taps = tiny.forward_taps(images, TAPS, mode=mode, start=start)
        ref_glob, ref_taps = _naive_forward(tiny, images, mode, start)
    torch.testing.assert_close(glob, ref_glob, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(taps, ref_taps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode,taps", [("qk", [1, 3]), ("dual", [2, 4]), ("dual", [1, 2])])
def test_last_block_class_token_only_is_exact(tiny, images, mode, taps):
    """The last block's stock stream computes its class token alone when nothing taps its other tokens (qk with the
    last layer untapped; dual, whose taps read the V-V stream): global and taps equal the all-token computation."""
    with torch.no_grad():
        glob, got = tiny.forward_taps(images, taps, mode=mode, start=2)
        ref_glob, ref_taps = _naive_forward(tiny, images, mode, 2)
    torch.testing.assert_close(glob, ref_glob, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, ref_taps[:, [t - 1 for t in taps]], rtol=1e-4, atol=1e-5)


def test_dual_keeps_the_stock_stream(tiny, images):
    with torch.no_grad():
        g_qk, t_qk = tiny.forward_taps(images, TAPS, mode="qk")
        g_dual, t_dual = tiny.forward_taps(images, TAPS, mode="dual", start=3)
    torch.testing.assert_close(g_dual, g_qk, rtol=1e-4, atol=1e-5)  # global branch is stock CLIP
    torch.testing.assert_close(t_dual[:, :2], t_qk[:, :2], rtol=1e-4, atol=1e-5)  # taps before the start
    assert (t_dual[:, 2:] - t_qk[:, 2:]).abs().max() > 1e-2  # V-V stream differs


def test_global_without_ln_post(tiny, images):
    with torch.no_grad():
        g, _ = tiny.forward_taps(images, [4], global_ln_post=False)
        x = tiny.visual.forward_intermediates(images, indices=[3], output_fmt="NLC", intermediates_only=True,
                                              output_extra_tokens=True)["image_intermediates_prefix"][0][:, 0]
    torch.testing.assert_close(g, x @ tiny.visual.proj)


def test_tap_order_follows_request(tiny, images):
    with torch.no_grad():
        _, t = tiny.forward_taps(images, [4, 2])
        _, ref = tiny.forward_taps(images, [2, 4])
    assert torch.equal(t[:, 0], ref[:, 1]) and torch.equal(t[:, 1], ref[:, 0])


def test_bad_forward_arguments(tiny, images):
    with pytest.raises(ZsadError, match="taps"):
        tiny.forward_taps(images, [0, 5])
    with pytest.raises(ZsadError, match="attention mode"):
        tiny.forward_taps(images, [1], mode="kq")
    with pytest.raises(ZsadError, match=r"\[B,3,224,224\]"):
        tiny.forward_taps(torch.randn(1, 3, 160, 160), [1])


# -- activation -------------------------------------------------------------------------------------------------
def test_quick_gelu_resolution():
    assert resolve_quick_gelu("ViT-L-14-336", "openai", None) is True  # OpenAI weights need QuickGELU
    assert resolve_quick_gelu("ViT-L-14-336", None, None) is False  # open_clip's plain config is GELU
    assert resolve_quick_gelu("ViT-L-14-336-quickgelu", None, None) is True
    with pytest.warns(UserWarning, match="QuickGELU"):
        assert resolve_quick_gelu("ViT-L-14-336", "openai", False) is False  # Bayes-PFL's deliberate GELU


def test_activation_module_is_what_was_asked(images):
    q = load_clip("zsad-tiny", quick_gelu=True)
    g = load_clip("zsad-tiny", quick_gelu=False)
    for bb, cls in ((q, open_clip.transformer.QuickGELU), (g, torch.nn.GELU)):
        for tower in (bb.visual.transformer, bb.clip.transformer):
            assert all(type(b.mlp.gelu) is cls for b in tower.resblocks)
    g.load_state_dict(q.state_dict())  # same weights, only the activation differs
    with torch.no_grad():
        assert (q.forward_taps(images, [4])[0] - g.forward_taps(images, [4])[0]).abs().max() > 1e-3


def test_paper_profile_uses_quick_gelu_for_openai_weights():
    from zsad.methods import resolve_config

    for name in ("anomalyclip", "bagclip"):
        b = resolve_config(name, "paper").backbone
        assert (b.arch, b.pretrained, b.image_size) == ("ViT-L-14-336", "openai", 518)
        assert resolve_quick_gelu(b.arch, b.pretrained, b.quick_gelu) is True


# -- positional embedding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_positional_embedding_resized_once_at_load(mode):
    torch.manual_seed(1)  # same random init for both, so the tables can be compared
    a = load_clip("zsad-tiny")
    torch.manual_seed(1)
    b = load_clip("zsad-tiny", image_size=160, pos_interpolation=mode)
    pos = a.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(10, 10), mode=mode, align_corners=False).permute(0, 2, 3, 1).reshape(100, -1)
    got = b.visual.positional_embedding.detach()
    assert got.shape == (101, 128) and b.info.grid == 10 and b.info.image_size == 160
    torch.testing.assert_close(got[0], pos[0])
    torch.testing.assert_close(got[1:], expect)
    with torch.no_grad():
        _, taps = b.forward_taps(torch.randn(1, 3, 160, 160), [4])
    assert taps.shape == (1, 1, 100, 128)


def test_image_size_must_be_a_patch_multiple():
    with pytest.raises(ZsadError, match="multiple of the patch size"):
        load_clip("zsad-tiny", image_size=200)


# -- weights files ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_weights_from_safetensors_and_torch_files(tmp_path, tiny, images):
    state = {k: v.contiguous() for k, v in tiny.clip.state_dict().items()}
    save_file(state, str(tmp_path / "clip.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "clip.pt")
    torch.manual_seed(123)  # a different random init, so equality proves the file was loaded
    for f in ("clip.safetensors", "clip.pt"):
        bb = load_clip("zsad-tiny", weights=tmp_path / f)
        assert bb.info.weights.endswith(f)
        with torch.no_grad():
            assert torch.equal(bb.forward_taps(images, [2])[1], tiny.forward_taps(images, [2])[1])


def test_weights_file_positional_table_is_resized(tmp_path, tiny):
    save_file({k: v.contiguous() for k, v in tiny.clip.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = load_clip("zsad-tiny", weights=tmp_path / "w.safetensors", image_size=160)
    pos = tiny.visual.positional_embedding.detach()
    expect = F.interpolate(pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(10, 10), mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).reshape(100, -1)
    torch.testing.assert_close(bb.visual.positional_embedding.detach()[1:], expect)


def test_weights_file_errors(tmp_path, tiny):
    with pytest.raises(ZsadError, match="not found"):
        load_clip("zsad-tiny", weights=tmp_path / "nope.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ZsadError, match="corrupt.safetensors"):
        load_clip("zsad-tiny", weights=bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ZsadError, match="junk.pt"):
        load_clip("zsad-tiny", weights=junk)
    # a different architecture: the same JSON with a narrower tower
    cfg = json.loads((CLIP_CONFIG_DIR / "zsad-tiny.json").read_text())
    cfg["vision_cfg"]["width"] = 64
    arch = tmp_path / "narrow-tiny.json"
    arch.write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tiny.clip.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ZsadError, match="does not fit.*shape mismatch"):
        load_clip(str(arch), weights=tmp_path / "w.safetensors")


def test_random_weights_warn_loudly():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        load_clip("zsad-tiny")


def test_unknown_arch_and_offline_tag_are_clear_errors():
    with pytest.raises(ZsadError, match="Unknown CLIP architecture 'ViT-Z'"):
        load_clip("ViT-Z")
    with pytest.raises(ZsadError, match="not an open_clip pretrained tag"):
        load_clip("zsad-tiny", pretrained="openai")
    # no internet here (HF_HUB_OFFLINE=1 in conftest): the message names the tag and the way out
    with pytest.raises(ZsadError, match=r"'openai' for ViT-B-32.*--clip-weights"):
        load_clip("ViT-B-32", pretrained="openai")
