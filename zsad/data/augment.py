"""Training-time augmentation: SOWA's 2x2 mosaic (from APRIL-GAN), methods/bagclip_sowa.md section 3.4.

With probability ``rate`` a training item is replaced by a 2x2 mosaic of 4 images drawn at random from the same
class (any defect type or good), each scaled to a quadrant, with their masks tiled the same way. SOWA's code
keeps the label of the drawn item even though the mosaic's content changed; ``relabel=True`` sets the label to
whether the tiled mask has any anomalous pixel.

The draws depend only on (seed, epoch, index): ``set_epoch`` is called by the training loop, so runs (and
resumed runs) are reproducible with any number of DataLoader workers.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from zsad import ZsadError


def _quadrant(x: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    """[C, S, S] -> [C, h, w] (antialiased downscale)."""
    kwargs = {"align_corners": False, "antialias": True}
    return F.interpolate(x.unsqueeze(0), size=(h, w), mode=mode, **kwargs).squeeze(0)


def mosaic(images: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile 4 images [3, S, S] (and masks [S, S]) row-major into one [3, S, S] image and a binary [S, S] mask."""
    if len(images) != 4 or len(masks) != 4:
        raise ZsadError("a mosaic needs exactly 4 images and 4 masks")
    s = images[0].shape[-1]
    h0, h1 = s // 2, s - s // 2
    sizes = [(h0, h0), (h0, h1), (h1, h0), (h1, h1)]
    ims = [_quadrant(im, hh, ww, "bicubic") for im, (hh, ww) in zip(images, sizes)]
    ms = [_quadrant(m.unsqueeze(0).float(), hh, ww, "bilinear")[0] for m, (hh, ww) in zip(masks, sizes)]
    image = torch.cat([torch.cat(ims[:2], dim=-1), torch.cat(ims[2:], dim=-1)], dim=-2)
    mask = torch.cat([torch.cat(ms[:2], dim=-1), torch.cat(ms[2:], dim=-1)], dim=-2)
    return image.contiguous(), (mask > 0.5).float()


class MosaicDataset(torch.utils.data.Dataset):
    """Wraps an :class:`~zsad.data.AnomalyDataset`; items keep its keys (image, mask, label, cls, path)."""

    def __init__(self, base, rate: float = 0.2, seed: int = 0, relabel: bool = True):
        if not 0.0 <= rate <= 1.0:
            raise ZsadError(f"mosaic rate must be in [0, 1], got {rate}")
        self.base = base
        self.rate = float(rate)
        self.seed = int(seed)
        self.relabel = bool(relabel)
        self.epoch = 0
        by_class = defaultdict(list)
        for i, s in enumerate(base.samples):
            by_class[s.cls].append(i)
        self.by_class = dict(by_class)
        self.samples = base.samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        item = self.base[index]
        if rng.random() >= self.rate:
            return item
        pool = self.by_class[self.base.samples[index].cls]
        picks = rng.choice(pool, size=4, replace=len(pool) < 4)
        parts = [self.base[int(j)] for j in picks]
        image, mask = mosaic([p["image"] for p in parts], [p["mask"] for p in parts])
        label = torch.tensor(int(mask.any()), dtype=torch.int64) if self.relabel else item["label"]
        return {**item, "image": image, "mask": mask, "label": label, "path": "mosaic:" + item["path"]}
