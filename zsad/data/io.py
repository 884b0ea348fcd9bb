"""Decoding images and ground-truth masks as the public data sets ship them.

Industrial AD data sets are a zoo of encodings: MVTec AD has grayscale and RGB PNGs, VisA JPEGs, BTAD BMPs,
some masks are 1-bit, palette or RGBA, a few user sets are 16-bit. Everything downstream wants an 8-bit RGB
image and a boolean mask, so all the mode handling lives here, once.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from zsad import ZsadError

__all__ = ["IMAGE_EXTENSIONS", "decode_image", "is_image_file", "read_image", "read_mask"]

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def is_image_file(path: str | Path) -> bool:
    """True for a file whose extension is one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ZsadError(f"{what} not found: {path}")
    return _decode(path, f"{what.lower()} {path}")


def _decode(source, label: str, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode ``source`` (a path or a file object), so corrupt/truncated data fails here."""
    try:
        with warnings.catch_warnings():
            # Palette-with-transparency warnings are noise here: we drop alpha anyway.
            warnings.simplefilter("ignore")
            img = Image.open(source)
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ZsadError(f"{label} is {img.width}x{img.height} pixels, above the limit of {max_pixels:,}")
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ZsadError(f"cannot decode {label}: {err}") from err
    return img


def _declared_bits(img: Image.Image) -> int | None:
    """Bit depth the file says it has, where the format tells us (TIFF BitsPerSample)."""
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)
        if isinstance(bits, tuple):
            bits = bits[0] if bits else None
        if isinstance(bits, int) and 1 <= bits <= 32:
            return bits
    return None


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit (or float) single-channel image to uint8 by its bit depth (no clipping)."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        # Float images are either [0,1] or already in 8-bit units; anything else is clipped.
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    bits = _declared_bits(img)
    if bits is None:
        # I;16* modes are 16-bit by definition; mode I (e.g. 16-bit PNGs from older Pillow) is assumed 16-bit
        # unless values show it is wider.
        bits = 16 if img.mode.startswith("I;16") or int(arr.max(initial=0)) <= 0xFFFF else 32
    full = float((1 << bits) - 1)
    out = np.clip(arr.astype(np.float64), 0, full) * (255.0 / full)  # 16-bit: value / 257
    return out.round().astype(np.uint8)


def read_image(path: str | Path) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image.

    Grayscale, palette, 1-bit, CMYK, LA/RGBA (alpha is dropped, not composited) and 16-bit grayscale
    (scaled by bit depth: value/257 for 16-bit) are handled. Unreadable files raise :class:`ZsadError`.
    """
    return _to_rgb(_open(path, "Image"), f"image {path}")


def decode_image(data: bytes, max_pixels: int | None = None, label: str = "image") -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF, ...) exactly like :func:`read_image` reads a file.

    Used by the serving pre-processing. Empty, corrupt, non-image or oversized (``max_pixels``) data raise
    :class:`ZsadError` naming ``label``.
    """
    if not data:
        raise ZsadError(f"{label}: empty image data")
    return _to_rgb(_decode(io.BytesIO(data), label, max_pixels), label)


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    if img.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "RGBa", "RGBX"):
        return Image.fromarray(np.ascontiguousarray(np.asarray(img)[..., :3]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ZsadError(f"cannot convert {label} (mode {img.mode}) to RGB: {err}") from err


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as a bool array [H, W]: any nonzero pixel is defect.

    Works for L, 1-bit, palette (by colour), RGB/RGBA (any colour channel nonzero; alpha only when the colour
    channels are all zero, i.e. an alpha-only mask) and 16-bit masks.
    """
    img = _open(path, "Mask")
    mode = img.mode
    if mode == "P" or mode == "PA":
        # Judge palette masks by colour, not index: index 0 need not be black.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = img.convert("RGBA")
        mode = "RGBA"
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr != 0
    if arr.ndim != 3:
        raise ZsadError(f"mask {path} has an unsupported shape {arr.shape}")
    if mode in ("LA", "La"):
        colour, alpha = arr[..., :1], arr[..., 1]
    elif mode in ("RGBA", "RGBa"):
        colour, alpha = arr[..., :3], arr[..., 3]
    else:
        colour, alpha = arr, None
    defect = (colour != 0).any(axis=-1)
    if alpha is not None and not defect.any() and alpha.min() != alpha.max():
        defect = alpha != 0
    return defect
