"""Each method's position-table resize (paper profile) against the resize its released code performs.

The released resizes below are re-written here from the released files (read at the commits the model cards name),
step by step in their own order, without calling zsad; zsad's table must equal them. A second, independent layer
re-derives the two interpolation kernels those calls select (plain bilinear, antialiased bicubic) as explicit
numpy weight matrices, so the references do not rest on F.interpolate alone, and shows that each flag the profiles
set (mode, align_corners, antialias) changes the table on the grids tested: a flipped flag fails these tests.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zsad import ZsadError
from zsad import methods as M
from zsad.backbone import PosResize, _interpolate_grid, arch_config, load_clip

GRIDS = [(7, 11), (24, 37), (11, 7)]  # up (odd ratio), the paper's 336 -> 518 px, down


# == the released resizes, from their code ==========================================================================
def anomalyclip_release(pos, new_side):
    """zqhang/AnomalyCLIP AnomalyCLIP_lib/AnomalyCLIP.py:362-370 (VisionTransformer.forward, first call)."""
    side = int((pos.shape[0] - 1) ** 0.5)
    width = pos.shape[-1]
    new_pos = pos[1:, :].reshape(-1, side, side, width).permute(0, 3, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on the align_corners default the release relies on
        new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
    new_pos = new_pos.reshape(-1, width, new_side * new_side).transpose(1, 2)
    return torch.cat([pos[:1, :], new_pos[0]], 0)


def afclip_release(pos, new_side):
    """Faustinaqq/AF-CLIP clip/model.py:284-292 (VisionTransformer.forward, first call)."""
    side = int((pos.shape[0] - 1) ** 0.5)
    width = pos.shape[-1]
    new_pos = pos[1:, :].reshape(-1, side, side, width).permute(0, 3, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
    new_pos = new_pos.reshape(width, new_side * new_side).transpose(0, 1)
    return torch.cat([pos[:1, :], new_pos], 0)


def bayespfl_release(pos, new_side):
    """xiaozhen228/Bayes-PFL models/model_CLIP.py:276-303 (resize_pos_embed, defaults bicubic + antialias), called
    at load time (model_CLIP.py:247-248) on the fp32 state dict."""
    tok, img = pos[:1], pos[1:]
    old = int(math.sqrt(len(img)))
    img = img.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(new_side, new_side), mode="bicubic", antialias=True, align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1)[0]
    return torch.cat([tok, img], dim=0)


def sowa_release(pos, new_side):
    """huzongxiang/sowa src/models/components/vision_encoder.py:157 adds the table as loaded: no resize; at any
    other grid its forward fails on the shape. zsad's setting for other sizes is an extension: AnomalyCLIP's."""
    if pos.shape[0] - 1 == new_side * new_side:
        return pos
    return anomalyclip_release(pos, new_side)


RELEASES = {"anomalyclip": anomalyclip_release, "bagclip": anomalyclip_release, "afclip": afclip_release,
            "bayespfl": bayespfl_release, "sowa": sowa_release}


def _profile_resize(method: str, profile: str = "paper") -> PosResize:
    b = M.resolve_config(method, profile).backbone
    return PosResize(b.pos_interpolation, b.pos_align_corners, b.pos_antialias)


def _table(side: int, width: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(1 + side * side, width, generator=torch.Generator().manual_seed(seed))


# == the profiles say what the releases do ===========================================================================
def test_paper_profiles_state_each_released_resize():
    released = {"anomalyclip": ("bilinear", False, False), "bagclip": ("bilinear", False, False),
                "afclip": ("bilinear", False, False), "bayespfl": ("bicubic", False, True),
                "sowa": ("bilinear", False, False)}
    for method, expected in released.items():
        r = _profile_resize(method)
        assert (r.mode, r.align_corners, r.antialias) == expected, method
        assert _profile_resize(method, "tiny") == r  # the tests' profile runs the same resize
    # SOWA's release runs at the table's own 24 x 24 grid (336 px, patch 14): nothing is resized
    sowa = M.resolve_config("sowa", "paper").backbone
    vision = arch_config(sowa.arch)["vision_cfg"]
    assert sowa.image_size == vision["image_size"] == 336 and 336 // vision["patch_size"] == 24
    # the other four run at 518 px: 37 x 37, resized from 24 x 24
    for method in ("anomalyclip", "bagclip", "afclip", "bayespfl"):
        assert M.resolve_config(method, "paper").backbone.image_size == 518


@pytest.mark.parametrize("old,new", GRIDS)
@pytest.mark.parametrize("method", sorted(RELEASES))
def test_zsad_resize_equals_the_released_resize(method, old, new):
    pos = _table(old)
    expected = RELEASES[method](pos.clone(), new)
    got = _interpolate_grid(pos, new, _profile_resize(method))
    assert got.shape == (1 + new * new, pos.shape[1])
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    assert torch.equal(got[0], pos[0])  # the class-token row, untouched


def test_sowa_at_its_native_grid_keeps_the_table():
    pos = _table(24)
    got = _interpolate_grid(pos, 24, _profile_resize("sowa"))
    assert torch.equal(got, pos) and torch.equal(sowa_release(pos, 24), pos)


# == the kernels behind those calls, from their definitions ===========================================================
def _bilinear_matrix(n_in, n_out):
    """torch's plain bilinear (align_corners=False): source x = (i + 0.5) n_in / n_out - 0.5, clamped at 0,
    between floor(x) and the next pixel (the last one repeated)."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        j = int(math.floor(x))
        t = x - j
        w[i, j] += 1 - t
        w[i, min(j + 1, n_in - 1)] += t
    return w


