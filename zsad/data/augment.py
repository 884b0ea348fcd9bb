"""Training-time data augmentation: the 2x2 mosaic of APRIL-GAN as SOWA and Bayes-PFL release it.

Released code (huzongxiang/sowa src/data/components/anomal_dataset.py ``_combine_img``; xiaozhen228/Bayes-PFL
datasets.py ``combine_img``): with probability ``rate`` a training item is replaced by 4 images of its class,
read at full resolution, pasted row-major into a canvas twice the first image's width and height (masks
binarised > 0 and pasted the same way), and the canvas is then resized ONCE to the model's input size. How the 4
are drawn differs:

- ``draw="defect_type"`` (SOWA): per tile a defect type of the class (a test folder, ``good`` included) first,
  uniformly, then an image of that type; the item keeps the drawn item's label (``relabel=False``, the code's
  quirk) or gets ``any(mask)`` (``relabel=True``);
- ``draw="anomalous"`` (Bayes-PFL): per tile an anomalous image of the class, uniformly; the label is 1.

``soft_masks`` (SOWA: its masks count as positive at > 0): every item's mask (mosaic or not) is the 0/255 mask
resized bilinearly as an 8-bit image and divided by 255 (torchvision's Resize + ToTensor on a PIL "L" mask), so
any pixel a defect edge touches is > 0; without it masks are zsad's usual binary ones (bilinear, > 0.5).

The draws depend only on (seed, epoch, index): ``set_epoch`` is called by the training loop, so runs (and
resumed runs) are reproducible with any number of DataLoader workers.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from zsad import ZsadError

MOSAIC_DRAWS = ("defect_type", "anomalous")


def mosaic(images: list[Image.Image], masks: list[np.ndarray]) -> tuple[Image.Image, Image.Image]:
    """Paste 4 RGB images (and bool masks [H, W]) row-major into a 2W x 2H canvas, W x H the first image's size.

    Returns the canvas and its "L" mask (0 / 255). Tiles of another size are pasted at the same corners, as the
    released code does (a larger tile is cut off by the canvas, a smaller one leaves black).
    """
    if len(images) != 4 or len(masks) != 4:
        raise ZsadError("a mosaic needs exactly 4 images and 4 masks")
    w, h = images[0].size
    canvas, canvas_mask = Image.new("RGB", (2 * w, 2 * h)), Image.new("L", (2 * w, 2 * h))
    for i, (img, m) in enumerate(zip(images, masks, strict=True)):
        corner = ((i % 2) * w, (i // 2) * h)
        canvas.paste(img.convert("RGB"), corner)
        canvas_mask.paste(Image.fromarray(np.asarray(m, dtype=bool).astype(np.uint8) * 255), corner)
    return canvas, canvas_mask


def soft_mask(mask: Image.Image, size: int) -> np.ndarray:
    """An "L" 0/255 mask -> float32 [size, size] in [0, 1]: bilinear on 8 bits, / 255 (positive at > 0)."""
    return np.asarray(mask.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


class MosaicDataset(torch.utils.data.Dataset):
    """Wraps an :class:`~zsad.data.AnomalyDataset`; items keep its keys (image, mask, label, cls, path)."""

    def __init__(self, base, rate: float = 0.2, seed: int = 0, relabel: bool = True, draw: str = "defect_type",
                 soft_masks: bool = False):
        if not 0.0 <= rate <= 1.0:
            raise ZsadError(f"mosaic rate must be in [0, 1], got {rate}")
        if draw not in MOSAIC_DRAWS:
            raise ZsadError(f"mosaic draw must be one of {MOSAIC_DRAWS}, got '{draw}'")
        self.base = base
        self.rate = float(rate)
        self.seed = int(seed)
        self.relabel = bool(relabel)
        self.draw = draw
        self.soft_masks = bool(soft_masks)
        self.epoch = 0
        # class -> defect type -> sample indices (sorted, so the draws do not depend on the listing order)
        pools: defaultdict[str, defaultdict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, s in enumerate(base.samples):
            pools[s.cls][s.defect if s.label else "good"].append(i)
        self.pools = {c: dict(sorted(d.items())) for c, d in pools.items()}
        self.samples = base.samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _picks(self, rng, cls: str) -> list[int] | None:
        pool = self.pools[cls]
        if self.draw == "anomalous":
            anomalous = [i for d, idx in pool.items() if d != "good" for i in idx]
            return [anomalous[rng.integers(len(anomalous))] for _ in range(4)] if anomalous else None
        types, picks = list(pool), []
        for _ in range(4):  # a defect type first, then an image of it
            of_type = pool[types[rng.integers(len(types))]]
            picks.append(of_type[rng.integers(len(of_type))])
        return picks

    def _full_mask(self, sample, size_wh) -> np.ndarray:
        from zsad.data.io import read_mask

        return read_mask(sample.mask) if sample.mask is not None else np.zeros(size_wh[::-1], dtype=bool)

    def __getitem__(self, index: int) -> dict:
        from zsad.data import preprocess, read_image

        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        sample = self.base.samples[index]
        size = self.base.image_size
        picks = self._picks(rng, sample.cls) if rng.random() < self.rate else None
        item = self.base[index]
        if picks is None:
            if self.soft_masks and sample.mask is not None:
                full = Image.fromarray(self._full_mask(sample, None).astype(np.uint8) * 255)
                item = {**item, "mask": torch.from_numpy(soft_mask(full, size))}
            return item
        parts = [self.base.samples[j] for j in picks]
        images = [read_image(p.image) for p in parts]
        canvas, canvas_mask = mosaic(images, [self._full_mask(p, im.size) for p, im in zip(parts, images, strict=True)])
        if self.soft_masks:
            mask_array = soft_mask(canvas_mask, size)
        else:
            from zsad.data.transforms import preprocess_mask

            mask_array = preprocess_mask(np.asarray(canvas_mask) > 0, size)
        mask = torch.from_numpy(mask_array)
        if self.draw == "anomalous":
            label = torch.tensor(1, dtype=torch.int64)
        else:
            label = torch.tensor(int(bool(mask.any())), dtype=torch.int64) if self.relabel else item["label"]
        image = torch.from_numpy(preprocess(canvas, size, self.base.mean, self.base.std))
        return {**item, "image": image, "mask": mask, "label": label, "path": "mosaic:" + item["path"]}
