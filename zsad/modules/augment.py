"""On-device training augmentation of a normalised image batch and its masks (Bayes-PFL's albumentations recipe).

Each transform is applied per sample with its own probability, in this order (the released pipeline):

1. Rotate(+-``rotate_limit`` degrees): bilinear for the image, nearest for the mask, reflected border;
2. RandomRotate90: k quarter turns, k uniform in {0,1,2,3};
3. RandomBrightnessContrast: x * (1 + c) + b, c, b uniform in +-0.2 (brightness by the max value, i.e. 1);
4. GaussNoise: per-pixel N(0, var) with var uniform in [10, 50] / 255^2;
5. OneOf[Blur(3x3 box), ColorJitter(brightness/contrast/saturation 0.2, hue 0.2), GaussianBlur(kernel 3/5/7)].

Photometric steps work on [0, 1] pixels (the batch is de-normalised with the CLIP mean/std and re-normalised), and
touch the image only; geometric steps move image and mask together. Randomness comes from torch's global RNG,
which the training loop seeds per epoch, so a resumed run draws the same augmentations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zsad.data.transforms import CLIP_MEAN, CLIP_STD


@dataclass
class AugmentConfig:
    enabled: bool
    rotate_p: float = 0.5
    rotate_limit: float = 30.0
    rot90_p: float = 0.5
    brightness_contrast_p: float = 0.5
    brightness_contrast_limit: float = 0.2
    noise_p: float = 0.5
    noise_var: tuple[float, float] = (10.0, 50.0)  # on the 0..255 scale, as albumentations
    blur_jitter_p: float = 0.5
    # the 2x2 mosaic of 4 anomalous images of the class (zsad.data.augment, draw "anomalous"), drawn per item before
    # the steps above, only when training on one of mosaic_datasets (code: p = 0.4 on MVTec AD); independent of
    # ``enabled``, as in the released code
    mosaic_rate: float = 0.0
    mosaic_datasets: tuple[str, ...] = ("MVTec AD",)


def _gaussian_kernel(size: int) -> torch.Tensor:
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a given kernel size (sigma_limit 0)
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    return torch.outer(k, k)


def _filter(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """img [3,H,W], kernel [k,k] -> same-size depthwise filter with reflected borders."""
    k = kernel.shape[-1]
    x = F.pad(img.unsqueeze(0), (k // 2,) * 4, mode="reflect")
    return F.conv2d(x, kernel.to(img).expand(3, 1, k, k), groups=3).squeeze(0)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)


def _color_jitter(img: torch.Tensor, amount: float = 0.2) -> torch.Tensor:
    def factor():
        return float(torch.empty(()).uniform_(1 - amount, 1 + amount))

    img = (img * factor()).clamp(0, 1)
    mean = _grayscale(img).mean()
    img = ((img - mean) * factor() + mean).clamp(0, 1)
    gray = _grayscale(img)
    img = ((img - gray) * factor() + gray).clamp(0, 1)
    # hue: rotate the chroma plane of YIQ by up to +-amount of a full turn
    theta = float(torch.empty(()).uniform_(-amount, amount)) * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=img.dtype)
    rot = torch.tensor([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)], [0, math.sin(theta), math.cos(theta)]],
                       dtype=img.dtype)
    m = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(img.device)
    return torch.einsum("ij,jhw->ihw", m, img).clamp(0, 1)


class BatchAugment:
    def __init__(self, config: AugmentConfig, mean=CLIP_MEAN, std=CLIP_STD):
        self.config = config
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,S,S] (CLIP-normalised), masks [B,S,S] -> augmented copies."""
        c = self.config
        if not c.enabled:
            return images, masks
        b = images.shape[0]
        mean, std = self.mean.to(images), self.std.to(images)
        x = images * std + mean
        m = masks.unsqueeze(1).to(images.dtype)
        dev = images.device

        # 1. rotation by a random angle (identity where not drawn)
        angle = torch.empty(b).uniform_(-c.rotate_limit, c.rotate_limit) * (torch.rand(b) < c.rotate_p)
        rad = angle * math.pi / 180
        cos, sin = torch.cos(rad), torch.sin(rad)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1),
                             torch.stack([sin, cos, torch.zeros(b)], 1)], 1).to(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        m = F.grid_sample(m, grid, mode="nearest", padding_mode="reflection", align_corners=False)

        # 2. quarter turns
        k = torch.randint(0, 4, (b,)) * (torch.rand(b) < c.rot90_p)
        x = torch.stack([torch.rot90(x[i], int(k[i]), dims=(1, 2)) for i in range(b)])
        m = torch.stack([torch.rot90(m[i], int(k[i]), dims=(1, 2)) for i in range(b)])

        # 3. brightness / contrast
        on = (torch.rand(b) < c.brightness_contrast_p).to(x).view(b, 1, 1, 1)
        lim = c.brightness_contrast_limit
        alpha = 1 + torch.empty(b).uniform_(-lim, lim).to(x).view(b, 1, 1, 1) * on
        beta = torch.empty(b).uniform_(-lim, lim).to(x).view(b, 1, 1, 1) * on
        x = (x * alpha + beta).clamp(0, 1)

        # 4. Gaussian noise
        on = (torch.rand(b) < c.noise_p).to(x).view(b, 1, 1, 1)
        sd = torch.empty(b).uniform_(*c.noise_var).sqrt().to(x).view(b, 1, 1, 1) / 255.0
        x = (x + torch.randn(x.shape, dtype=x.dtype).to(dev) * sd * on).clamp(0, 1)

        # 5. one of box blur / colour jitter / Gaussian blur
        which = torch.randint(0, 3, (b,))
        on = torch.rand(b) < c.blur_jitter_p
        out = []
        for i in range(b):
            xi = x[i]
            if on[i]:
                if which[i] == 0:
                    xi = _filter(xi, torch.full((3, 3), 1 / 9))
                elif which[i] == 1:
                    xi = _color_jitter(xi)
                else:
                    xi = _filter(xi, _gaussian_kernel(int(torch.randint(1, 4, ())) * 2 + 1))
            out.append(xi)
        x = torch.stack(out)
        return (x - mean) / std, m.squeeze(1).to(masks.dtype)
