"""Segmentation losses on probability maps (AnomalyCLIP's, also used by SOWA and BAG-CLIP).

- ``focal_loss``: focal loss on 2-class probabilities [B,2,H,W] against a binary mask, gamma 2, with
  AnomalyCLIP's label smoothing: the one-hot target is clamped to [eps, 1-eps] and eps is added to p_t before
  the log (eps = 1e-5). Mean over pixels, or (``reduction="balanced"``, Bayes-PFL) the foreground mean plus the
  background mean.
- ``dice_loss``: 1 - mean over the batch of (2|X∩Y| + 1) / (|X| + |Y| + 1) (smooth = 1); ``pooled=True`` (Bayes-PFL,
  smooth 1e-5) takes one dice over the whole batch.
- ``layered_focal_dice``: focal + both dice terms summed over the tapped layers (AnomalyCLIP, SOWA).
- ``binary_focal_loss``: the same focal loss for a single anomaly probability of any shape (AF-CLIP's image
  and map terms, gamma 4): ``focal_loss`` on the stacked (1 - p, p).
- ``patch_alignment_loss``: AF-CLIP's L_pal on L2-normalised patch features: max(0, mean cos over
  normal-anomalous pairs - mean cos over same-label pairs), pairs taken within each image and pooled over the
  batch (self pairs included), 0 where the batch has no such pair.
"""
from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5,
               reduction: str = "mean") -> torch.Tensor:
    """``probs`` [B,C,H,W] (softmax output), ``target`` [B,H,W] with class indices (0/1).

    ``reduction``: ``mean`` over all pixels, or ``balanced`` (Bayes-PFL): the mean over target > 0 pixels plus the
    mean over target == 0 pixels (a term without pixels counts 0).
    """
    c = probs.shape[1]
    onehot = torch.nn.functional.one_hot(target.long(), c).permute(0, 3, 1, 2).to(probs.dtype)
    onehot = onehot.clamp(eps / (c - 1), 1.0 - eps)
    pt = (onehot * probs).sum(dim=1) + eps
    loss = -(1.0 - pt).pow(gamma) * pt.log()
    if reduction == "mean":
        return loss.mean()
    if reduction != "balanced":
        raise ValueError(f"focal_loss reduction must be 'mean' or 'balanced', got '{reduction}'")
    fg = (target > 0).to(loss.dtype)
    return (loss * fg).sum() / fg.sum().clamp(min=1.0) + (loss * (1.0 - fg)).sum() / (1.0 - fg).sum().clamp(min=1.0)


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, pooled: bool = False) -> torch.Tensor:
    """``prob`` and ``target`` [B,H,W]. ``pooled``: one dice over the whole batch (Bayes-PFL) instead of the mean
    of per-image dice."""
    p = prob.flatten(1)
    t = target.flatten(1).to(p.dtype)
    if pooled:
        p, t = p.reshape(1, -1), t.reshape(1, -1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1.0 - dice.mean()


def layered_focal_dice(probs: torch.Tensor, target: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AnomalyCLIP's segmentation terms over layers: ``probs`` [B,L,2,H,W] (normal, abnormal), ``target`` [B,H,W].

    Returns (sum over layers of ``focal_loss``, sum over layers of dice(abnormal, target) + dice(normal, 1 - target)).
    """
    layers = range(probs.shape[1])
    zero = probs.new_zeros(())  # start of the sums: a tensor even for zero layers
    focal = sum((focal_loss(probs[:, i], target, gamma=gamma) for i in layers), zero)
    dice = sum((dice_loss(probs[:, i, 1], target) + dice_loss(probs[:, i, 0], 1 - target) for i in layers), zero)
    return focal, dice


def binary_focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """``prob`` (anomaly probability) and ``target`` (0/1) of the same shape [B, ...]; mean over all elements."""
    p = prob.reshape(prob.shape[0], 1, 1, -1)  # [B, 1, 1, M]: focal_loss wants [B, C, H, W]
    return focal_loss(torch.cat([1.0 - p, p], dim=1), target.reshape(p.shape[0], 1, -1), gamma=gamma, eps=eps)


def patch_alignment_loss(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``features`` [B, N, E] (L2-normalised), ``mask`` [B, N] in {0, 1} -> scalar.

    Uses sum_{i,j in S} <z_i, z_j> = ||sum_{i in S} z_i||^2, so no N x N similarity matrix is built: per image,
    same-label pairs sum to ||s_a||^2 + ||s_n||^2 over n_a^2 + n_n^2 pairs and mixed pairs to 2 <s_a, s_n> over
    2 n_a n_n pairs (s = the feature sums of the anomalous / normal patches).
    """
    m = mask.to(features.dtype).unsqueeze(-1)
    s_a = (features * m).sum(dim=1)
    s_n = (features * (1.0 - m)).sum(dim=1)
    n_a = m.sum(dim=(1, 2))
    n_n = features.shape[1] - n_a
    mixed_pairs = (2.0 * n_a * n_n).sum()
    if float(mixed_pairs) == 0.0:
        return features.sum() * 0.0  # no normal-anomalous pair in the batch (keeps the graph)
    mixed = (2.0 * (s_a * s_n).sum(dim=-1)).sum() / mixed_pairs
    same = ((s_a * s_a).sum(dim=-1) + (s_n * s_n).sum(dim=-1)).sum() / (n_a * n_a + n_n * n_n).sum()
    return torch.clamp(mixed - same, min=0.0)