def _cubic(x, a):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return a * (((x - 5) * x + 8) * x - 4)
    return 0.0


def _antialiased_matrix(n_in, n_out, kernel, support):
    """PIL's separable resampling, which torch's antialias=True follows: output centre (i + 0.5) s (s = n_in /
    n_out), taps within support * max(s, 1), kernel argument divided by max(s, 1), weights renormalised."""
    s = n_in / n_out
    f = max(s, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = (i + 0.5) * s
        lo, hi = max(int(c - support * f + 0.5), 0), min(int(c + support * f + 0.5), n_in)
        k = np.array([kernel((j - c + 0.5) / f) for j in range(lo, hi)])
        w[i, lo:hi] = k / k.sum()
    return w


def _separable(grid, wy, wx):
    """[C, H, W] grid -> wy @ grid @ wx^T per channel."""
    return np.einsum("oh,chw,pw->cop", wy, grid, wx)


@pytest.mark.parametrize("old,new", GRIDS)
def test_released_kernels_from_their_definitions(old, new):
    pos = _table(old, seed=1).double()
    grid = pos[1:].reshape(old, old, -1).permute(2, 0, 1).numpy()
    flat = lambda g: torch.from_numpy(g).permute(1, 2, 0).reshape(new * new, -1)  # noqa: E731
    bil = _bilinear_matrix(old, new)
    torch.testing.assert_close(anomalyclip_release(pos, new)[1:], flat(_separable(grid, bil, bil)), rtol=0, atol=1e-12)
    torch.testing.assert_close(afclip_release(pos, new)[1:], flat(_separable(grid, bil, bil)), rtol=0, atol=1e-12)
    aa = _antialiased_matrix(old, new, lambda x: _cubic(x, -0.5), 2.0)  # PIL's bicubic: a = -0.5
    torch.testing.assert_close(bayespfl_release(pos, new)[1:], flat(_separable(grid, aa, aa)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("old,new", GRIDS)
def test_every_flag_the_profiles_set_changes_the_table(old, new):
    """So the comparison above is sensitive: flipping mode, align_corners or antialias moves the table."""
    pos = _table(old, seed=2)
    for method in ("afclip", "bayespfl"):
        r = _profile_resize(method)
        ref = _interpolate_grid(pos, new, r)
        flips = [PosResize("bicubic" if r.mode == "bilinear" else "bilinear", r.align_corners, r.antialias),
                 PosResize(r.mode, not r.align_corners, r.antialias)]
        # antialias: bicubic's kernel differs at any ratio; bilinear's only when down-sampling
        if r.mode == "bicubic" or new < old:
            flips.append(PosResize(r.mode, r.align_corners, not r.antialias))
        for flip in flips:
            assert (_interpolate_grid(pos, new, flip) - ref).abs().max() > 1e-2, (method, flip)
    # and the released grid layout matters: a transposed grid is a different table
    t = _table(old, seed=3)
    t_T = torch.cat([t[:1], t[1:].reshape(old, old, -1).transpose(0, 1).reshape(old * old, -1)])
    assert (_interpolate_grid(t_T, new, _profile_resize("bayespfl")) - bayespfl_release(t, new)).abs().max() > 1e-2


# == end to end: a method built from its profile =====================================================================
@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    """zsad-tiny weights at their native 14 x 14 grid (224 px, patch 16), saved as a file the methods load."""
    torch.manual_seed(5)
    bb = load_clip("zsad-tiny")
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.clip.state_dict().items()}, str(path))
    return path, bb.visual.positional_embedding.detach().clone()


@pytest.mark.parametrize("method", sorted(RELEASES))
def test_each_method_loads_its_backbone_with_the_released_resize(method, tiny_clip_file):
    path, native = tiny_clip_file
    sizes = (112, 448) if method == "sowa" else (160, 288)  # SOWA's window (7) must divide the grid
    for size in sizes:  # 14 -> 7 or 10 (down), 14 -> 28 or 18 (up)
        m = M.create(method, "tiny", backbone={"weights": str(path), "pretrained": None, "image_size": size})
        grid = size // 16
        expected = RELEASES[method](native.clone(), grid)
        torch.testing.assert_close(m.backbone.visual.positional_embedding.detach(), expected, rtol=0, atol=2e-6)


# == bad settings: one-line errors ====================================================================================
def test_bad_resize_settings_are_refused():
    with pytest.raises(ZsadError, match="pos_interpolation must be one of"):
        load_clip("zsad-tiny", image_size=160, pos_interpolation="area")
    with pytest.raises(ZsadError, match="pos_antialias must be true or false, got 'yes'"):
        load_clip("zsad-tiny", image_size=160, pos_antialias="yes")
    with pytest.raises(ZsadError, match="pos_align_corners must be true or false"):
        PosResize("bilinear", 1, False)
    with pytest.raises(ZsadError, match="not 'nearest'"):
        PosResize("nearest", False, True)
    with pytest.raises(ZsadError, match="pos_antialias must be true or false"):
        M.create("afclip", "tiny", backbone={"pos_antialias": "false"})
