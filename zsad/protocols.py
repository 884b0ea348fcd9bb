"""Evaluation protocols: ``zsad`` (deployable, the default) and ``paper`` (each method's released test script).

``zsad`` scores every image on its own (no test-set statistics), so the numbers are what a served model gives.
``paper`` reproduces where a method's released test script computes its tables differently; those steps use
statistics of the whole test set of a class, which no deployed model can know.

What a method's release does differently is the method's own knowledge: its class's ``paper_protocol``, a
:class:`PaperProtocol` whose hooks say its image scores, the per-image quantities they need, its ground-truth masks,
its class words, its few-shot draws, and one line per change for metrics.json. The methods' modules implement them
(zsad/methods/bayespfl_protocol.py, sowa.py, afclip.py; docs/methods/*.md quote the released files and lines); this
module holds the shared pieces and calls the hooks, and names no method. ``paper_aupro_mode`` (a Method attribute)
is the AUPRO definition of the method's tables.

All functions here are pure numpy over per-image quantities of ONE class, except :func:`forward_with_terms`,
which runs a method once and returns those quantities beside its usual outputs.
"""
from __future__ import annotations

import math
import re

import numpy as np

from zsad import ZsadError

PROTOCOLS = ("zsad", "paper")
# Data sets without masks (medical classification sets): where a release scores them differently it says so
CLASSIFICATION_ONLY_DATASETS = ("HeadCT", "BrainMRI", "Br35H")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ZsadError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def dataset_key(name: str | None) -> str:
    """A data-set name with spelling and case dropped ("MVTec AD" -> "mvtecad")."""
    return re.sub(r"[^a-z0-9]", "", (name or "").lower())


def is_classification_only(dataset: str | None) -> bool:
    """True for HeadCT, BrainMRI and Br35H (spelling and case ignored)."""
    return dataset_key(dataset) in {dataset_key(d) for d in CLASSIFICATION_ONLY_DATASETS}


def zsad_words(folder: str) -> str:
    """A class folder's words under the ``zsad`` rule: lower case, "_" -> " ", whitespace collapsed."""
    if not isinstance(folder, str) or not folder.strip():
        raise ZsadError(f"a class name must be a non-empty string, got {folder!r}")
    return " ".join(folder.strip().lower().replace("_", " ").split())


class PaperProtocol:
    """The hooks of a method's released test script; the defaults are zsad's own protocol (nothing changes).

    A method class sets ``paper_protocol = MyProtocol()``; zsad-eval calls the hooks under ``--protocol paper``
    (and ``class_words`` under either protocol, for methods whose prompts take the object's name)."""

    # seeds of the few-shot draws the paper's tables average (empty: the paper reports no such mean)
    draw_seeds: tuple[int, ...] = ()

    def class_words(self, folder: str, protocol: str = "zsad", dataset: str | None = None) -> str:
        """The words a class-aware prompt gets for the class folder ``folder`` under ``protocol``."""
        check_protocol(protocol)
        return zsad_words(folder)

    def mask_transform(self):
        """How ground-truth masks reach S x S under the paper protocol: (mask, size) -> float32; None = zsad's."""
        return None

    def pixel_metrics(self, dataset: str | None) -> bool:
        """Whether the paper reports pixel metrics on ``dataset``."""
        return True

    def extra_terms(self, method, env: dict) -> dict:
        """Per-image quantities (tensors [B]) beyond ``image_prob`` / ``map_max`` that ``image_scores`` needs, from
        the stage chain's tensors ``env``."""
        return {}

    def image_scores(self, cls: str, terms: dict, dataset: str | None, shots: int) -> np.ndarray | None:
        """The image scores of one class from its per-image ``terms``; None = zsad's own per-image score."""
        return None

    def describe(self, dataset: str | None, shots: int) -> list[str]:
        """What this protocol changes for a run, one line each (besides the AUPRO mode and the draws)."""
        return []


def paper_protocol(method) -> PaperProtocol:
    """The released test script's hooks of a method (instance or class)."""
    return getattr(method, "paper_protocol", None) or PaperProtocol()


