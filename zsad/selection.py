"""Discrete stage outputs (a top-k selection) and the tie rule every comparison applies to them.

A stage that selects (BAG-CLIP's kNN neighbours today; any argmax / top-k a later method adds) is a discontinuous
function of its inputs: where two candidates' scores are nearly equal, a ~1e-7 difference between runtimes (another
GEMM accumulation order, a fused kernel, a lower precision) picks the other one, and everything downstream of the
selection moves by far more than any float tolerance. Such a stage declares the selection as its own output, with
a :class:`TopKSelection` that says how it was made (``Stage.selections``). Comparisons then

1. accept a differing selection only where it is a **near-tie**: the other runtime's choice must be the top-k of
   some scores within ``eps`` of the reference's own (``TopKSelection.check``), and
2. compare everything after the selection with the reference recomputed on the *other runtime's* selection
   (``zsad.export.parity.reference_on_selections``), at the ordinary tolerance.

So a correct export of a trained model passes, while a swap that is no near-tie, a wrong k, a wrong similarity, or a
coarser rounding than declared still fails, and so does any continuous error after the selection.

Rule of a top-k selection, per row r of the scores s [B,R,M]: round s to multiples of 2^-resolution_bits (half to
even; 0 = no rounding), exclude column r where ``exclude_self``, take the k largest, lowest column first among
equal values. The check is exact for that rule: pushing every chosen candidate's score up by eps and every other
one's down by eps is the most favourable perturbation, so the choice E is explained iff, under it, the worst
chosen key (rounded score, then lower index) still beats the best unchosen key.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SelectionCheck:
    """How one selection tensor compared with the reference's."""

    rows: int  # rows (selections) compared
    differing: int  # rows whose chosen set differs from the reference's
    unexplained: int  # differing rows that are no near-tie within eps (any > 0 fails)
    # largest score gap the other runtime's choice crossed over the differing rows (best unchosen - worst chosen, raw
    # scores; negative where the choice lost only to the rounding or the index rule; 0 when none differ)
    max_gap: float
    eps: float  # the score perturbation allowed
    first_bad: str = ""  # where the first unexplained row is, for the error message

    @property
    def ok(self) -> bool:
        return self.unexplained == 0


@dataclass(frozen=True)
class TopKSelection:
    """A stage output [B,R,k] (integer column indices) holding, per row, the top-k of ``scores(source)`` [B,R,M].

    ``source`` names the stage tensor (an input or an output of the stage) the scores are computed from, and
    ``scores`` maps it to the raw scores before rounding (BAG-CLIP: the cosine similarity of the fused patch
    features). The order of the k indices in a row does not matter."""

    source: str
    scores: Callable[[torch.Tensor], torch.Tensor]
    k: int
    resolution_bits: int = 0
    exclude_self: bool = True

    def raw_scores(self, source: np.ndarray | torch.Tensor) -> np.ndarray:
        """The scores in float64 (computed in float64, so the reference's own rounding does not enter)."""
        t = torch.as_tensor(np.asarray(source)).to(torch.float64)
        with torch.no_grad():
            return self.scores(t).numpy()

    def _round(self, s: np.ndarray) -> np.ndarray:
        if not self.resolution_bits:
            return s
        scale = float(2 ** int(self.resolution_bits))
        return np.round(s * scale) / scale  # numpy rounds half to even, as torch.round does

    def check(self, scores: np.ndarray, ref: np.ndarray, got: np.ndarray, eps: float) -> SelectionCheck:
        """Compare the selection ``got`` with ``ref`` (both [B,R,k]) made on ``scores`` [B,R,M] (the reference's)."""
        scores = np.asarray(scores, np.float64)
        ref, got = np.asarray(ref), np.asarray(got)
        b, r, m = scores.shape
        shape = (b, r, self.k)
        if ref.shape != shape:
            raise ValueError(f"reference selection has shape {ref.shape}, its scores make {shape}")
        if got.shape != shape:
            return SelectionCheck(b * r, b * r, b * r, float("inf"), eps, f"shape {got.shape} != {shape}")
        if not np.issubdtype(got.dtype, np.integer):
            return SelectionCheck(b * r, b * r, b * r, float("inf"), eps, f"dtype {got.dtype} is not an index type")
        got_sorted, ref_sorted = np.sort(got, axis=-1), np.sort(ref, axis=-1)
        differing = np.argwhere((got_sorted != ref_sorted).any(axis=-1))
        unexplained, gaps, first_bad = 0, [], ""
        cols = np.arange(m)
        for bi, ri in differing:
            chosen = got_sorted[bi, ri]
            why = self._invalid(chosen, ri, m)
            if not why:
                is_chosen = np.zeros(m, bool)
                is_chosen[chosen] = True
                others = ~is_chosen
                if self.exclude_self:
                    others[ri] = False
                s = scores[bi, ri]
                gaps.append(float(s[others].max() - s[is_chosen].min()))
                # most favourable perturbation: chosen scores up by eps, the others down by eps
                hi, lo = self._round(s + eps), self._round(s - eps)
                worst_q = hi[is_chosen].min()
                worst_idx = cols[is_chosen & (hi == worst_q)].max()  # among equal keys the higher index ranks lower
                best_q = lo[others].max()
                best_idx = cols[others & (lo == best_q)].min()
                if worst_q > best_q or (worst_q == best_q and worst_idx < best_idx):
                    continue
                why = (f"column {best_idx} (score {s[best_idx]:.7g}) was left out for column {worst_idx} "
                       f"(score {s[worst_idx]:.7g}): a gap of {s[best_idx] - s[worst_idx]:.3g}, no near-tie within "
                       f"{eps:.3g}")
            unexplained += 1
            first_bad = first_bad or f"image {bi}, row {ri}: {why}"
        max_gap = float("inf") if len(gaps) < len(differing) else max(gaps, default=0.0)  # inf: an invalid choice
        return SelectionCheck(b * r, len(differing), unexplained, max_gap, eps, first_bad)

    def _invalid(self, chosen: np.ndarray, row: int, m: int) -> str:
        """Why a chosen index set can be no top-k of this rule at all ("" when it can)."""
        if chosen.min() < 0 or chosen.max() >= m:
            return f"an index outside 0..{m - 1}"
        if len(np.unique(chosen)) != len(chosen):
            return "a column chosen twice"
        if self.exclude_self and row in chosen:
            return "the row itself chosen"
        return ""
