"""Rendering of the synthetic-defect images (zsad.data.synthetic writes them to disk as a data set).

Normal images come from real textures that ship inside scikit-image (brick, grass, gravel and an
immunohistochemistry slide cropped to a tissue texture) and from simple rendered parts (washer, plate, nut,
capsule) with random pose, colour and lighting per image. Defects (scratch, crack, hole, stain, missing piece)
are drawn procedurally and the mask is exactly the set of pixels the defect changed: the defect image is
composited, every pixel whose change is below ``_VISIBLE_DELTA`` grey levels is reset to the clean pixel, and the
rest is the mask. So ``mask == (image != clean twin)`` holds bit for bit.

Rendering is deterministic: image ``index`` of ``part`` of class ``cls`` draws from
``numpy.random.default_rng(SeedSequence([seed, crc32(cls), part, index]))``, so classes and images do not
depend on each other or on the order they are generated in.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from zsad import ZsadError

GENERATOR_VERSION = 1  # bump when the pictures change, so old manifests no longer short-circuit

TEXTURE_CLASSES = ("brick", "grass", "gravel", "tissue")
SYNTHETIC_TRAIN_CLASSES = ("brick", "grass", "washer", "plate")
SYNTHETIC_TEST_CLASSES = ("gravel", "tissue", "nut", "capsule")
SYNTHETIC_CLASSES = SYNTHETIC_TRAIN_CLASSES + SYNTHETIC_TEST_CLASSES

_TEXTURE_DEFECTS = ("crack", "hole", "scratch", "stain")
_OBJECT_DEFECTS = ("crack", "hole", "missing", "scratch", "stain")
SYNTHETIC_DEFECTS: dict[str, tuple[str, ...]] = {
    c: (_TEXTURE_DEFECTS if c in TEXTURE_CLASSES else _OBJECT_DEFECTS) for c in SYNTHETIC_CLASSES
}

PARTS = ("train_good", "test_good", "test_defect")

_VISIBLE_DELTA = 10  # grey levels: smaller changes are reverted, so mask == changed pixels exactly
_PUSH = 60.0  # every defect target differs from the clean pixel by at least this (max over channels)
_MIN_FRAC, _MAX_FRAC = 0.002, 0.09  # accepted defect area as a fraction of the image


@dataclass(frozen=True)
class SyntheticImage:
    """One rendered image: ``image`` (uint8 HxWx3), its defect-free twin ``clean``, ``mask`` (bool, None for good)."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray | None
    defect: str  # "good" for normal images
    stem: str  # file stem inside its folder


# ------------------------------------------------------------------------------------------------- helpers


@cache
def _texture_source(cls: str) -> np.ndarray:
    """The scikit-image picture behind a texture class (bundled with the package, no download)."""
    import skimage.data

    name = {"tissue": "immunohistochemistry"}.get(cls, cls)
    try:
        arr = np.asarray(getattr(skimage.data, name)())
    except Exception as err:  # pooch/network errors differ by version; all mean "not available offline"
        raise ZsadError(f"scikit-image sample image {name!r} (class {cls!r}) cannot be loaded offline: {err}") from err
    arr.setflags(write=False)
    return arr


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)  # pixel centres
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _draw_alpha(size: int, fn: Callable[[ImageDraw.ImageDraw, int], None], ss: int = 3) -> np.ndarray:
    """Coverage in [0, 1] of shapes drawn by ``fn(draw, ss)`` on an ss-times supersampled canvas (anti-aliased)."""
    img = Image.new("L", (size * ss, size * ss), 0)
    fn(ImageDraw.Draw(img), ss)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / np.float32(255.0)


def _scaled(points: np.ndarray, ss: int) -> list[tuple[float, float]]:
    return [(float(x) * ss, float(y) * ss) for x, y in points]


def _ellipse_poly(cx, cy, rx, ry, angle, n=64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + x * ca - y * sa, cy + x * sa + y * ca], axis=1)


