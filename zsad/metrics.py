"""Evaluation metrics for zero-shot anomaly detection: image/pixel AUROC, AP, F1-max and AUPRO.

Protocol
--------
Every metric is computed per class and then averaged over the classes of a dataset with an unweighted mean
(:func:`summarize`). Values are fractions in [0, 1]; display code multiplies by 100.

* Image level (one label in {0, 1} and one score per image):

  - AUROC: area under the ROC curve, ties count 1/2 (equals ``sklearn.metrics.roc_auc_score``).
  - AP: step-wise average precision ``sum_n (R_n - R_{n-1}) P_n`` over every distinct score, not interpolated
    (equals ``sklearn.metrics.average_precision_score``).
  - F1-max: the maximum of ``2PR / (P + R)`` over the precision-recall curve at every distinct score
    (prediction ``score >= threshold``); 0/0 points are ignored.

* Pixel level: the same three metrics over all pixels of all test images of a class (flattened), plus AUPRO
  with an FPR limit of 0.3 in one of four modes (:data:`AUPRO_MODES`):

  - ``"anomalyclip"`` (default, the protocol of AnomalyCLIP and the papers that copy its evaluation code):
    200 thresholds ``t_j = min + j * (max - min) / 200``, ``j = 0..199`` (min/max over all maps of the class, in
    float64), prediction ``map > t``. PRO(t) is the mean over every connected component C of every GT mask
    (8-connectivity, per image) of ``|B_t ∩ C| / |C|``; FPR(t) is pooled over the normal pixels of the class.
    Points with FPR < 0.3 are kept, their FPRs min-max rescaled to [0, 1] and the trapezoidal area under
    (rescaled FPR, PRO) is returned. Fewer than two kept points, or all kept FPRs equal, gives NaN (this
    happens e.g. for a perfect separation whose normal pixels all sit at the global minimum).
  - ``"mvtec"`` (the official MVTec AD definition): the exact PRO curve over every distinct score, starting
    at (0, 0), integrated with the trapezoid rule from FPR 0 to exactly 0.3 (PRO linearly interpolated at
    0.3) and divided by 0.3. Perfect predictions give 1.0.
  - ``"sowa"`` (SOWA's released ``cal_pro_score``, huzongxiang/sowa src/utils/metrics.py lines 6-46): as
    ``"anomalyclip"`` (same 200 thresholds, same PRO, same FPR < 0.3 min-max rescaling), except that FPR(t) is
    the *mean of the per-image FPRs* (each image's normal pixels above t / its normal pixels) instead of being
    pooled over the class. Images without a normal pixel are left out of that mean (the released code divides
    0 by 0 there and then fails).
  - ``"afclip"`` (AF-CLIP's released ``compute_pro``, Faustinaqq/AF-CLIP util/utils.py): as ``"anomalyclip"``
    (same thresholds, PRO and pooled FPR), except that the kept FPRs (< 0.3) are divided by their maximum
    instead of min-max rescaled, so the curve starts at min/max rather than at 0. All kept FPRs 0 gives NaN.

Undefined values
----------------
A class without anomalous images (image level) or anomalous pixels (pixel level) has no defined AUROC, AP,
F1-max or AUPRO: those metrics are ``float('nan')``; nothing is raised and no warning is emitted. A class
without normal samples has an undefined AUROC (NaN) and AUPRO (NaN), while AP and F1-max stay defined
(they only need positives). :func:`summarize` averages with NaN skipped and reports, per metric, which
classes were skipped.

Implementation notes (why it is fast)
-------------------------------------
An MVTec-sized test split has ~463 M pixels, so the pixel metrics never call per-threshold loops or generic
library code over all pixels. Per class the normal pixels are sorted once (in place, as a few chunks sorted
by parallel threads; numpy's float32 sort is SIMD-vectorised and releases the GIL) and the usually far fewer
anomalous pixels separately; every count needed by AUROC/AP/F1 and both AUPRO modes is then a
``searchsorted`` of the *distinct anomalous scores* (or of the 200 thresholds) into the sorted normal pixels.
Per-component PRO counts come from one weighted ``bincount`` over the anomalous pixels, and connected
components are labelled once per class. Results equal the naive definitions exactly (up to float rounding
of the final sums). float16/bool/8- and 16-bit integer maps are converted to float32 (exactly); float64 maps
stay float64 (slower, but no ties are created by rounding). Masks must be bool or numeric 0/1.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = [
    "AUPRO_MODES",
    "image_metrics",
    "pixel_metrics",
    "auroc",
    "average_precision",
    "f1_max",
    "aupro",
    "pro_curve",
    "class_metrics",
    "summarize",
]

AUPRO_MODES = ("anomalyclip", "mvtec", "sowa", "afclip")
# The 200-threshold modes: (FPR per threshold, rescaling of the kept FPRs to end at 1)
_THRESHOLD_MODES = {"anomalyclip": ("pooled", "minmax"), "sowa": ("per_image", "minmax"),
                    "afclip": ("pooled", "max")}
_NAN = float("nan")

# In-plane 8-connectivity for a stack [N, H, W]: components never cross images (same as labelling each
# image with skimage.measure.label's default full connectivity), but one scipy call labels the whole stack.
_STACK_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_STACK_8_CONNECTIVITY[1] = True


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------
def _as_binary(values, name: str) -> np.ndarray:
    """Return ``values`` as a bool array; only 0/1 (or bool) values are accepted."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric or bool with values 0/1, got dtype {arr.dtype}")
    if arr.dtype == np.uint8:
        # Common mask dtype: a view avoids copying hundreds of MB once the values are known to be 0/1.
        if arr.size and arr.max() > 1:
            raise ValueError(f"{name} must contain only 0 and 1 (binarize masks first, e.g. mask > 127)")
        return arr.view(bool)
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must contain only 0 and 1 (binarize masks first, e.g. mask > 0.5)")
    return arr.astype(bool)


