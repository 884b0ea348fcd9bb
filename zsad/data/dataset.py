"""A torch Dataset over :class:`~zsad.data.readers.Sample` lists, with CLIP pre-processing."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from zsad.data.io import read_image, read_mask
from zsad.data.readers import Sample
from zsad.data.transforms import CLIP_MEAN, CLIP_STD, preprocess, preprocess_mask

__all__ = ["AnomalyDataset"]


class AnomalyDataset(torch.utils.data.Dataset):
    """Items are dicts: image float32 [3,S,S], mask float32 [S,S] in {0,1}, label int64, cls str, path str.

    Normal images get an all-zero mask, so batches always carry a mask and the default collate works.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = preprocess(read_image(s.image), self.image_size, self.mean, self.std)
        if s.mask is not None:
            mask = preprocess_mask(read_mask(s.mask), self.image_size)
        else:
            mask = np.zeros((self.image_size, self.image_size), dtype=np.float32)
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask),
            "label": torch.tensor(int(s.label), dtype=torch.int64),
            "cls": s.cls,
            "path": str(s.image),
        }