def _lowfreq(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """Smooth random field ~N(0, 0.5): lighting blotches, uneven surfaces."""
    g = rng.normal(size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """Linear lighting ramp in about [-0.7, 0.7] along a random direction."""
    yy, xx = _grid(size)
    phi = rng.uniform(0, 2 * np.pi)
    return ((xx - size / 2) * np.float32(math.cos(phi)) + (yy - size / 2) * np.float32(math.sin(phi))) / size


def _background(rng: np.random.Generator, size: int, base, noise: float = 3.0) -> np.ndarray:
    base = np.asarray(base, dtype=np.float32) + rng.uniform(-8, 8)
    shade = 1 + 0.12 * _gradient(rng, size) + 0.04 * _lowfreq(rng, size)
    grain = rng.normal(0, noise, size=(size, size, 1)).astype(np.float32)
    return base * shade[..., None] + grain


# --------------------------------------------------------------------------------------------- normal images


@dataclass
class _Scene:
    clean: np.ndarray  # uint8 HxWx3
    obj: np.ndarray | None = None  # object coverage [0,1] HxW (objects only)
    bg: np.ndarray | None = None  # float background without the object (objects only)


def _render_texture(cls: str, rng: np.random.Generator, size: int) -> _Scene:
    src = _texture_source(cls)
    h, w = src.shape[:2]
    side = int(rng.uniform(0.5, 0.8) * min(h, w))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = src[y0:y0 + side, x0:x0 + side]
    # Flips only: rotating brick by 90 degrees would be a different material, not a normal variation.
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-10, 10)
    return _Scene(np.clip(x, 0, 255).round().astype(np.uint8))


def _pose(rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    cx = size / 2 + rng.uniform(-0.05, 0.05) * size
    cy = size / 2 + rng.uniform(-0.05, 0.05) * size
    return cx, cy, rng.uniform(0.92, 1.08)


def _washer(rng: np.random.Generator, size: int):
    cx, cy, s = _pose(rng, size)
    R = 0.34 * size * s
    r = R * rng.uniform(0.38, 0.46)

    def draw(d, ss):
        d.ellipse([(cx - R) * ss, (cy - R) * ss, (cx + R) * ss, (cy + R) * ss], fill=255)
        d.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=0)

    alpha = _draw_alpha(size, draw, ss=3)
    yy, xx = _grid(size)
    rad = np.hypot(xx - cx, yy - cy)
    g = rng.uniform(150, 185)
    colour = np.array([g, g, g * 1.03], dtype=np.float32)
    rings = np.sin(rad * np.float32(2 * np.pi / (0.02 * size)) + rng.uniform(0, 6.3))  # turning marks
    bevel = np.clip(np.minimum(R - rad, rad - r) / (0.03 * size), 0, 1)
    shade = (1 + 0.14 * _gradient(rng, size) + 0.04 * rings + 0.04 * _lowfreq(rng, size)) * (0.78 + 0.22 * bevel)
    obj = colour * shade[..., None]
    bg = _background(rng, size, (52, 52, 56))
    return obj, alpha, bg


def _plate(rng: np.random.Generator, size: int):
    cx, cy, s = _pose(rng, size)
    w, h = 0.66 * size * s, 0.44 * size * s
    theta = math.radians(rng.uniform(-25, 25))
    cr = 0.06 * size
    # Rounded rectangle outline in plate coordinates, then rotated.
    pts = []
    for qx, qy, a0 in ((1, 1, 0), (-1, 1, 90), (-1, -1, 180), (1, -1, 270)):
        ccx, ccy = qx * (w / 2 - cr), qy * (h / 2 - cr)
        for t in np.radians(np.linspace(a0, a0 + 90, 8)):
            pts.append((ccx + cr * math.cos(t), ccy + cr * math.sin(t)))
    ca, sa = math.cos(theta), math.sin(theta)

    def rot(p):
        return np.stack([cx + p[:, 0] * ca - p[:, 1] * sa, cy + p[:, 0] * sa + p[:, 1] * ca], axis=1)

    outline = rot(np.array(pts))
    hr = 0.035 * size
    holes = rot(np.array([(qx * (w / 2 - 0.08 * size), qy * (h / 2 - 0.08 * size))
                          for qx in (-1, 1) for qy in (-1, 1)]))

    def draw(d, ss):
        d.polygon(_scaled(outline, ss), fill=255)
        for hx, hy in holes:
            d.ellipse([(hx - hr) * ss, (hy - hr) * ss, (hx + hr) * ss, (hy + hr) * ss], fill=0)

    alpha = _draw_alpha(size, draw, ss=3)
    yy, xx = _grid(size)
    u = (xx - cx) * np.float32(ca) + (yy - cy) * np.float32(sa)
    v = -(xx - cx) * np.float32(sa) + (yy - cy) * np.float32(ca)
    # Brushed aluminium: 1-D noise across the brushing direction.
    lines = rng.normal(0, 1, 256).astype(np.float32)
    brushed = np.interp(v, np.linspace(-size, size, 256), lines).astype(np.float32)
    edge = np.clip(np.minimum(w / 2 - np.abs(u), h / 2 - np.abs(v)) / (0.025 * size), 0, 1)
    g = rng.uniform(170, 200)
    colour = np.array([g, g * 1.01, g * 1.04], dtype=np.float32)
    shade = (1 + 0.12 * _gradient(rng, size) + 0.025 * brushed + 0.03 * _lowfreq(rng, size)) * (0.85 + 0.15 * edge)
    obj = colour * shade[..., None]
    bg = _background(rng, size, (62, 78, 102))
    return obj, alpha, bg


def _nut(rng: np.random.Generator, size: int):
    cx, cy, s = _pose(rng, size)
    R = 0.33 * size * s
    r = 0.14 * size * s
    t0 = rng.uniform(0, np.pi / 3)
    hexagon = np.array([(cx + R * math.cos(t0 + k * np.pi / 3), cy + R * math.sin(t0 + k * np.pi / 3))
                        for k in range(6)])

    def draw(d, ss):
        d.polygon(_scaled(hexagon, ss), fill=255)
        d.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=0)

    alpha = _draw_alpha(size, draw, ss=3)
    yy, xx = _grid(size)
    rad = np.hypot(xx - cx, yy - cy)
    ang = np.arctan2(yy - cy, xx - cx)
    face = 1 - 0.18 * np.clip((rad - 0.86 * R) / (0.1 * R), 0, 1)  # chamfered corners are darker
    thread = np.where(rad < 1.3 * r, 0.78 + 0.06 * np.sin(ang * 3 + rad * np.float32(12.0 / r)), 1.0)
    colour = np.array([185, 150, 75], dtype=np.float32) * rng.uniform(0.9, 1.08) + rng.uniform(-6, 6, 3)
    shade = (1 + 0.15 * _gradient(rng, size) + 0.04 * _lowfreq(rng, size)) * face * thread
    obj = colour.astype(np.float32) * shade[..., None].astype(np.float32)
    bg = _background(rng, size, (208, 208, 204))
    return obj, alpha, bg


