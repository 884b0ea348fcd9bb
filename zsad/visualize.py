"""Heatmap overlays a person can open: the input image, the anomaly map in a jet-like colour scale, the GT outline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

# jet-like anchors (value -> RGB), interpolated linearly: dark blue, blue, cyan, yellow, red, dark red
_ANCHORS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_COLOURS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], float)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Float map [H,W] -> uint8 RGB [H,W,3], values clipped to [vmin, vmax]."""
    t = np.clip((np.asarray(values, np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.interp(t, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None,
            alpha: float = 0.5) -> Image.Image:
    """Blend the coloured map over ``image`` (uint8 [H,W,3], same size as the map) and outline ``mask`` in white."""
    heat = colorize(anomaly_map, vmin, vmax).astype(np.float64)
    out = (1 - alpha) * np.asarray(image, np.float64) + alpha * heat
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=1, border_value=0)
        out[edge] = 255.0
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def save_panel(path: Path, image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float,
               mask: np.ndarray | None = None, title_score: float | None = None) -> Path:
    """Side by side: input | overlay (+ GT outline). Written as PNG."""
    img = Image.fromarray(np.asarray(image, np.uint8))
    ov = overlay(image, anomaly_map, vmin, vmax, mask)
    panel = Image.new("RGB", (img.width * 2 + 4, img.height), (255, 255, 255))
    panel.paste(img, (0, 0))
    panel.paste(ov, (img.width + 4, 0))
    if title_score is not None:
        from PIL import ImageDraw

        ImageDraw.Draw(panel).text((img.width + 8, 4), f"score {title_score:.3f}", fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panel.save(path)
    return path


def save_prediction_panels(folder: Path, results) -> list[Path]:
    """One panel per ``(image path, prediction)`` (``prediction.anomaly_map``, ``prediction.score``), all on one
    colour scale for the run. The image is resized to the map where they differ (a map at the model's resolution);
    equal file names from different folders get a ``_1``, ``_2`` suffix."""
    from zsad.data import read_image

    maps = [p.anomaly_map for _, p in results]
    vmin, vmax = float(min(m.min() for m in maps)), float(max(m.max() for m in maps))
    used: set[str] = set()
    written = []
    for path, pred in results:
        h, w = pred.anomaly_map.shape
        img = read_image(path)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        name, k = path.stem, 1
        while name in used:
            name, k = f"{path.stem}_{k}", k + 1
        used.add(name)
        written.append(save_panel(folder / f"{name}.png", np.asarray(img), pred.anomaly_map, vmin, vmax,
                                  title_score=pred.score))
    return written
