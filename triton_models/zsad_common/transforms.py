"""CLIP pre-processing of images and masks, and anomaly maps back to an image's size.

The same :func:`preprocess` runs in training, evaluation and inside the Triton python backend (this module is part
of ``zsad_common``, copied as is beside the served models; zsad imports it through ``zsad.data.transforms``), so it
uses only numpy + PIL (no torch/torchvision) and is deterministic: a served model sees exactly the pixels it was
trained on. Bad arguments raise :class:`~.guard.BadInput`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .guard import BadInput

__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess", "preprocess_mask", "resize_map"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_rgb_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise BadInput(f"preprocess expects a uint8 image array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha, as read_image does
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadInput(f"preprocess expects an image array HxWx3 or HxW, got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def preprocess(
    image,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """PIL image or uint8 array (HxWx3 / HxW) -> float32 [3, size, size], CLIP-normalised.

    Resize straight to size x size with PIL bicubic (no aspect-preserving crop: anomalies near the border must
    stay in view and masks must stay aligned), scale to [0, 1], then (x - mean) / std per channel.
    """
    size = int(size)
    if size <= 0:
        raise BadInput(f"preprocess size must be positive, got {size}")
    img = _as_rgb_pil(image)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    x = (x - mean_a) / std_a
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess_mask(mask, size: int) -> np.ndarray:
    """Bool/0-1 mask [H, W] -> float32 [size, size] in {0, 1}.

    The mask is resized as a float image (PIL mode "F") with bilinear filtering and thresholded at 0.5, so a
    region keeps roughly its area when down-sampled instead of growing (max-pool) or vanishing (nearest).
    """
    size = int(size)
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise BadInput(f"preprocess_mask expects a 2-D mask, got shape {arr.shape}")
    img = Image.fromarray((arr != 0).astype(np.float32))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(img, dtype=np.float32) > 0.5).astype(np.float32)


def resize_map(anomaly_map, height: int, width: int) -> np.ndarray:
    """Float map [S, S] -> float32 [height, width], bilinear (PIL mode "F"): back to the input image's size."""
    arr = np.asarray(anomaly_map, dtype=np.float32)
    if arr.ndim != 2:
        raise BadInput(f"resize_map expects a 2-D map, got shape {arr.shape}")
    if arr.shape == (height, width):
        return arr.copy()
    return np.asarray(Image.fromarray(arr).resize((int(width), int(height)), Image.Resampling.BILINEAR),
                      dtype=np.float32)