def _capsule(rng: np.random.Generator, size: int):
    cx, cy, s = _pose(rng, size)
    length, width = 0.62 * size * s, 0.25 * size * s
    theta = rng.uniform(0, np.pi)
    ca, sa = math.cos(theta), math.sin(theta)
    half = length / 2 - width / 2
    t = np.linspace(-np.pi / 2, np.pi / 2, 24)
    right = [(half + width / 2 * math.cos(a), width / 2 * math.sin(a)) for a in t]
    left = [(-half - width / 2 * math.cos(a), -width / 2 * math.sin(a)) for a in t]
    local = np.array(right + left)
    outline = np.stack([cx + local[:, 0] * ca - local[:, 1] * sa, cy + local[:, 0] * sa + local[:, 1] * ca], axis=1)
    alpha = _draw_alpha(size, lambda d, ss: d.polygon(_scaled(outline, ss), fill=255), ss=3)
    yy, xx = _grid(size)
    u = (xx - cx) * np.float32(ca) + (yy - cy) * np.float32(sa)
    v = -(xx - cx) * np.float32(sa) + (yy - cy) * np.float32(ca)
    cap = np.array([196, 42, 48], dtype=np.float32) * rng.uniform(0.9, 1.08)
    body = np.array([232, 229, 220], dtype=np.float32) * rng.uniform(0.95, 1.02)
    split = np.clip(u / 1.5 + 0.5, 0, 1)[..., None]  # soft seam between the two halves
    colour = cap * (1 - split) + body * split
    vn = np.clip(np.abs(v) / (width / 2), 0, 1)
    cyl = 0.72 + 0.28 * np.sqrt(1 - vn ** 2)  # round cross-section
    highlight = 38 * np.exp(-((v / (width / 2) + 0.35) / 0.12) ** 2)
    shade = cyl * (1 + 0.08 * _gradient(rng, size))
    obj = colour * shade[..., None] + highlight[..., None]
    bg = _background(rng, size, (40, 42, 48))
    return obj, alpha, bg


