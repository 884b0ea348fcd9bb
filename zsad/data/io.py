"""Reading images and ground-truth masks as the public data sets ship them.

Industrial AD data sets are a zoo of encodings: MVTec AD has grayscale and RGB PNGs, VisA JPEGs, BTAD BMPs,
some masks are 1-bit, palette or RGBA, a few user sets are 16-bit or float. Everything downstream wants an 8-bit
RGB image and a boolean mask. Decoding (the formats decoded, the high-depth rule, the size limit) is
``zsad.triton_models.zsad_common.image``, the one decoder, which the served preprocess model runs too; this module
reads files and masks with it and raises :class:`ZsadError` where it raises its ``BadInput``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from zsad import ZsadError, raising_zsad_error
from zsad.triton_models.zsad_common import image as _shared

__all__ = ["DECODED_FORMATS", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "decode_image", "image_paths", "image_size",
           "is_image_file", "read_image", "read_mask"]

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
DECODED_FORMATS = _shared.DECODED_FORMATS
DEFAULT_MAX_PIXELS = _shared.DEFAULT_MAX_PIXELS

_decode = raising_zsad_error(_shared.decode, __name__)
_to_rgb = raising_zsad_error(_shared.to_rgb, __name__)
decode_image = raising_zsad_error(_shared.decode_image, __name__)


def is_image_file(path: str | Path) -> bool:
    """True for a file whose extension is one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def image_paths(inputs) -> list[Path]:
    """Files, folders (their images, recursively, sorted) and glob patterns -> unique image paths, in the order
    given (what zsad-predict and zsad-infer score)."""
    import glob

    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise ZsadError(f"no such file, folder or glob match: {item}")
            found += [m for m in matches if m.is_file() and is_image_file(m)]
    return list(dict.fromkeys(found))


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ZsadError(f"{what} not found: {path}")
    return _decode(path, f"{what.lower()} {path}", None)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path, formats=DECODED_FORMATS) as img:
                return img.size
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 -- as in the shared decoder
        raise ZsadError(f"cannot read the size of {path}: {_shared.error_text(err)}") from err


def read_image(path: str | Path) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image.

    Grayscale, palette, 1-bit, CMYK, LA/RGBA (alpha is dropped, not composited), 16/32-bit integer and [0, 1]
    float grayscale (the shared decoder's high-depth rule) are handled. Unreadable files raise :class:`ZsadError`.
    """
    return _to_rgb(_open(path, "Image"), f"image {path}")


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
