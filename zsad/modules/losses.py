"""Segmentation losses on probability maps (AnomalyCLIP's, also used by SOWA and BAG-CLIP).

- ``focal_loss``: focal loss on 2-class probabilities [B,2,H,W] against a binary mask, gamma 2, with
  AnomalyCLIP's label smoothing: the one-hot target is clamped to [eps, 1-eps] and eps is added to p_t before
  the log (eps = 1e-5). Mean over pixels.
- ``dice_loss``: 1 - mean over the batch of (2|X∩Y| + 1) / (|X| + |Y| + 1) (smooth = 1).
"""
from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """``probs`` [B,C,H,W] (softmax output), ``target`` [B,H,W] with class indices (0/1)."""
    c = probs.shape[1]
    onehot = torch.nn.functional.one_hot(target.long(), c).permute(0, 3, 1, 2).to(probs.dtype)
    onehot = onehot.clamp(eps / (c - 1), 1.0 - eps)
    pt = (onehot * probs).sum(dim=1) + eps
    return (-(1.0 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``prob`` and ``target`` [B,H,W]."""
    p = prob.flatten(1)
    t = target.flatten(1).to(p.dtype)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1.0 - dice.mean()