_OBJECTS = {"washer": _washer, "plate": _plate, "nut": _nut, "capsule": _capsule}


def _render_object(cls: str, rng: np.random.Generator, size: int) -> _Scene:
    obj, alpha, bg = _OBJECTS[cls](rng, size)
    grain = rng.normal(0, 2.0, size=(size, size, 1)).astype(np.float32)
    img = bg * (1 - alpha[..., None]) + (obj + grain) * alpha[..., None]
    return _Scene(np.clip(img, 0, 255).round().astype(np.uint8), alpha, np.clip(bg, 0, 255))


def _render_clean(cls: str, rng: np.random.Generator, size: int) -> _Scene:
    return _render_texture(cls, rng, size) if cls in TEXTURE_CLASSES else _render_object(cls, rng, size)


# ---------------------------------------------------------------------------------------------------- defects
# Each defect returns layers (alpha HxW in [0,1], target HxWx3); _composite blends them over the clean image.


def _bbox(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """Smallest window holding every pixel with alpha > 0 (defects are small: work only there)."""
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _push_far(target, clean: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Target image for a layer, with targets too close to the clean pixel moved away from it.

    Guarantees that wherever alpha >= 0.5 the change is at least _PUSH / 2 grey levels, so the mask (changed
    pixels) has no speckle holes inside the defect. Only the window where alpha > 0 is computed.
    """
    out = np.zeros(clean.shape, dtype=np.float32)  # zeros, not empty: 0 * NaN would poison the composite
    win = _bbox(alpha)
    if win is None:
        return out
    c = clean[win]
    t = np.array(np.broadcast_to(target[win] if np.ndim(target) == 3 else target, c.shape), dtype=np.float32)
    close = np.abs(t - c).max(axis=-1) < _PUSH
    if close.any():
        cc = c[close]
        direction = np.where(cc.mean(axis=-1, keepdims=True) > 127, -1.0, 1.0).astype(np.float32)
        t[close] = np.clip(cc + direction * _PUSH, 0, 255)
    out[win] = t
    return out


def _place(rng: np.random.Generator, scene: _Scene, size: int, where: str = "inside") -> tuple[float, float]:
    """A defect centre: anywhere on textures; on the part (or on its outline, for missing pieces) for objects."""
    if scene.obj is None:
        x, y = rng.uniform(0.15 * size, 0.85 * size, 2)
        return float(x), float(y)
    cover = scene.obj
    cand = np.flatnonzero(((cover > 0.05) & (cover < 0.95)) if where == "edge" else (cover > 0.99))
    if cand.size == 0:
        cand = np.flatnonzero(cover > 0.5)
    i = int(cand[rng.integers(cand.size)])
    return float(i % size) + 0.5, float(i // size) + 0.5


def _area(rng: np.random.Generator, size: int) -> float:
    """Target defect area in pixels, log-uniform between ~0.4% and ~7% of the image."""
    return float(np.exp(rng.uniform(np.log(0.004), np.log(0.07)))) * size * size


def _restrict(alpha: np.ndarray, scene: _Scene) -> np.ndarray:
    return alpha if scene.obj is None else alpha * scene.obj


def _scratch(scene: _Scene, rng: np.random.Generator, size: int):
    clean = scene.clean.astype(np.float32)
    k = size / 256
    cx, cy = _place(rng, scene, size)
    length = rng.uniform(0.3, 0.8) * size * (0.7 if scene.obj is not None else 1.0)
    phi = rng.uniform(0, np.pi)
    d = np.array([math.cos(phi), math.sin(phi)])
    n = np.array([-d[1], d[0]])
    strokes = int(rng.choice([1, 1, 1, 2, 3]))
    width = max(rng.uniform(1.5, 3.5) * k, 1.2)  # at least ~1 px so small renders keep visible lines
    t = np.linspace(0, 1, 48)[:, None]
    curves = []
    for j in range(strokes):
        c = np.array([cx, cy]) + n * (j * rng.uniform(3, 7) * k)
        ln = length * rng.uniform(0.7, 1.0)
        p0, p3 = c - d * ln / 2, c + d * ln / 2
        p1 = c - d * ln / 6 + n * rng.uniform(-0.2, 0.2) * ln
        p2 = c + d * ln / 6 + n * rng.uniform(-0.2, 0.2) * ln
        curves.append((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3)

    def draw(dr, ss):
        for pts in curves:
            dr.line(_scaled(pts, ss), fill=255, width=max(1, round(width * ss)), joint="curve")

    alpha = _restrict(_draw_alpha(size, draw), scene)
    lum = float(clean[alpha > 0.5].mean()) if (alpha > 0.5).any() else float(clean.mean())
    tone = rng.uniform(225, 255) if lum < 128 or rng.random() < 0.3 else rng.uniform(8, 40)
    return [(alpha, _push_far(np.full(3, tone, np.float32), clean, alpha))]


def _crack(scene: _Scene, rng: np.random.Generator, size: int):
    clean = scene.clean.astype(np.float32)
    k = size / 256
    start = np.array(_place(rng, scene, size))
    total = rng.uniform(0.3, 0.8) * size * (0.7 if scene.obj is not None else 1.0)
    step = size / 64
    width0 = max(rng.uniform(1.8, 3.2) * k, 1.2)
    branches = [(start, rng.uniform(0, 2 * np.pi), int(total / step), width0, 0)]
    paths = []
    while branches:
        p, heading, steps, width, depth = branches.pop()
        pts = [p]
        for _ in range(max(steps, 2)):
            heading += rng.normal(0, 0.35)
            p = p + step * rng.uniform(0.7, 1.3) * np.array([math.cos(heading), math.sin(heading)])
            pts.append(p)
            if depth < 2 and rng.random() < 0.1:
                side = rng.choice([-1.0, 1.0])
                branches.append((p, heading + side * rng.uniform(0.5, 1.2), max(steps // 3, 3), width * 0.7, depth + 1))
        paths.append((np.array(pts), width))

    def draw(dr, ss):
        for pts, width in paths:
            dr.line(_scaled(pts, ss), fill=255, width=max(1, round(width * ss)), joint="curve")

    alpha = _restrict(_draw_alpha(size, draw), scene)
    return [(alpha, _push_far(clean * 0.15, clean, alpha))]


def _hole(scene: _Scene, rng: np.random.Generator, size: int):
    clean = scene.clean.astype(np.float32)
    cx, cy = _place(rng, scene, size)
    aspect = rng.uniform(0.6, 1.0)
    area = _area(rng, size) / 1.5  # the rim adds about half again
    rx = math.sqrt(area / (math.pi * aspect))
    ry = rx * aspect
    angle = rng.uniform(0, np.pi)
    inner = _ellipse_poly(cx, cy, rx, ry, angle)
    outer = _ellipse_poly(cx, cy, rx * 1.25, ry * 1.25, angle)
    core = _restrict(_draw_alpha(size, lambda d, ss: d.polygon(_scaled(inner, ss), fill=255), ss=3), scene)

    def draw_rim(d, ss):
        d.polygon(_scaled(outer, ss), fill=255)
        d.polygon(_scaled(inner, ss), fill=0)

    rim = _restrict(_draw_alpha(size, draw_rim, ss=3), scene) * np.float32(rng.uniform(0.75, 0.95))
    dark = np.float32(rng.uniform(6, 30))
    inside = _push_far(dark + (clean - clean.mean()) * 0.08, clean, core)
    lighter = _push_far(clean * 0.55 + 255 * 0.45, clean, rim)
    return [(rim, lighter), (core, inside)]


_STAIN_COLOURS = np.array(
    [(150, 75, 25), (38, 32, 26), (45, 65, 160), (70, 120, 45), (236, 230, 214), (120, 30, 90)], dtype=np.float32
)


def _stain(scene: _Scene, rng: np.random.Generator, size: int):
    clean = scene.clean.astype(np.float32)
    cx, cy = _place(rng, scene, size)
    r = math.sqrt(_area(rng, size) / math.pi)
    blobs = []
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0, 0.35 * r, 2)
        blobs.append(_ellipse_poly(cx + ox, cy + oy, r * rng.uniform(0.4, 0.8), r * rng.uniform(0.4, 0.8),
                                   rng.uniform(0, np.pi), n=32))

    def draw(d, ss):
        for b in blobs:
            d.polygon(_scaled(b, ss), fill=255)

    alpha = _draw_alpha(size, draw, ss=2)
    alpha = ndimage.gaussian_filter(alpha, sigma=max(1.0, 0.15 * r))
    # Smoothstep keeps a soft rim but a short one, so the mask (changed pixels) hugs the visible stain.
    alpha = np.clip((alpha - 0.2) / 0.6, 0, 1)
    alpha = alpha * alpha * (3 - 2 * alpha)
    alpha = _restrict(alpha * np.float32(rng.uniform(0.7, 0.95)), scene)
    # A colour that stands out from the surface under the stain; no per-pixel push here, as that would
    # speckle a translucent stain (pixels it hardly changes simply stay out of the mask).
    core = alpha > 0.5
    local = clean[core].mean(axis=0) if core.any() else clean.reshape(-1, 3).mean(axis=0)
    dist = np.abs(_STAIN_COLOURS - local).max(axis=1)
    choices = np.flatnonzero(dist >= 90)
    colour = _STAIN_COLOURS[rng.choice(choices) if choices.size else int(dist.argmax())]
    return [(alpha, 0.75 * colour + 0.25 * clean)]


def _missing(scene: _Scene, rng: np.random.Generator, size: int):
    if scene.obj is None or scene.bg is None:
        raise ValueError("missing-piece defects need an object scene")
    cx, cy = _place(rng, scene, size, where="edge")
    r = math.sqrt(2 * _area(rng, size) / math.pi)  # about half the chunk falls off the part
    n = int(rng.integers(8, 14))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.6, 1.2, n)
    poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    alpha = _restrict(_draw_alpha(size, lambda d, ss: d.polygon(_scaled(poly, ss), fill=255), ss=3), scene)
    return [(alpha, scene.bg)]  # the background shows through where the chunk broke off


_DEFECTS = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "missing": _missing}


def _composite(clean: np.ndarray, layers) -> tuple[np.ndarray, np.ndarray]:
    image = clean.copy()
    mask = np.zeros(clean.shape[:2], dtype=bool)
    union = np.zeros(clean.shape[:2], dtype=bool)
    for alpha, _ in layers:
        union |= alpha > 0
    win = _bbox(union)
    if win is None:
        return image, mask
    c8 = clean[win]
    out = c8.astype(np.float32)
    for alpha, target in layers:
        a = alpha[win][..., None]
        out += a * (target[win] - out)
    out8 = np.clip(out, 0, 255).round().astype(np.uint8)
    diff = np.abs(out8.astype(np.int16) - c8.astype(np.int16)).max(axis=-1)
    changed = diff >= _VISIBLE_DELTA
    out8[~changed] = c8[~changed]  # faint fringes are not part of the defect: keep image and mask consistent
    image[win] = out8
    mask[win] = changed
    return image, mask


def _apply_defect(kind: str, scene: _Scene, rng: np.random.Generator, size: int):
    best = None
    for _ in range(24):
        image, mask = _composite(scene.clean, _DEFECTS[kind](scene, rng, size))
        frac = float(mask.mean())
        if _MIN_FRAC <= frac <= _MAX_FRAC:
            return image, mask
        # Keep the closest-to-range attempt in case none lands inside (never happens in practice).
        score = abs(math.log(max(frac, 1e-9) / (_MIN_FRAC if frac < _MIN_FRAC else _MAX_FRAC)))
        if mask.any() and (best is None or score < best[0]):
            best = (score, image, mask)
    if best is None:
        raise RuntimeError(f"could not draw a {kind} defect")  # a bug, not a user error
    return best[1], best[2]


# ------------------------------------------------------------------------------------------------ public API


def check_class(cls: str) -> None:
    if cls not in SYNTHETIC_DEFECTS:
        raise ZsadError(f"unknown synthetic class {cls!r}; available: {', '.join(SYNTHETIC_CLASSES)}")


def render_sample(cls: str, part: str, index: int, seed: int = 0, image_size: int = 256) -> SyntheticImage:
    """Render one image of the synthetic set in memory (what :func:`generate` writes to disk).

    ``part`` is "train_good", "test_good" or "test_defect"; for "test_defect" ``index`` runs over all defect
    images of the class, whose defect type is ``SYNTHETIC_DEFECTS[cls][index % n_types]``.
    """
    check_class(cls)
    if part not in PARTS:
        raise ZsadError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    seq = np.random.SeedSequence([int(seed), zlib.crc32(cls.encode()), PARTS.index(part), int(index)])
    # Separate streams for the part and the defect: the clean twin does not depend on the defect drawn.
    scene_seq, defect_seq = seq.spawn(2)
    scene = _render_clean(cls, np.random.default_rng(scene_seq), image_size)
    if part != "test_defect":
        return SyntheticImage(scene.clean, scene.clean, None, "good", f"{index:03d}")
    kinds = SYNTHETIC_DEFECTS[cls]
    kind = kinds[index % len(kinds)]
    image, mask = _apply_defect(kind, scene, np.random.default_rng(defect_seq), image_size)
    return SyntheticImage(image, scene.clean, mask, kind, f"{index // len(kinds):03d}")


def held_out_samples(n: int, image_size: int = 256, seed: int = 0, with_good: bool = False,
                     classes: Sequence[str] = SYNTHETIC_TEST_CLASSES) -> list[SyntheticImage]:
    """``n`` rendered images for checks and probes: image ``i`` is index ``i`` of class ``classes[i % len]``.

    All are defect images, unless ``with_good``: then every third one (``i % 3 == 2``) is a good image, so a
    batch of four holds both kinds.
    """
    return [render_sample(classes[i % len(classes)], "test_good" if with_good and i % 3 == 2 else "test_defect", i,
                          seed=seed, image_size=image_size) for i in range(n)]


def sample_pngs(n: int, image_size: int = 256, seed: int = 0, with_good: bool = False,
                classes: Sequence[str] = SYNTHETIC_TEST_CLASSES) -> list[bytes]:
    """The images of :func:`held_out_samples`, encoded as PNG files (what a client sends to a served model)."""
    out = []
    for s in held_out_samples(n, image_size, seed, with_good, classes):
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