def _as_image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = _as_binary(labels, "labels")
    s = np.asarray(scores)
    if s.dtype.kind not in "iufb":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return y, s


def _as_pixel_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(maps)
    if m.dtype.kind not in "iufb":
        raise ValueError(f"maps must be numeric, got dtype {m.dtype}")
    # float32 sorts twice as fast as float64 and float16/bool/small ints convert to it exactly; anything
    # wider is kept in float64 so no ties are introduced by rounding.
    if m.dtype != np.float32 and m.dtype != np.float64:
        exact_in_f32 = m.dtype.kind in "bf" or m.dtype.itemsize <= 2
        m = m.astype(np.float32 if exact_in_f32 else np.float64)
    y = _as_binary(masks, "masks")
    if m.ndim != 3 or y.ndim != 3:
        raise ValueError(f"masks and maps must be [N, H, W], got shapes {y.shape} and {m.shape}")
    if y.shape != m.shape:
        raise ValueError(f"masks and maps differ in shape: {y.shape} vs {m.shape}")
    if m.size == 0:
        raise ValueError("masks and maps are empty")
    return np.ascontiguousarray(y), np.ascontiguousarray(m)


def _check_mode(mode: str) -> None:
    if mode not in AUPRO_MODES:
        raise ValueError(f"unknown AUPRO mode {mode!r}; expected one of {AUPRO_MODES}")


# ----------------------------------------------------------------------------------------------------------
# Sorted scores
# ----------------------------------------------------------------------------------------------------------
_MIN_PART = 1 << 22  # below ~4 M values a single sort is already fast; threads would only add overhead


def _n_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))  # honours CPU pinning / container limits, unlike os.cpu_count()
    except AttributeError:  # not on every platform
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _parallel_map(fn, items: list) -> list:
    if len(items) == 1:
        return [fn(items[0])]
    # numpy releases the GIL inside sort and searchsorted, so plain threads use all cores.
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


