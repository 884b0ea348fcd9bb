"""Local inference without a server: image files or uint8 arrays -> per-image score and anomaly map at the image's size.

    predictor = Predictor.from_checkpoint("runs/bag-mvtec", device="cuda")
    results = predictor.predict(["a.png", "b.jpg"])            # or uint8 HxWx3 arrays; class_names= for Bayes-PFL
    results[0].score, results[0].anomaly_map                   # float, float32 [H, W] of a.png

The pre- and post-processing are the served ensemble's own functions: :func:`zsad.data.decode_image` and
:func:`zsad.data.preprocess` (with the mean/std the export writes into the ``preprocess`` model) as the
``preprocess`` python model runs them, and :func:`zsad.data.transforms.resize_map` as the ``restore`` model runs it,
so a local answer equals the answer of an ensemble exported with ``--resize-to-input``. The command ``zsad-predict``
around it is :mod:`zsad.predict_cli`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zsad import ZsadError, per_image_names
from zsad.data import CLIP_MEAN, CLIP_STD, decode_image, preprocess
from zsad.data.transforms import resize_map


@dataclass
class Prediction:
    """One image's answer, local (``Predictor``) or served (``zsad.serve.client.AnomalyClient``)."""
    score: float
    # float32 [H, W]: the input image's own size (served: the model resolution unless the export resizes back)
    anomaly_map: np.ndarray
    source: str = ""
    # served only: further outputs asked for by name (``infer(..., outputs=[...])``), this image's slice of each
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def _load(image, label: str) -> np.ndarray:
    """A path, encoded bytes or a uint8 array -> uint8 [H, W, 3] (arrays: as the served raw ensemble takes them)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ZsadError(f"image not found: {path}")
        return np.asarray(decode_image(path.read_bytes(), max_pixels=None, label=f"image {path}"))
    if isinstance(image, (bytes, bytearray)):
        return np.asarray(decode_image(bytes(image), max_pixels=None, label=label))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
            raise ZsadError(f"{label}: arrays must be uint8 [H,W,3], got {image.dtype} {list(image.shape)}")
        return image
    raise ZsadError(f"{label}: expected a file path, encoded image bytes or a uint8 [H,W,3] array, "
                    f"got {type(image).__name__}")


class Predictor:
    """A method in eval mode plus the served pre/post-processing. ``batch_size`` images go through it at once."""

    def __init__(self, method, device: str = "cpu", batch_size: int = 8):
        import torch

        if batch_size < 1:
            raise ZsadError(f"batch_size must be >= 1, got {batch_size}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ZsadError(f"device {device}: CUDA is not available on this machine (use device='cpu')")
        try:
            self.device = torch.device(device)
        except RuntimeError as err:
            raise ZsadError(f"unknown device {device!r} (cpu, cuda, cuda:1, ...)") from err
        self.method = method.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.image_size = method.image_size
        self.takes_class_name = bool(method.text_inputs())

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "cpu", clip_weights: str | Path | None = None,
                        batch_size: int = 8) -> Predictor:
        """Rebuild the method of a checkpoint (what train/run.py or zsad-import wrote, or a released file) for
        inference."""
        from zsad.load import load

        return cls(load(checkpoint, clip_weights=clip_weights).method, device, batch_size)

    def predict(self, images: Sequence, class_names: str | Sequence[str] | None = None) -> list[Prediction]:
        """Score ``images`` (file paths, encoded bytes, or uint8 [H,W,3] arrays of any sizes, mixed freely).

        ``class_names`` (one per image, or one str for all) is required by methods whose prompts use the object's
        name (Bayes-PFL), as the served ensemble requires it, and ignored by the others.
        """
        images = list(images)
        if self.takes_class_name:
            if class_names is None:
                raise ZsadError(f"{self.method.name} takes the object's class name with every image: pass "
                                f"class_names (zsad-predict --class-name)")
            names = per_image_names(class_names, len(images))
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            kwargs = {"class_names": names[start:start + len(chunk)]} if self.takes_class_name else {}
            out += self._predict_batch(chunk, start, **kwargs)
        return out

    def _predict_batch(self, images: list, start: int, **kwargs) -> list[Prediction]:
        import torch

        labels = [str(im) if isinstance(im, (str, Path)) else f"#{start + k}" for k, im in enumerate(images)]
        arrays = [_load(im, label) for im, label in zip(images, labels, strict=True)]
        x = np.stack([preprocess(a, self.image_size, CLIP_MEAN, CLIP_STD) for a in arrays])
        with torch.no_grad():
            res = self.method(torch.from_numpy(x).to(self.device), **kwargs)
        scores = res.score.float().cpu().numpy()
        maps = res.anomaly_map.float().cpu().numpy()
        return [Prediction(float(s), resize_map(m, *a.shape[:2]), label)
                for s, m, a, label in zip(scores, maps, arrays, labels, strict=True)]
