"""Tests for zsad.metrics against independent references (sklearn, brute-force loops, hand computations)."""
import math
import warnings

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import average_precision_score, roc_auc_score

from zsad import metrics as M


# --------------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------------
def brute_f1_max(labels, scores):
    """Max F1 over every distinct threshold, prediction score >= t, written as plainly as possible."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        if tp == 0:
            continue  # P = R = 0 (or 0/0): ignored
        p, r = tp / (tp + fp), tp / (tp + fn)
        best = max(best, 2 * p * r / (p + r))
    return best


def regions_per_image(masks):
    """Connected components (skimage default: full 8-connectivity), labelled image by image."""
    return [measure.regionprops(measure.label(m.astype(np.uint8))) for m in masks]


def slow_aupro_anomalyclip(masks, maps, fpr_limit=0.3, steps=200):
    """AnomalyCLIP-style AUPRO: loop over 200 thresholds, regionprops per image, sklearn auc."""
    masks = np.asarray(masks).astype(bool)
    maps64 = np.asarray(maps).astype(np.float64)
    regions = regions_per_image(masks)
    lo, hi = float(maps64.min()), float(maps64.max())
    delta = (hi - lo) / steps
    normal = ~masks
    fprs, pros = [], []
    for j in range(steps):
        binary = maps64 > lo + j * delta
        overlaps = []
        for i, regs in enumerate(regions):
            for region in regs:
                rr, cc = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(binary[i, rr, cc].sum() / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(binary, normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    f, p = fprs[keep], pros[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return sk_auc(f, p)  # points in threshold order (FPR non-increasing), as AnomalyCLIP passes them


def slow_aupro_sowa(masks, maps, fpr_limit=0.3, steps=200):
    """SOWA-style AUPRO: as AnomalyCLIP's loop, but FPR = the mean of the per-image FPRs (images with normals)."""
    masks = np.asarray(masks).astype(bool)
    maps64 = np.asarray(maps).astype(np.float64)
    regions = regions_per_image(masks)
    lo, hi = float(maps64.min()), float(maps64.max())
    delta = (hi - lo) / steps
    normal = ~masks
    has_normal = normal.reshape(len(normal), -1).any(axis=1)
    fprs, pros = [], []
    for j in range(steps):
        binary = maps64 > lo + j * delta
        overlaps = []
        for i, regs in enumerate(regions):
            for region in regs:
                rr, cc = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(binary[i, rr, cc].sum() / region.area)
        pros.append(np.mean(overlaps))
        per_image = [np.logical_and(binary[i], normal[i]).sum() / normal[i].sum()
                     for i in range(len(masks)) if has_normal[i]]
        fprs.append(np.mean(per_image))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    f, p = fprs[keep], pros[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return sk_auc(f, p)


def slow_aupro_afclip(masks, maps, fpr_limit=0.3, steps=200):
    """AF-CLIP-style AUPRO: AnomalyCLIP's loop, but the kept FPRs are divided by their maximum (no min shift)."""
    masks = np.asarray(masks).astype(bool)
    maps64 = np.asarray(maps).astype(np.float64)
    regions = regions_per_image(masks)
    lo, hi = float(maps64.min()), float(maps64.max())
    normal = ~masks
    fprs, pros = [], []
    for j in range(steps):
        binary = maps64 > lo + j * (hi - lo) / steps
        pros.append(np.mean([binary[i, r.coords[:, 0], r.coords[:, 1]].sum() / r.area
                             for i, regs in enumerate(regions) for r in regs]))
        fprs.append(np.logical_and(binary, normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    return sk_auc(fprs[keep] / fprs[keep].max(), pros[keep])


SLOW_AUPRO = {"anomalyclip": lambda m, s: slow_aupro_anomalyclip(m, s), "sowa": lambda m, s: slow_aupro_sowa(m, s),
              "mvtec": lambda m, s: slow_aupro_mvtec(m, s), "afclip": lambda m, s: slow_aupro_afclip(m, s)}


def slow_aupro_mvtec(masks, maps, fpr_limit=0.3):
    """Exact PRO curve by looping over every distinct score, then np.interp at the limit and trapezoid."""
    masks = np.asarray(masks).astype(bool)
    maps64 = np.asarray(maps).astype(np.float64)
    regions = regions_per_image(masks)
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps64)[::-1]:
        binary = maps64 >= t
        overlaps = []
        for i, regs in enumerate(regions):
            for region in regs:
                rr, cc = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(binary[i, rr, cc].sum() / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(binary, normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    below = fprs < fpr_limit
    xs = np.append(fprs[below], fpr_limit)
    ys = np.append(pros[below], np.interp(fpr_limit, fprs, pros))
    # Hand-written trapezoid rule: np.trapezoid is NumPy >= 2 only, np.trapz is gone there.
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    return area / fpr_limit


def random_pixel_case(rng, n=6, h=20, w=24, quantize=None, empty_images=2):
    """Random maps with several blob/rect components per image, some images without any anomaly."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(empty_images, n):
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
            masks[i, y0:y0 + rng.integers(1, 5), x0:x0 + rng.integers(1, 6)] = True
        masks[i] &= rng.random((h, w)) < 0.9  # ragged shapes, sometimes split components
    maps = rng.normal(size=(n, h, w)) + 1.5 * masks
    if quantize:
        maps = np.round(maps * quantize) / quantize  # heavy ties, thresholds landing on values
    return masks, maps.astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 1])
def test_image_metrics_match_sklearn(seed, decimals):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.random(n) < rng.uniform(0.2, 0.8)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if decimals is not None:
        scores = np.round(scores, decimals)  # heavy ties
    out = M.image_metrics(labels.astype(int), scores)
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert out["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert out["f1max"] == pytest.approx(brute_f1_max(labels, scores), abs=1e-9)
    assert M.auroc(labels, scores) == out["auroc"]
    assert M.average_precision(labels, scores) == out["ap"]
    assert M.f1_max(labels, scores) == out["f1max"]


@pytest.mark.parametrize(
    "labels, scores",
    [
        ([0, 1], [0.1, 0.9]),
        ([1, 0], [0.1, 0.9]),
        ([0, 1, 1], [0.5, 0.5, 0.5]),  # all equal
        ([1, 0, 1, 0], [0.3, 0.3, 0.7, 0.7]),
        ([0, 0, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]),
        ([1, 1, 0], [2, 1, 3]),
    ],
)
def test_image_metrics_tiny_and_constant(labels, scores):
    out = M.image_metrics(labels, scores)
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert out["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert out["f1max"] == pytest.approx(brute_f1_max(labels, scores), abs=1e-9)


def test_image_metrics_hand_values():
    # labels 1 0 1 0 at scores .9 .8 .7 .1: pairs (pos > neg): .9 beats both, .7 beats .1 only -> 3/4.
    out = M.image_metrics([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert out["auroc"] == pytest.approx(0.75)
    # AP: recall 1/2 at precision 1 (t=.9), recall 1 at precision 2/3 (t=.7) -> 0.5 + 0.5 * 2/3.
    assert out["ap"] == pytest.approx(0.5 + 1 / 3)
    # F1: t=.9 -> P=1, R=.5 -> 2/3; t=.7 -> P=2/3, R=1 -> 0.8; best 0.8.
    assert out["f1max"] == pytest.approx(0.8)


# --------------------------------------------------------------------------------------------------------
# Pixel level: AUROC / AP / F1
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("quantize", [None, 4])
def test_pixel_metrics_match_sklearn(seed, quantize):
    rng = np.random.default_rng(100 + seed)
    masks, maps = random_pixel_case(rng, quantize=quantize)
    out = M.pixel_metrics(masks.astype(np.uint8), maps)
    y, s = masks.ravel(), maps.ravel()
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert out["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert out["f1max"] == pytest.approx(brute_f1_max(y, s), abs=1e-9)


@pytest.mark.parametrize("mode", M.AUPRO_MODES)
def test_pixel_metrics_with_chunked_parallel_sort(monkeypatch, mode):
    # Large classes sort the normal pixels as several chunks in threads; force that path on small data.
    monkeypatch.setattr(M, "_MIN_PART", 16)
    monkeypatch.setattr(M, "_n_workers", lambda: 3)
    rng = np.random.default_rng(21)
    masks, maps = random_pixel_case(rng, n=4, h=12, w=14, quantize=8)
    out = M.pixel_metrics(masks, maps, aupro_mode=mode)
    y, s = masks.ravel(), maps.ravel()
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert out["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert out["f1max"] == pytest.approx(brute_f1_max(y, s), abs=1e-9)
    assert out["aupro"] == pytest.approx(SLOW_AUPRO[mode](masks, maps), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_pixel_metrics_other_dtypes(dtype):
    rng = np.random.default_rng(7)
    masks, maps = random_pixel_case(rng)
    maps = maps.astype(dtype)
    out = M.pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert out["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert out["aupro"] == pytest.approx(slow_aupro_anomalyclip(masks, maps), abs=1e-9)


# --------------------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------------------
def hand_case_a():
    """1x4x4: one 2-pixel component at (0,0),(0,1) scored 2.0 and 1.005; normals 1.505, 0.505, twelve 0."""
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps[0, 0, 0], maps[0, 0, 1] = 2.0, 1.005
    maps[0, 2, 2], maps[0, 3, 1] = 1.505, 0.505
    return masks, maps


def hand_case_b():
    """Two 2x3 images: component A = {.9025, .3025} (img 0), component B = {.603} (img 1).

    Normals (9): 1.0, .604, .2025 and six 0.0.
    """
    maps = np.array(
        [[[0.9025, 0.3025, 0.0], [0.0, 0.2025, 0.0]],
         [[1.0, 0.0, 0.0], [0.0, 0.604, 0.603]]],
        dtype=np.float32,
    )
    masks = np.array(
        [[[1, 1, 0], [0, 0, 0]],
         [[0, 0, 0], [0, 0, 1]]],
        dtype=np.uint8,
    )
    return masks, maps


def test_aupro_anomalyclip_hand_case_a():
    # min 0, max 2 -> delta .01, t_j = .01 j (j = 0..199); 14 normal pixels.
    # FPR: 1.505 > t for j <= 150, .505 > t for j <= 50  -> 2/14 (j<=50), 1/14 (51..150), 0 (151..199).
    #      all < .3, min-max rescaled -> 1, .5, 0.
    # PRO (one component of 2): 2.0 always > t, 1.005 > t for j <= 100 -> 1 (j<=100), .5 (j>=101).
    # Ascending FPR: (0, .5) ... (0, .5) | (.5, .5) ... (.5, 1) | (1, 1) ...
    # area = .5 * .5 (from 0 to .5 at PRO .5) + .5 * 1 (from .5 to 1 at PRO 1) = .25 + .5 = .75
    masks, maps = hand_case_a()
    assert M.aupro(masks, maps) == pytest.approx(0.75, abs=1e-12)
    assert M.aupro(masks, maps) == pytest.approx(slow_aupro_anomalyclip(masks, maps), abs=1e-12)


def test_aupro_anomalyclip_hand_case_b():
    # min 0, max 1 -> delta .005, t_j = .005 j; 9 normal pixels.
    # FPR: 1.0 always; .604 > t for j <= 120; .2025 > t for j <= 40
    #      -> 3/9 (j<=40, >= .3: dropped), 2/9 (41..120), 1/9 (121..199); rescaled: 2/9 -> 1, 1/9 -> 0.
    # PRO = mean(A, B): A: .9025 > t for j <= 180, .3025 for j <= 60; B: .603 > t for j <= 120
    #      j 41..60: 1;  61..120: (.5 + 1)/2 = .75;  121..180: (.5 + 0)/2 = .25;  181..199: 0.
    # Ascending FPR: (0, 0) ... (0, .25) [j=121] -> (1, .75) [j=120] ... (1, 1) [j=41].
    # area = the single diagonal step (.25 + .75) / 2 * 1 = .5
    masks, maps = hand_case_b()
    assert M.aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    assert M.aupro(masks, maps) == pytest.approx(slow_aupro_anomalyclip(masks, maps), abs=1e-12)


def test_aupro_mvtec_hand_cases():
    # Case A, thresholds descending (pixels >= t): 2.0 (A) -> (0, .5); 1.505 (N) -> (1/14, .5);
    # 1.005 (A) -> (1/14, 1); .505 (N) -> (2/14, 1); 0 -> (1, 1).
    # Area to .3: .5 * 1/14 + 1 * (.3 - 1/14) = .3 - 1/28;  / .3 -> 1 - 5/42 = 37/42
    masks, maps = hand_case_a()
    assert M.aupro(masks, maps, mode="mvtec") == pytest.approx(37 / 42, abs=1e-12)
    # Case B, weights: A pixels 1/(2*2) = .25, B pixel 1/(1*2) = .5.
    # 1.0 (N) -> (1/9, 0); .9025 (A) -> (1/9, .25); .604 (N) -> (2/9, .25); .603 (B) -> (2/9, .75);
    # .3025 (A) -> (2/9, 1); .2025 (N) -> (3/9, 1); 0 -> (1, 1).
    # Area to .3: .25 * (2/9 - 1/9) + 1 * (.3 - 2/9) = 1/36 + 3/10 - 2/9 = 19/180;  / .3 -> 19/54
    masks, maps = hand_case_b()
    assert M.aupro(masks, maps, mode="mvtec") == pytest.approx(19 / 54, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantize", [None, 8])
def test_aupro_anomalyclip_matches_slow_reference(seed, quantize):
    rng = np.random.default_rng(200 + seed)
    masks, maps = random_pixel_case(rng, quantize=quantize)
    expected = slow_aupro_anomalyclip(masks, maps)
    assert M.aupro(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert M.pixel_metrics(masks, maps)["aupro"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantize", [None, 8])
def test_aupro_mvtec_matches_slow_reference(seed, quantize):
    rng = np.random.default_rng(300 + seed)
    masks, maps = random_pixel_case(rng, n=5, h=12, w=14, quantize=quantize)
    expected = slow_aupro_mvtec(masks, maps)
    assert M.aupro(masks, maps, mode="mvtec") == pytest.approx(expected, abs=1e-9)
    for mode in M.AUPRO_MODES:  # plain Python floats, not numpy scalars
        assert all(type(v) is float for v in M.pixel_metrics(masks, maps, aupro_mode=mode).values())
    assert M.pixel_metrics(masks, maps, aupro_mode="mvtec")["aupro"] == pytest.approx(expected, abs=1e-9)


def test_aupro_anomalyclip_thresholds_compared_in_float64():
    # Map values equal to float32(t_j) for thresholds t_j that are not float32 numbers: when float32(t_j)
    # rounded *up*, "map > t_j" is True in float64 but would be False if t_j were rounded to float32.
    rng = np.random.default_rng(11)
    masks, maps = random_pixel_case(rng, quantize=None)
    lo, hi = float(maps.min()), float(maps.max())
    t = lo + np.arange(200) * ((hi - lo) / 200)
    t32 = t.astype(np.float32)
    assert (t32.astype(np.float64) > t).any() and (t32.astype(np.float64) < t).any()
    flat = maps.reshape(-1).copy()
    inner = np.flatnonzero((flat > lo) & (flat < hi))
    flat[inner] = rng.choice(t32[1:], size=inner.size)  # every value sits on a (rounded) threshold
    maps = flat.reshape(maps.shape)
    assert maps.min() == lo and maps.max() == hi
    assert M.aupro(masks, maps) == pytest.approx(slow_aupro_anomalyclip(masks, maps), abs=1e-12)


def test_aupro_components_are_8_connected_and_per_image():
    # Two diagonal pixels form ONE component (8-connectivity); the same pixels in two images form two.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[:, 0, 0] = masks[:, 1, 1] = True
    maps = np.zeros((2, 3, 3), dtype=np.float32)
    maps[0, 0, 0] = 1.0  # image 0: half of its component detected; image 1: nothing
    maps[1, 2, 2] = 0.5  # a false positive so that FPR varies
    # mvtec: 1.0 -> (0, 1/(2*2) = .25); .5 (N) -> (1/14, .25); 0 -> (1, 1), passing .3 on the last segment:
    # PRO(.3) = .25 + .75 * (.3 - 1/14) / (1 - 1/14); area = .25 * 1/14 + (.25 + PRO(.3)) / 2 * (.3 - 1/14)
    x0 = 1 / 14
    pro_03 = 0.25 + 0.75 * (0.3 - x0) / (1 - x0)
    expected = (0.25 * x0 + (0.25 + pro_03) / 2 * (0.3 - x0)) / 0.3
    assert M.aupro(masks, maps, mode="mvtec") == pytest.approx(expected, abs=1e-12)
    assert M.aupro(masks, maps, mode="mvtec") == pytest.approx(slow_aupro_mvtec(masks, maps), abs=1e-12)
    assert M.aupro(masks, maps) == pytest.approx(slow_aupro_anomalyclip(masks, maps), abs=1e-12)


def test_aupro_mvtec_perfect_prediction_is_one():
    rng = np.random.default_rng(5)
    masks, _ = random_pixel_case(rng)
    maps = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    assert M.aupro(masks, maps.astype(np.float32), mode="mvtec") == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_metrics(masks, maps)["auroc"] == pytest.approx(1.0)


def test_aupro_anomalyclip_degenerate_is_nan():
    # Perfect separation with every normal pixel at the global minimum: FPR is 0 at all 200 thresholds,
    # so the min-max rescaling is undefined -> NaN (documented).
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    maps = masks.astype(np.float32)
    assert math.isnan(M.aupro(masks, maps))


# --------------------------------------------------------------------------------------------------------
# Undefined classes and summarize
# --------------------------------------------------------------------------------------------------------
def test_class_without_anomalies_is_nan_and_skipped():
    rng = np.random.default_rng(9)
    n = 4
    labels = np.zeros(n, dtype=int)
    scores = rng.random(n)
    masks = np.zeros((n, 8, 8), dtype=bool)
    maps = rng.random((n, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning spam either
        empty = M.class_metrics(labels, scores, masks, maps)
        empty_mvtec = M.class_metrics(labels, scores, masks, maps, aupro_mode="mvtec")
    assert set(empty) == {"image_auroc", "image_ap", "image_f1max",
                          "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"}
    assert all(math.isnan(v) for v in empty.values())
    assert math.isnan(empty_mvtec["pixel_aupro"])

    good_masks, good_maps = random_pixel_case(rng, n=n, h=8, w=8, empty_images=1)
    good_labels = good_masks.reshape(n, -1).any(1).astype(int)
    good = M.class_metrics(good_labels, good_maps.reshape(n, -1).max(1), good_masks, good_maps)
    assert not any(math.isnan(v) for v in good.values())

    means, skipped = M.summarize({"good": good, "empty": empty})
    assert means == pytest.approx(good)
    assert set(skipped) == set(good)
    assert all(v == ["empty"] for v in skipped.values())


def test_summarize_mean_and_all_nan():
    nan = float("nan")
    means, skipped = M.summarize({"a": {"x": 0.5, "y": nan}, "b": {"x": 1.0, "y": nan}, "c": {"x": nan, "y": nan}})
    assert means["x"] == pytest.approx(0.75)
    assert math.isnan(means["y"])
    assert skipped == {"x": ["c"], "y": ["a", "b", "c"]}


def test_class_metrics_image_only():
    out = M.class_metrics([0, 1, 1], [0.2, 0.4, 0.9], None, None, pixel=False)
    assert set(out) == {"image_auroc", "image_ap", "image_f1max"}
    assert out["image_auroc"] == 1.0


def test_no_normal_samples():
    out = M.image_metrics([1, 1, 1], [0.1, 0.2, 0.3])
    assert math.isnan(out["auroc"])
    assert out["ap"] == pytest.approx(average_precision_score([1, 1, 1], [0.1, 0.2, 0.3]))
    assert out["f1max"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="length"):
        M.image_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 and 1"):
        M.auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 and 1"):
        M.f1_max([0, 0.5, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        M.average_precision([0, 1], [0.1, float("nan")])
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="unknown AUPRO mode"):
        M.aupro(masks, maps, mode="bogus")
    with pytest.raises(ValueError, match="unknown AUPRO mode"):
        M.pixel_metrics(masks, maps, aupro_mode="bogus")
    with pytest.raises(ValueError, match="unknown AUPRO mode"):
        M.class_metrics([1, 0], [0.5, 0.1], masks, maps, aupro_mode="bogus")
    with pytest.raises(ValueError, match="shape"):
        M.pixel_metrics(masks, maps[:, :3])
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        M.pixel_metrics(masks[0], maps[0])
    with pytest.raises(ValueError, match="0 and 1"):
        M.pixel_metrics(masks.astype(np.uint8) * 255, maps)
    with pytest.raises(ValueError, match="length"):
        M.class_metrics([1, 0, 0], [0.5, 0.1, 0.2], masks, maps)
    with pytest.raises(ValueError, match="NaN or inf"):
        M.pixel_metrics(masks, np.full((2, 4, 4), np.inf, dtype=np.float32))
    assert M.AUPRO_MODES == ("anomalyclip", "mvtec", "sowa", "afclip")


# --------------------------------------------------------------------------------------------------------
# AUPRO, "sowa" mode (FPR = mean of the per-image FPRs)
# --------------------------------------------------------------------------------------------------------
def sowa_hand_case():
    """2 images 1x4, maps in [0, 1] so that 4 thresholds are 0, .25, .5, .75 (float64, no ties with them).

    A: mask 1 0 0 0, map 1.0 0.0 0.3 0.6 -> component {1.0}; normals {0.0, 0.3, 0.6}
    B: mask 0 1 1 1, map 0.3 0.9 0.4 0.2 -> component {0.9, 0.4, 0.2}; normal {0.3}
    t:            0     .25    .5    .75
    FPR_A:       2/3    2/3   1/3     0
    FPR_B:        1      1     0      0
    mean FPR:    5/6    5/6   1/6     0      (pooled over the 4 normals: 3/4 3/4 1/4 0)
    PRO_B:        1     2/3   1/3    1/3     (PRO_A = 1 throughout)
    PRO:          1     5/6   2/3    2/3
    """
    masks = np.array([[[1, 0, 0, 0]], [[0, 1, 1, 1]]], dtype=bool)
    maps = np.array([[[1.0, 0.0, 0.3, 0.6]], [[0.3, 0.9, 0.4, 0.2]]])
    return masks, maps


def test_aupro_sowa_hand_case():
    masks, maps = sowa_hand_case()
    # fpr_limit 1 keeps all 4 points; mean FPR rescaled by 5/6: (0, 2/3) (.2, 2/3) (1, 5/6) (1, 1)
    # area = .2 * 2/3 + .8 * (2/3 + 5/6) / 2 = 2/15 + 3/5 = 11/15
    assert M.aupro(masks, maps, mode="sowa", fpr_limit=1.0, steps=4) == pytest.approx(11 / 15, abs=1e-12)
    # pooled FPR rescaled by 3/4: (0, 2/3) (1/3, 2/3) (1, 5/6) (1, 1) -> 2/9 + 2/3 * 3/4 = 13/18: the modes differ
    assert M.aupro(masks, maps, mode="anomalyclip", fpr_limit=1.0, steps=4) == pytest.approx(13 / 18, abs=1e-12)
    # at the default limit .3 only t = .5 (1/6) and .75 (0) stay, both with PRO 2/3 -> 2/3
    assert M.aupro(masks, maps, mode="sowa", steps=4) == pytest.approx(2 / 3, abs=1e-12)
    assert M.aupro(masks, maps, mode="sowa", fpr_limit=1.0, steps=4) == pytest.approx(
        slow_aupro_sowa(masks, maps, fpr_limit=1.0, steps=4), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("quantize", [None, 8])
def test_aupro_sowa_matches_slow_reference(seed, quantize):
    rng = np.random.default_rng(400 + seed)
    masks, maps = random_pixel_case(rng, quantize=quantize)
    expected = slow_aupro_sowa(masks, maps)
    assert M.aupro(masks, maps, mode="sowa") == pytest.approx(expected, abs=1e-9)
    assert M.pixel_metrics(masks, maps, aupro_mode="sowa")["aupro"] == pytest.approx(expected, abs=1e-9)
    assert M.class_metrics(np.zeros(len(masks)), np.zeros(len(masks)), masks, maps,
                           aupro_mode="sowa")["pixel_aupro"] == pytest.approx(expected, abs=1e-9)


def test_aupro_sowa_equals_pooled_when_images_have_equal_normal_counts():
    # the mean of per-image FPRs equals the pooled FPR when every image has the same number of normal pixels
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 10, 10), dtype=bool)
    for i in range(4):
        masks[i, i:i + 3, 2:5] = True  # 9 anomalous pixels in every image
    maps = (rng.normal(size=masks.shape) + masks).astype(np.float32)
    assert M.aupro(masks, maps, mode="sowa") == pytest.approx(M.aupro(masks, maps), abs=1e-12)


def test_aupro_sowa_leaves_out_images_without_normal_pixels():
    masks, maps = sowa_hand_case()
    full = np.ones((1, 1, 4), dtype=bool)  # an all-anomalous image: its FPR is 0/0
    masks2 = np.concatenate([masks, full])
    maps2 = np.concatenate([maps, np.array([[[0.5, 0.5, 0.5, 0.5]]])])
    # the extra component {.5 x4} adds PRO 1, 1, 0, 0 -> PRO = (1+1+1)/3, (1+2/3+1)/3, (1+1/3)/3, (1+1/3)/3
    # FPRs stay those of A and B: (0, 4/9) (.2, 4/9) (1, 8/9) (1, 1) -> .2 * 4/9 + .8 * (4/9 + 8/9) / 2 = 28/45
    assert M.aupro(masks2, maps2, mode="sowa", fpr_limit=1.0, steps=4) == pytest.approx(28 / 45, abs=1e-12)
    assert M.aupro(masks2, maps2, mode="sowa", fpr_limit=1.0, steps=4) == pytest.approx(
        slow_aupro_sowa(masks2, maps2, fpr_limit=1.0, steps=4), abs=1e-12)


# --------------------------------------------------------------------------------------------------------
# AUPRO, "afclip" mode (kept FPRs divided by their maximum)
# --------------------------------------------------------------------------------------------------------
def test_aupro_afclip_hand_case():
    # Case B (see test_aupro_anomalyclip_hand_case_b): kept FPRs 2/9 (j 41..120) and 1/9 (j 121..199).
    # Divided by the max 2/9 -> 1 and .5 (min-max would give 1 and 0).
    # Ascending FPR: (.5, 0) [j 181..199] ... (.5, .25) [j 121..180] -> (1, .75) [j 120] ... (1, 1) [j 41]
    # area = the diagonal step only: (1 - .5) * (.25 + .75) / 2 = .25 (AnomalyCLIP's rescaling gives .5)
    masks, maps = hand_case_b()
    assert M.aupro(masks, maps, mode="afclip") == pytest.approx(0.25, abs=1e-12)
    assert M.aupro(masks, maps, mode="afclip") == pytest.approx(slow_aupro_afclip(masks, maps), abs=1e-12)
    # Case A: the smallest kept FPR is 0, so dividing by the max equals min-max rescaling
    masks, maps = hand_case_a()
    assert M.aupro(masks, maps, mode="afclip") == pytest.approx(0.75, abs=1e-12)


def test_aupro_afclip_all_kept_fprs_zero_is_nan():
    # normals all at the global minimum: FPR 0 at every threshold -> 0 / 0 in the released code; NaN here
    masks = np.array([[[1, 1, 0, 0]]], dtype=bool)
    maps = np.array([[[1.0, 0.5, 0.0, 0.0]]])
    assert math.isnan(M.aupro(masks, maps, mode="afclip"))


@pytest.mark.parametrize("seed", range(3))
def test_aupro_afclip_matches_slow_reference(seed):
    rng = np.random.default_rng(600 + seed)
    masks, maps = random_pixel_case(rng)
    expected = slow_aupro_afclip(masks, maps)
    assert M.aupro(masks, maps, mode="afclip") == pytest.approx(expected, abs=1e-9)
    assert M.class_metrics([0] * len(masks), [0.0] * len(masks), masks, maps,
                           aupro_mode="afclip")["pixel_aupro"] == pytest.approx(expected, abs=1e-9)