def class_words(method, folder: str, protocol: str = "zsad", dataset: str | None = None) -> str:
    return paper_protocol(method).class_words(folder, protocol, dataset)


def mask_transform(method, protocol: str):
    """How ground-truth masks reach S x S for ``method`` under ``protocol``: a function (mask, size) -> float32."""
    from zsad.data.transforms import preprocess_mask

    check_protocol(protocol)
    own = paper_protocol(method).mask_transform() if protocol == "paper" else None
    return own or preprocess_mask


def paper_image_scores(method, cls: str, terms: dict, *, dataset: str | None = None,
                       shots: int = 0) -> np.ndarray | None:
    """The image scores of one class as ``method``'s released test script computes them, from the per-image
    ``terms`` of :func:`forward_with_terms`; None where that score is zsad's own per-image score."""
    return paper_protocol(method).image_scores(cls, terms, dataset, shots)


def paper_aupro_mode(method) -> str:
    """The AUPRO definition ``method``'s paper tables use (the value of --aupro-mode under --protocol paper)."""
    return getattr(method, "paper_aupro_mode", "anomalyclip")


def paper_draw_seeds(method) -> tuple[int, ...]:
    """Seeds of the few-shot draws a paper averages."""
    seeds = paper_protocol(method).draw_seeds
    if not seeds:
        raise ZsadError(f"{method.name} reports no few-shot mean over draws")
    return seeds


def describe(method, dataset: str | None = None, shots: int = 0) -> list[str]:
    """What ``--protocol paper`` changes for this run, one line each (written to metrics.json)."""
    proto = paper_protocol(method)
    lines = [f"AUPRO mode '{paper_aupro_mode(method)}'", *proto.describe(dataset, shots)]
    if shots and proto.draw_seeds:
        lines.append(f"mean and std over the draws with seeds {list(proto.draw_seeds)}")
    return lines


# -- per-class normalisation ---------------------------------------------------------------------------------------
def minmax(values, eps: float = 0.0) -> np.ndarray:
    """``(x - min) / (max - min + eps)`` over the images of one class; all zeros when every value is equal.

    (The released SOWA code divides 0 by 0 there, which then fails in sklearn; Bayes-PFL's eps gives zeros.)
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ZsadError(f"expected a non-empty 1-D array of per-image values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ZsadError("per-image values contain NaN or inf")
    span = float(x.max() - x.min())
    if span == 0.0:
        return np.zeros_like(x)
    return (x - x.min()) / (span + eps)


def same_length(*arrays) -> None:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ZsadError(f"per-image arrays differ in length: {sorted(lengths)}")


# -- few-shot draws ------------------------------------------------------------------------------------------------
def mean_std(per_draw: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Per metric, (mean, population std) over the draws' class-mean values; NaN draws are left out."""
    if not per_draw:
        raise ZsadError("no draws to average")
    out = {}
    for metric in sorted({k for d in per_draw for k in d}):
        vals = [float(d[metric]) for d in per_draw if d.get(metric) is not None and not math.isnan(d[metric])]
        out[metric] = (float(np.mean(vals)), float(np.std(vals))) if vals else (math.nan, math.nan)
    return out


# -- the per-image quantities --------------------------------------------------------------------------------------
def forward_with_terms(method, images, class_names=None):
    """One pass of ``method`` -> (score [B], anomaly_map [B,S,S], terms) with numpy per-image ``terms``:

    ``image_prob`` (the text / class-token probability, where the method has one), ``map_max`` (max of the final
    map) and whatever the method's paper protocol adds (``PaperProtocol.extra_terms``: Bayes-PFL's s_text and
    top-k means). score and anomaly_map are exactly ``method(images, class_names)``'s (the same stage chain).
    """
    from zsad.methods.stages import run_stages

    env = run_stages(method.stages(), **method.stage_inputs(images, class_names))
    score, amap = env["score"], env["anomaly_map"]
    terms = {"map_max": amap.flatten(1).amax(dim=1)}
    if "image_prob" in env:
        terms["image_prob"] = env["image_prob"]
    terms.update(paper_protocol(method).extra_terms(method, env))
    return score, amap, {k: v.detach().float().cpu().numpy().astype(np.float64) for k, v in terms.items()}
