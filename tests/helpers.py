"""Shared test helpers (plain functions; fixtures live in conftest.py). Imported as ``from helpers import ...``:
pytest puts this folder on sys.path (the tests are not a package)."""
import io

import numpy as np
import torch
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    """An HxWx3 (or HxW) uint8 array as an encoded PNG file."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def random_images(b: int = 2, seed: int = 0, size: int = 224) -> torch.Tensor:
    """``b`` normalised-looking images [b, 3, size, size] from a seeded generator (the same for every caller)."""
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))
