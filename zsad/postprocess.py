"""Post-processing shared by the eager path and the exported/served graph: upsample, Gaussian smoothing, score.

One implementation, torch ops only, so that ``torch.onnx`` exports exactly what eager runs:

- ``upsample``: bilinear to S x S (``align_corners`` is a knob: AnomalyCLIP uses False, SOWA True);
- ``gaussian_blur``: separable Gaussian equal to ``scipy.ndimage.gaussian_filter(x, sigma, mode='reflect',
  truncate=4.0)`` per image. scipy's 'reflect' is the *symmetric* extension (edge sample repeated: d c b a | a b
  c d); torch's ``pad(mode='reflect')`` is numpy's 'reflect' (edge not repeated), close but not equal, so the
  border is built with a constant gather index instead (exports as Gather, and works when the kernel radius
  exceeds the image size, where scipy keeps reflecting);
- ``Postprocess``: the module a method's last stage is made of.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsad.modules.precision import as_fp32, fp32_region


def gaussian_radius(sigma: float, truncate: float = 4.0) -> int:
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None) -> torch.Tensor:
    """scipy's 1-D Gaussian weights: radius int(truncate*sigma + 0.5), normalised to sum 1 (float64)."""
    radius = gaussian_radius(sigma, truncate)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return w / w.sum()


def symmetric_index(n: int, radius: int, device=None) -> torch.Tensor:
    """Indices of a length-n axis extended by ``radius`` on both sides with scipy's 'reflect' rule."""
    i = torch.arange(-radius, n + radius, device=device)
    period = 2 * n
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - 1 - i, i)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Blur the last two axes of ``x`` [..., H, W] (sigma in pixels; sigma <= 0 returns x)."""
    if sigma <= 0:
        return x
    # fp32 under autocast (fp16 / bf16 inputs come out fp32): the half-precision weights no longer sum to 1 and the
    # maps' values (0..4 for four summed probabilities) would be rounded to bf16's 2^-6 steps
    with fp32_region(x):
        x = as_fp32(x)
        # weights and indices are made on x's device: a host-to-device copy here would break CUDA-graph capture
        kernel = gaussian_kernel1d(sigma, truncate, device=x.device).to(x.dtype)
        r = (kernel.numel() - 1) // 2
        lead, (h, w) = x.shape[:-2], x.shape[-2:]
        y = x.reshape(-1, 1, h, w)
        y = y.index_select(2, symmetric_index(h, r, device=x.device))
        y = F.conv2d(y, kernel.view(1, 1, -1, 1))
        y = y.index_select(3, symmetric_index(w, r, device=x.device))
        y = F.conv2d(y, kernel.view(1, 1, 1, -1))
        return y.reshape(*lead, h, w)


def upsample(patch_map: torch.Tensor, size: int, align_corners: bool = False) -> torch.Tensor:
    """[B,g,g] -> [B,size,size] bilinear."""
    return F.interpolate(patch_map.unsqueeze(1), size=(size, size), mode="bilinear",
                         align_corners=align_corners).squeeze(1)


class Postprocess(nn.Module):
    """Patch-grid anomaly map + image probability -> (score [B], anomaly_map [B,S,S]).

    score = image_prob + score_map_weight * max(anomaly_map) (the weight is 0 in AnomalyCLIP's protocol).
    """

    def __init__(self, image_size: int, sigma: float = 4.0, align_corners: bool = False,
                 score_map_weight: float = 0.0, truncate: float = 4.0):
        super().__init__()
        self.image_size = int(image_size)
        self.sigma = float(sigma)
        self.align_corners = bool(align_corners)
        self.score_map_weight = float(score_map_weight)
        self.truncate = float(truncate)

    def forward(self, image_prob: torch.Tensor, patch_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = gaussian_blur(upsample(patch_map, self.image_size, self.align_corners), self.sigma, self.truncate)
        score = image_prob
        if self.score_map_weight:
            score = score + self.score_map_weight * amap.flatten(1).amax(dim=1)
        return score, amap

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, sigma={self.sigma}, align_corners={self.align_corners}, "
                f"score_map_weight={self.score_map_weight}")
