"""Per-class image-score calibration fitted on normal images (production replacement for test-set min-max).

Bayes-PFL's released evaluation min-max normalises each score over *all test images of the category*, which a
deployed model never has. The deployable score is per image (spec B8.6); where one threshold must serve several
classes, fit per-class constants on a handful of normal images of each class and apply them to new scores:

- ``zscore``: s' = (s - mean_c) / std_c (std floored at 1e-6), mean/std of the normal scores of class c;
- ``minmax``: s' = (s - min_c) / (max_c - min_c) over the normal scores of class c.

A per-class affine map leaves per-class AUROC / AP unchanged (the papers' protocol averages per-class metrics);
it is what makes scores of different classes comparable. The constants are a small JSON file
(``{"mode": ..., "classes": {name: [a, b]}}``, s' = (s - a) / b) that the serving post-processing can apply with
the request's class name. Class keys are normalised like prompt words (lower case, "_" -> " ").
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zsad import ZsadError

MODES = ("zscore", "minmax")


def _key(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").split())


class ClassScoreCalibration:
    def __init__(self, mode: str, constants: dict[str, tuple[float, float]]):
        if mode not in MODES:
            raise ZsadError(f"calibration mode must be one of {MODES}, got '{mode}'")
        self.mode = mode
        self.constants = {_key(k): (float(a), float(b)) for k, (a, b) in constants.items()}

    @classmethod
    def fit(cls, scores, class_names: Sequence[str], mode: str = "zscore") -> ClassScoreCalibration:
        """Fit on the scores of NORMAL images, one class name per score."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if len(class_names) != scores.size or scores.size == 0:
            raise ZsadError(f"calibration needs one class name per score, got {len(class_names)} for {scores.size}")
        by_class: dict[str, list[float]] = {}
        for s, c in zip(scores, class_names, strict=True):
            by_class.setdefault(_key(c), []).append(float(s))
        constants = {}
        for c, vals in by_class.items():
            v = np.asarray(vals)
            if mode == "zscore":
                constants[c] = (v.mean(), max(v.std(), 1e-6))
            elif mode == "minmax":
                constants[c] = (v.min(), max(v.max() - v.min(), 1e-6))
            else:
                raise ZsadError(f"calibration mode must be one of {MODES}, got '{mode}'")
        return cls(mode, constants)

    def apply(self, scores, class_names: Sequence[str]) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if len(class_names) != scores.size:
            raise ZsadError(f"got {len(class_names)} class names for {scores.size} scores")
        out = np.empty_like(scores)
        for i, (s, c) in enumerate(zip(scores, class_names, strict=True)):
            k = _key(c)
            if k not in self.constants:
                raise ZsadError(f"no calibration for class '{c}' (calibrated: {', '.join(sorted(self.constants))})")
            a, b = self.constants[k]
            out[i] = (s - a) / b
        return out

    def to_dict(self) -> dict:
        return {"mode": self.mode, "classes": {k: list(v) for k, v in sorted(self.constants.items())}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClassScoreCalibration:
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["mode"], {k: tuple(v) for k, v in data["classes"].items()})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ZsadError(f"could not read a score calibration from {path}: {err}") from err


def fit_calibration(method, samples, mode: str = "zscore", batch_size: int = 8, device: str = "cpu",
                    progress: bool = False) -> ClassScoreCalibration:
    """Run ``method`` over the NORMAL images among ``samples`` (e.g. a class's train/good images) and fit per-class
    constants on their image scores. Class-aware methods get each sample's class name, as in zsad-eval."""
    from zsad.data import AnomalyDataset
    from zsad.evaluate import predict

    normal = [s for s in samples if not s.label]
    if not normal:
        raise ZsadError("calibration needs normal images (label 0) and none were given")
    scores, _, _, _, _ = predict(method, AnomalyDataset(normal, method.image_size), batch_size, device,
                                 "calibrate", progress)
    return ClassScoreCalibration.fit(scores, [s.cls for s in normal], mode=mode)
