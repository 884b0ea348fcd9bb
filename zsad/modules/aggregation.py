"""AF-CLIP's multi-scale spatial aggregation (parameter-free), before the adaptor.

For every tapped token map and every kernel size r, the patch tokens (class token excluded) are laid out on
their g x g grid and each channel is filtered with a fixed, normalised r x r Gaussian
``w[i, j] ∝ exp(-(i^2 + j^2) / (2 sigma^2))`` (i, j in -r//2..r//2; sigma 4 for every r in AF-CLIP's released
code, which makes the kernels nearly box filters). r = 1 is the identity. The class token is passed through
untouched.

Borders (design spec afclip_bayespfl.md A1.2 / A8.2, see docs/methods/afclip.md): ``border="zero"`` (default, the
released code) pads with zeros and does not renormalise, so border patches are attenuated; ``border="renormalize"``
divides by the kernel mass that fell inside the image (a weighted mean over the valid neighbours), an option for
retraining.

Shapes: ``tokens`` [B, L, 1+N, D] (class token first, N = g*g) -> [B, L, R, 1+N, D] for R kernel sizes.
Plain conv2d with a constant kernel: exports to ONNX as Conv, static shapes apart from the batch axis.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError

BORDERS = ("zero", "renormalize")


def gaussian_kernel2d(size: int, sigma: float) -> torch.Tensor:
    """[size, size] Gaussian weights normalised to sum 1 (float64); size must be odd."""
    if size < 1 or size % 2 == 0:
        raise ZsadError(f"aggregation kernel sizes must be odd and >= 1, got {size}")
    if sigma <= 0:
        raise ZsadError(f"aggregation sigma must be positive, got {sigma}")
    x = torch.arange(size, dtype=torch.float64) - size // 2
    w = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2.0 * float(sigma) ** 2))
    return w / w.sum()


class MultiScaleAggregation(nn.Module):
    def __init__(self, kernel_sizes: Sequence[int] = (1, 3, 5), sigma: float = 4.0, border: str = "zero"):
        super().__init__()
        if border not in BORDERS:
            raise ZsadError(f"aggregation border must be one of {BORDERS}, got '{border}'")
        if not kernel_sizes:
            raise ZsadError("aggregation needs at least one kernel size")
        self.kernel_sizes = [int(r) for r in kernel_sizes]
        self.sigma = float(sigma)
        self.border = border
        for r in self.kernel_sizes:
            # [1,1,r,r] constants; not persistent: they follow from the config
            self.register_buffer(f"kernel_{r}", gaussian_kernel2d(r, sigma).float().view(1, 1, r, r), persistent=False)

    @property
    def scales(self) -> int:
        return len(self.kernel_sizes)

    def _filter(self, grid_maps: torch.Tensor, r: int) -> torch.Tensor:
        """grid_maps [M, g, g] (one channel per row) -> filtered [M, g, g]."""
        if r == 1:
            return grid_maps
        kernel = getattr(self, f"kernel_{r}").to(grid_maps.dtype)
        x = grid_maps.unsqueeze(1)
        y = F.conv2d(x, kernel, padding=r // 2)
        if self.border == "renormalize":
            ones = torch.ones_like(x[:1])
            y = y / F.conv2d(ones, kernel, padding=r // 2)
        return y.squeeze(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, n_layers, t, d = tokens.shape
        g = int(round(math.sqrt(t - 1)))
        if g * g != t - 1:
            raise ZsadError(f"aggregation expects 1 class token + a square patch grid, got {t} tokens")
        cls, patches = tokens[:, :, :1], tokens[:, :, 1:]
        grid_maps = patches.transpose(2, 3).reshape(-1, g, g)  # batch axis folded: -1 keeps it dynamic
        outs = []
        for r in self.kernel_sizes:
            y = self._filter(grid_maps, r).reshape(-1, n_layers, d, t - 1).transpose(2, 3)
            outs.append(torch.cat([cls, y], dim=2))
        return torch.stack(outs, dim=2)

    def extra_repr(self) -> str:
        return f"kernel_sizes={self.kernel_sizes}, sigma={self.sigma}, border={self.border}"