class _SortedScores:
    """A multiset of scores that answers "how many are < / <= q" for many queries q at once.

    The scores are sorted in place as a few independent chunks, in parallel; a count is the sum of the
    chunks' counts, so no merge is ever needed.
    """

    def __init__(self, values: np.ndarray):
        self.size = values.size
        self.dtype = values.dtype
        n_parts = max(1, min(_n_workers(), values.size // _MIN_PART))
        self.parts = np.array_split(values, n_parts)  # views: the chunks are sorted in place
        _parallel_map(np.ndarray.sort, self.parts)

    def count(self, queries: np.ndarray, side: Literal["left", "right"]) -> np.ndarray:
        """Number of scores ``< q`` (side="left") or ``<= q`` (side="right") for every query ``q``."""
        counts = _parallel_map(lambda part: np.searchsorted(part, queries, side=side), self.parts)
        return np.sum(counts, axis=0, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------
# Ranking metrics from sorted positive / negative scores
# ----------------------------------------------------------------------------------------------------------
def _distinct(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index of each run of equal values in an ascending array, and the run lengths."""
    n = sorted_values.size
    is_start = np.empty(n, dtype=bool)
    is_start[:1] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    return starts, np.diff(np.append(starts, n))


def _rank_metrics(pos: np.ndarray, neg: _SortedScores) -> dict[str, float]:
    """AUROC, AP and F1-max from ascending-sorted positive scores and the negative scores.

    Only thresholds at distinct *positive* scores matter: AP only changes where recall changes, and for a
    fixed number of true positives F1 is largest at the highest threshold reaching it (fewest false
    positives), which is a positive score. So everything is a searchsorted of those few values into ``neg``.
    """
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0:
        return {"auroc": _NAN, "ap": _NAN, "f1max": _NAN}
    starts, counts = _distinct(pos)
    values = pos[starts]
    neg_below = neg.count(values, side="left")
    neg_equal = neg.count(values, side="right") - neg_below

    if n_neg == 0:
        auc = _NAN
    else:
        # Mann-Whitney U with ties counted 1/2, kept in integers (x2) so the sum is exact.
        u2 = int(np.dot(counts, 2 * neg_below + neg_equal))
        auc = u2 / (2.0 * n_pos * n_neg)

    # Threshold = values[i], prediction score >= threshold.
    tp = (n_pos - starts).astype(np.float64)
    fp = (n_neg - neg_below).astype(np.float64)
    ap = float(np.dot(counts, tp / (tp + fp)) / n_pos)
    f1 = float(np.max(2.0 * tp / (tp + fp + n_pos)))
    return {"auroc": float(auc), "ap": ap, "f1max": f1}


def _image_sorted(labels, scores) -> tuple[np.ndarray, _SortedScores]:
    y, s = _as_image_inputs(labels, scores)
    return np.sort(s[y]), _SortedScores(s[~y])


def auroc(labels, scores) -> float:
    """Area under the ROC curve (ties count 1/2); NaN if only one class is present."""
    return _rank_metrics(*_image_sorted(labels, scores))["auroc"]


def average_precision(labels, scores) -> float:
    """Non-interpolated average precision (sklearn's definition); NaN without positives."""
    return _rank_metrics(*_image_sorted(labels, scores))["ap"]


def f1_max(labels, scores) -> float:
    """Maximum F1 over every distinct threshold (prediction ``score >= t``); NaN without positives."""
    return _rank_metrics(*_image_sorted(labels, scores))["f1max"]


def image_metrics(labels, scores) -> dict[str, float]:
    """Image-level ``{"auroc", "ap", "f1max"}`` for one class."""
    return _rank_metrics(*_image_sorted(labels, scores))


# ----------------------------------------------------------------------------------------------------------
# Pixel level
# ----------------------------------------------------------------------------------------------------------
class _PixelData:
    """Per-class pixel data shared by all pixel metrics (one sort of the normal pixels)."""

    def __init__(self, masks, maps, need_components: bool, keep_images: bool = False):
        y, m = _as_pixel_inputs(masks, maps)
        # per-image FPRs ("sowa" AUPRO) need the images; references only, the caller holds these arrays anyway
        self.images: tuple[np.ndarray, np.ndarray] | None = (y, m) if keep_images else None
        self.min = float(m.min())
        self.max = float(m.max())
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise ValueError("maps contain NaN or inf")
        flat_y, flat_m = y.reshape(-1), m.reshape(-1)
        self.pos = flat_m[flat_y]  # anomalous pixels in C order (matches the component labels below)
        self.neg = _SortedScores(flat_m[~flat_y])  # sorted in place: no extra copy of the largest array
        self._pos_sorted: np.ndarray | None = None
        self.comp: np.ndarray | None = None  # 0-based component index of every anomalous pixel
        self.n_comp = 0
        if need_components and self.pos.size:
            anomalous = np.flatnonzero(y.reshape(y.shape[0], -1).any(axis=1))
            sub = y[anomalous]  # only images with anomalies need labelling
            labels, self.n_comp = ndimage.label(sub, structure=_STACK_8_CONNECTIVITY)
            self.comp = labels[sub] - 1
            del labels

    @property
    def pos_sorted(self) -> np.ndarray:
        if self._pos_sorted is None:
            self._pos_sorted = np.sort(self.pos)
        return self._pos_sorted

    def pro_weights(self) -> np.ndarray:
        """Weight of each anomalous pixel in PRO: 1 / (|C| * number of components)."""
        assert self.comp is not None, "built without need_components"
        sizes = np.bincount(self.comp, minlength=self.n_comp)
        return 1.0 / (sizes[self.comp].astype(np.float64) * self.n_comp)


def _floor_thresholds(thresholds: np.ndarray, dtype) -> np.ndarray:
    """Largest ``dtype`` values <= each float64 threshold.

    For x of that dtype, ``x > t`` iff ``x > floor(t)``, so comparisons stay in the map's dtype (a float64
    searchsorted would silently convert the whole sorted float32 array to float64).
    """
    if dtype == np.float64:
        return thresholds
    low = thresholds.astype(dtype)
    too_high = low.astype(np.float64) > thresholds
    low[too_high] = np.nextafter(low[too_high], dtype.type(-np.inf))
    return low


def _count_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of ``values > t_j`` for every ascending threshold t_j (values and thresholds of one dtype)."""
    # a value's bin = the number of thresholds strictly below it, so it exceeds t_j exactly when bin > j
    hist = np.bincount(np.searchsorted(thresholds, values, side="left"), minlength=thresholds.size + 1)
    return np.cumsum(hist[::-1])[::-1][1:]


def _mean_image_fpr(y: np.ndarray, m: np.ndarray, thresholds: np.ndarray) -> np.ndarray | None:
    """Mean over the images that have normal pixels of each image's FPR at every threshold (None: no such image)."""
    total, n_images = np.zeros(thresholds.size), 0
    for yi, mi in zip(y, m, strict=True):
        normal = mi[~yi]
        if normal.size:
            total += _count_above(normal, thresholds) / normal.size
            n_images += 1
    return total / n_images if n_images else None


def _aupro_thresholds(d: _PixelData, fpr_limit: float, steps: int, mode: str) -> float:
    curve = _pro_curve_thresholds(d, fpr_limit, steps, mode)
    if curve is None:
        return _NAN
    f, p = curve
    return float(np.sum(np.diff(f) * (p[1:] + p[:-1]) / 2.0))


def _pro_curve_thresholds(d: _PixelData, fpr_limit: float, steps: int,
                          mode: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The (rescaled FPR, PRO) points, ascending FPR, whose trapezoidal area is the AUPRO of a 200-threshold mode;
    None where that AUPRO is NaN."""
    fpr_kind, rescale = _THRESHOLD_MODES[mode]
    n_neg = d.neg.size
    if d.n_comp == 0 or n_neg == 0:
        return None
    delta = (d.max - d.min) / steps
    thresholds = _floor_thresholds(d.min + np.arange(steps, dtype=np.float64) * delta, d.neg.dtype)
    if fpr_kind == "per_image":  # "sowa": FPR(t_j) = mean over images of #(normal > t_j) / #normal of that image
        assert d.images is not None, "built without keep_images"
        fpr = _mean_image_fpr(*d.images, thresholds)
        if fpr is None:  # no image has a normal pixel
            return None
    else:  # FPR(t_j) = #(normal > t_j) / #normal, read off the sorted normal pixels of the class.
        fpr = (n_neg - d.neg.count(thresholds, side="right")) / n_neg
    # bin of an anomalous pixel = number of thresholds strictly below it, so it is predicted anomalous at
    # t_j exactly when bin > j; a weighted histogram then gives PRO at every threshold at once.
    bins = np.searchsorted(thresholds, d.pos, side="left")
    hist = np.bincount(bins, weights=d.pro_weights(), minlength=steps + 1)
    pro = np.cumsum(hist[::-1])[::-1][1:]  # pro[j] = sum of weights with bin > j
    keep = fpr < fpr_limit
    if keep.sum() < 2:
        return None
    # Thresholds ascend, so FPR descends: reverse to integrate over ascending FPR.
    f, p = fpr[keep][::-1], pro[keep][::-1]
    lo, hi = (f.min() if rescale == "minmax" else 0.0), f.max()
    if hi == lo:
        return None
    f = (f - lo) / (hi - lo)
    return f, p


def _trapezoid_upto(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under (x, y) for x in [x[0], x_max], with y linearly interpolated at x_max.

    ``x`` must be non-decreasing, start <= x_max and end >= x_max.
    """
    n_in = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:n_in], y[:n_in]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))
    if xs[-1] < x_max:  # then x[n_in] > x_max: add the piece up to the interpolated point
        x0, x1, y0, y1 = x[n_in - 1], x[n_in], y[n_in - 1], y[n_in]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += (x_max - x0) * (y0 + y_at) / 2.0
    return area


def _aupro_mvtec(d: _PixelData, fpr_limit: float) -> float:
    n_neg = d.neg.size
    if d.n_comp == 0 or n_neg == 0:
        return _NAN
    order = np.argsort(d.pos, kind="stable")
    values = d.pos[order]
    weights = d.pro_weights()[order]
    starts, _ = _distinct(values)
    u = values[starts]
    # PRO of "score >= u_i": weights summed from the top score down (same accumulation order as the
    # official per-pixel cumsum); pro_gt is the same just before u_i's own pixels are added.
    pro_from = np.cumsum(weights[::-1])[::-1]
    pro_ge = pro_from[starts]
    pro_gt = np.append(pro_from[starts[1:]], 0.0)
    fpr_ge = (n_neg - d.neg.count(u, side="left")) / n_neg
    fpr_gt = (n_neg - d.neg.count(u, side="right")) / n_neg
    # The exact curve, walking thresholds downwards: it only turns at distinct anomalous scores (normal-only
    # scores extend horizontal runs), first adding normal pixels above u_i, then all pixels equal to u_i.
    x = np.empty(2 * u.size + 2)
    y = np.empty_like(x)
    x[0] = y[0] = 0.0
    x[1:-1:2], y[1:-1:2] = fpr_gt[::-1], pro_gt[::-1]
    x[2:-1:2], y[2:-1:2] = fpr_ge[::-1], pro_ge[::-1]
    x[-1] = y[-1] = 1.0
    np.minimum(y, 1.0, out=y)  # cumsum rounding must not push PRO above 1
    return float(_trapezoid_upto(x, y, fpr_limit) / fpr_limit)


def _check_aupro_args(mode: str, fpr_limit: float, steps: int) -> None:
    _check_mode(mode)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")


def _aupro_from(d: _PixelData, mode: str, fpr_limit: float, steps: int) -> float:
    if mode == "mvtec":
        return _aupro_mvtec(d, fpr_limit)
    return _aupro_thresholds(d, fpr_limit, int(steps), mode)


def aupro(masks, maps, mode: str = "anomalyclip", fpr_limit: float = 0.3, steps: int = 200) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` (see the module docstring for the modes).

    ``masks`` and ``maps`` are [N, H, W]; ``steps`` is the number of thresholds of every mode but "mvtec". NaN when
    the class has no anomalous or no normal pixel.
    """
    _check_aupro_args(mode, fpr_limit, steps)
    d = _PixelData(masks, maps, need_components=True, keep_images=mode == "sowa")
    return _aupro_from(d, mode, fpr_limit, steps)


def pro_curve(masks, maps, mode: str = "anomalyclip", fpr_limit: float = 0.3,
              steps: int = 200) -> tuple[np.ndarray, np.ndarray] | None:
    """The curve :func:`aupro` integrates in a 200-threshold mode ("anomalyclip", "sowa", "afclip"): (FPR rescaled
    as that mode does, PRO), ascending FPR; its trapezoidal area is the AUPRO. None where the AUPRO is NaN, and for
    "mvtec" (an exact curve over every distinct score, not kept)."""
    _check_aupro_args(mode, fpr_limit, steps)
    if mode == "mvtec":
        return None
    d = _PixelData(masks, maps, need_components=True, keep_images=mode == "sowa")
    return _pro_curve_thresholds(d, fpr_limit, int(steps), mode)


def pixel_metrics(masks, maps, aupro_mode: str = "anomalyclip") -> dict[str, float]:
    """Pixel-level ``{"auroc", "ap", "f1max", "aupro"}`` for one class; masks/maps are [N, H, W]."""
    _check_mode(aupro_mode)
    d = _PixelData(masks, maps, need_components=True, keep_images=aupro_mode == "sowa")
    out = _rank_metrics(d.pos_sorted, d.neg)
    out["aupro"] = _aupro_from(d, aupro_mode, 0.3, 200)
    return out


def class_metrics(labels, scores, masks=None, maps=None, aupro_mode: str = "anomalyclip",
                  pixel: bool = True) -> dict[str, float]:
    """All metrics of one class: ``image_*`` always, ``pixel_*`` (incl. ``pixel_aupro``) when ``pixel``."""
    _check_mode(aupro_mode)
    out = {f"image_{k}": v for k, v in image_metrics(labels, scores).items()}
    if pixel:
        if masks is None or maps is None:
            raise ValueError("pixel=True needs masks and maps")
        n_images = np.shape(labels)[0] if np.ndim(labels) else 0
        if len(masks) != n_images or len(maps) != n_images:
            raise ValueError(f"labels, masks and maps differ in length: {n_images}, {len(masks)}, {len(maps)}")
        out.update({f"pixel_{k}": v for k, v in pixel_metrics(masks, maps, aupro_mode).items()})
    return out


def summarize(per_class: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Unweighted mean over classes of every metric, skipping NaN.

    Returns ``(means, skipped)``: ``means[metric]`` is the mean over the classes where it is defined (NaN if
    none is), ``skipped[metric]`` lists the classes left out because the value was NaN or missing; only
    metrics with at least one skipped class appear in ``skipped``.
    """
    metrics: list[str] = []
    for values in per_class.values():
        metrics.extend(k for k in values if k not in metrics)
    means: dict[str, float] = {}
    skipped: dict[str, list[str]] = {}
    for metric in metrics:
        kept: list[float] = []
        for cls, values in per_class.items():
            v = values.get(metric, _NAN)
            if v is None or math.isnan(v):
                skipped.setdefault(metric, []).append(cls)
            else:
                kept.append(float(v))
        means[metric] = sum(kept) / len(kept) if kept else _NAN
    return means, skipped
