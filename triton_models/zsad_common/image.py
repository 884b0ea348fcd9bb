"""Decoding images as the public data sets ship them, and as served clients send them: to 8-bit RGB.

Part of ``zsad_common`` (copied as is beside the served preprocess model; zsad reads files through it in
``zsad.data.io``). Industrial AD data sets are a zoo of encodings: MVTec AD has grayscale and RGB PNGs, VisA JPEGs,
BTAD BMPs, some masks are 1-bit, palette or RGBA, a few user sets are 16-bit or float. Everything downstream wants
an 8-bit RGB image, so all the mode handling lives here, once.

High-depth rule (never a silently wrong image):

* integer images (16-bit PNG/TIFF, 32-bit TIFF) are scaled by their bit depth: the depth the file declares
  (TIFF BitsPerSample), else 16 bits for 16-bit modes (so 16-bit: value / 257). Negative values, or values
  above the declared depth's maximum, are refused;
* float images must hold finite values in [0, 1]; they are scaled by 255 and rounded. Any other range is
  refused with an error naming the range found (rescale the file to [0, 1] or save it as integers).

Only the formats industrial images come in are decoded: PNG, JPEG, BMP, TIFF, WebP, GIF, PPM/PGM and TGA.
That keeps untrusted bytes (the served preprocess model decodes what clients send) away from the rarely used
Pillow plugins, some of which call external programs (EPS runs Ghostscript). Every failure on bad bytes,
whatever Pillow raises, becomes a :class:`~.guard.BadInput`; the declared size is checked before pixel data is
decoded.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .guard import BadInput

__all__ = ["DECODED_FORMATS", "DEFAULT_MAX_PIXELS", "decode", "decode_image", "error_text", "to_rgb"]

DECODED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "TGA")
# decode_image's default limit (encoded bytes come from untrusted clients); files read from disk use Pillow's own
DEFAULT_MAX_PIXELS = 50_000_000

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def error_text(err: BaseException) -> str:
    """What a decoder's exception says, at most 120 characters (its type name where it says nothing)."""
    text = str(err) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def decode(source, label: str, max_pixels: int | None) -> Image.Image:
    """Open and fully decode ``source`` (a path or a file object), so corrupt/truncated data fails here."""
    try:
        with warnings.catch_warnings():
            # Palette-with-transparency and EXIF warnings are noise here: we drop alpha anyway.
            warnings.simplefilter("ignore")
            img = Image.open(source, formats=DECODED_FORMATS)
            _check_size(img, label, max_pixels)  # from the header, before the pixels are decoded
            img.load()
            _check_size(img, label, max_pixels)  # a few formats pick their frame size only when loading
    except BadInput:
        raise
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 -- bad bytes make Pillow raise almost anything (see module doc)
        if isinstance(err, UnidentifiedImageError):
            raise BadInput(f"cannot decode {label}: not a {', '.join(DECODED_FORMATS)} image") from err
        raise BadInput(f"cannot decode {label}: {error_text(err)}") from err
    return img


def _check_size(img: Image.Image, label: str, max_pixels: int | None) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadInput(f"{label} has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise BadInput(f"{label} is {w}x{h} pixels, above the limit of {max_pixels:,}")


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


def _high_depth_to_uint8(img: Image.Image, label: str) -> np.ndarray:
    """A 16/32-bit integer or float single-channel image -> uint8, by the module's high-depth rule."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise BadInput(f"{label}: float image with NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise BadInput(f"{label}: float image with values in [{lo:g}, {hi:g}]; only floats in [0, 1] are "
                           f"accepted (rescale it to [0, 1] or save it as 8/16-bit integers)")
        return (arr * 255.0).round().astype(np.uint8)
    bits = _declared_bits(img)
    if bits is None:
        # I;16* modes are 16-bit by definition; mode I is taken as 16-bit unless its values show it is wider
        bits = 16 if img.mode.startswith("I;16") or int(arr.max()) <= 0xFFFF else 32
    full = (1 << bits) - 1
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > full:
        raise BadInput(f"{label}: {bits}-bit image with values in [{lo}, {hi}], outside 0..{full}")
    return (arr.astype(np.float64) * (255.0 / full)).round().astype(np.uint8)  # 16-bit: value / 257


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, label: str = "image") -> Image.Image:
    """Decode encoded image bytes exactly like ``zsad.data.read_image`` reads a file; returns an 8-bit RGB image.

    Used by the serving pre-processing on untrusted bytes: empty, corrupt, non-image, unsupported-format,
    out-of-range or oversized (``max_pixels``, checked from the header before decoding) data raise
    :class:`~.guard.BadInput` naming ``label``, and nothing else.
    """
    if not data:
        raise BadInput(f"{label}: empty image data")
    return to_rgb(decode(io.BytesIO(data), label, max_pixels), label)


def to_rgb(img: Image.Image, label: str) -> Image.Image:
    """A decoded image of any mode -> 8-bit RGB: grayscale, palette, 1-bit, CMYK, LA/RGBA (alpha is dropped, not
    composited), 16/32-bit integer and [0, 1] float grayscale (the module's high-depth rule)."""
    try:
        if img.mode in _HIGH_DEPTH_MODES:
            return Image.fromarray(_high_depth_to_uint8(img, label)).convert("RGB")
        if img.mode == "RGB":
            return img
        if img.mode in ("RGBA", "RGBa", "RGBX"):
            return Image.fromarray(np.ascontiguousarray(np.asarray(img)[..., :3]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return img.convert("RGB")
    except BadInput:
        raise
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 -- an odd mode a decoder produced from bad bytes
        raise BadInput(f"cannot convert {label} (mode {img.mode}) to RGB: {error_text(err)}") from err
