"""A torch Dataset over :class:`~zsad.data.readers.Sample` lists, with CLIP pre-processing."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from zsad import ZsadError
from zsad.data.io import image_size, read_image, read_mask
from zsad.data.readers import Sample
from zsad.data.transforms import CLIP_MEAN, CLIP_STD, preprocess, preprocess_mask

__all__ = ["AnomalyDataset", "mask_size_mismatches"]


def _mismatch_message(mask_path, mask_wh, image_path, image_wh) -> str:
    return (f"mask {mask_path} is {mask_wh[0]}x{mask_wh[1]} but its image {image_path} is {image_wh[0]}x{image_wh[1]}"
            f" (give --resize-masks to resize masks to their images, nearest neighbour)")


def mask_size_mismatches(samples: Sequence[Sample]) -> list[str]:
    """One message per sample whose mask size differs from its image's (read from the headers: fast)."""
    out = []
    for s in samples:
        if s.mask is not None:
            image_wh, mask_wh = image_size(s.image), image_size(s.mask)
            if image_wh != mask_wh:
                out.append(_mismatch_message(s.mask, mask_wh, s.image, image_wh))
    return out


class AnomalyDataset(torch.utils.data.Dataset):
    """Items are dicts: image float32 [3,S,S], mask float32 [S,S] in {0,1}, label int64, cls str, path str.

    Normal images get an all-zero mask, so batches always carry a mask and the default collate works. A mask
    whose size differs from its image's raises :class:`ZsadError` (the pixels would not line up), unless
    ``resize_masks``: then it is resized to the image with nearest neighbour first (the caller warns).
    ``mask_transform(mask, size)`` brings a mask to S x S (zsad's bilinear; zsad.protocols.mask_transform).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resize_masks: bool = False,
        mask_transform: Callable[[np.ndarray, int], np.ndarray] = preprocess_mask,
    ) -> None:
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_masks = bool(resize_masks)
        self.mask_transform = mask_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        pil = read_image(s.image)
        image = preprocess(pil, self.image_size, self.mean, self.std)
        if s.mask is not None:
            mask = read_mask(s.mask)
            if mask.shape != (pil.height, pil.width):
                if not self.resize_masks:
                    raise ZsadError(_mismatch_message(s.mask, mask.shape[::-1], s.image, pil.size))
                mask = np.asarray(Image.fromarray(mask).resize(pil.size, Image.Resampling.NEAREST))
            mask = self.mask_transform(mask, self.image_size)
        else:
            mask = np.zeros((self.image_size, self.image_size), dtype=np.float32)
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask),
            "label": torch.tensor(int(s.label), dtype=torch.int64),
            "cls": s.cls,
            "path": str(s.image),
        }
