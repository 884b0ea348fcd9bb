"""Evaluation protocols: ``zsad`` (deployable, the default) and ``paper`` (each method's released test script).

``zsad`` scores every image on its own (no test-set statistics), so the numbers are what a served model gives.
``paper`` reproduces where a method's released test script computes its tables differently; those steps use
statistics of the whole test set of a class, which no deployed model can know. Per method (docs/methods/*.md
quote the released files and lines):

* Bayes-PFL (xiaozhen228/Bayes-PFL, models/metric_and_visualization.py ``calcuate_metric_pixel`` /
  ``calcuate_metric_image``, called with alpha 0.5 by test.py): s_img = the mean of the top-k values of the
  *unsmoothed* map, k = 20 for the classes of :data:`BAYESPFL_TOPK20_CLASSES`, else 2000; s_text and s_img are
  each min-max normalised over the test images of the class (``(x - min) / (max - min + 1e-8)``), then mixed
  0.5 / 0.5; on HeadCT, BrainMRI and Br35H (no masks) the score is the normalised s_text alone. AUPRO: the
  pooled-FPR definition (``aupro_mode`` "anomalyclip"; the released metric code has it commented out and reports 0).
* SOWA (huzongxiang/sowa, src/models/anomaly_clip_module.py ``on_test_epoch_end``): in K-shot mode the image score
  is 0.5 (p + min-max over the class of max(final map)), p the text probability; zero-shot it is p alone (as
  zsad). AUPRO: the mean of per-image FPRs (``aupro_mode`` "sowa", src/utils/metrics.py ``cal_pro_score``).
  zsad's K-shot tables are the mean and std over draws seeded :data:`SOWA_EVAL_SEEDS`, the seeds
  scripts/infer_data.sh passes; the released src/eval.py never applies them (no seed_everything), so its own draws
  are unseeded: one per K on MVTec AD / VisA (infer_auto.sh), ten elsewhere (docs/methods/sowa.md).
* AF-CLIP (Faustinaqq/AF-CLIP, util/utils.py ``compute_pro``): AUPRO with the kept FPRs divided by their maximum
  instead of min-max rescaled (``aupro_mode`` "afclip"). Its scores are per image, as zsad's; AF-CLIP+ few-shot
  tables are the mean and std over five random draws of the shots (no seeds given: zsad draws with seeds 0..4).
  Ground-truth masks as its test path makes them (:func:`afclip_mask`): the 8-bit mask resized to S x S with PIL
  bicubic (main.py:103-106, Resize + ToTensor), then > 0.5 (util/utils.py:241-243); zsad's own masks are resized
  bilinearly as floats (zsad.data.preprocess_mask).
* AnomalyCLIP, BAG-CLIP: the released scores are per image, as zsad's; AUPRO "anomalyclip".

Class words (the text a class-aware method, Bayes-PFL, puts in its prompt for a data-set class folder;
:func:`class_words`, applied by zsad-eval and by training to the folder names of the data):

* ``zsad``: lower case, "_" -> " ", whitespace collapsed, then the released prompt renaming
  (:data:`BAYESPFL_PROMPT_NAMES`: pcb1..4 -> "printed circuit board", macaroni1/2 -> "macaroni", chewinggum ->
  "chewing gum"). On MVTec AD and VisA these are the released words; elsewhere a folder's own words
  ("Woven_127" -> "woven 127").
* ``paper``: as the released code: its data-set converter's new folder name (:data:`BAYESPFL_DATASET_CLASSES`,
  one-class data sets :data:`BAYESPFL_DATASET_WORD`), then the prompt renaming, then lower case; underscores are
  kept ("bracket_black" stays "bracket_black").

A served model, and ``method(images, class_names)``, take the caller's text as given (CLIP's tokeniser only
lower-cases it and collapses whitespace): a client sends words, e.g. "metal nut" or "printed circuit board".

All functions here are pure numpy over per-image quantities of ONE class, except :func:`forward_with_terms`,
which runs a method once and returns those quantities beside its usual outputs.
"""
from __future__ import annotations

import math
import re

import numpy as np

from zsad import ZsadError

PROTOCOLS = ("zsad", "paper")

# Bayes-PFL's test script: k = 20 for these classes (folder names), 2000 for every other class.
BAYESPFL_TOPK20_CLASSES = frozenset({"capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew",
                                     "chewinggum"})
BAYESPFL_TOPK = (20, 2000)
# Data sets without masks: Bayes-PFL scores them with the normalised s_text alone.
CLASSIFICATION_ONLY_DATASETS = ("HeadCT", "BrainMRI", "Br35H")
BAYESPFL_MINMAX_EPS = 1e-8  # the released code's denominator guard

SOWA_EVAL_SEEDS = (42, 2020, 2023, 2024, 2025)
AFCLIP_DRAWS = 5

# -- Bayes-PFL's class words, as released (xiaozhen228/Bayes-PFL @ 8f155a0) ----------------------------------------
# models/VPB.py:8-18, looked up (exact key) by prompt_names (VPB.py:252-262) before "X " + name.lower()
BAYESPFL_PROMPT_NAMES = {
    "macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board", "pcb2": "printed circuit board",
    "pcb3": "printed circuit board", "pcb4": "printed circuit board", "pipe_fryum": "pipe fryum",
    "chewinggum": "chewing gum", "metal_nut": "metal nut",
}
# The converters of dataset/datasets/*.py write each source class folder under a new name, which becomes the class
# name of meta_*.json and so of the prompt (MVTec.py and VisA.py keep the names). Keys: the source folder, exact.
BAYESPFL_DATASET_CLASSES = {
    "MVTec AD": {}, "VisA": {},  # MVTec.py:66/82/97 and VisA.py:56-59 keep the folder names
    "BTAD": {"01": "metal1", "02": "wood", "03": "metal2"},  # BTAD.py:25-28 (meta_BTAD.json: metal1/metal2/wood)
    "DTD-Synthetic": {  # DTD.py:29-30
        "Woven_127": "woven1", "Woven_125": "woven2", "Woven_104": "woven3", "Woven_068": "woven4",
        "Woven_001": "woven5", "Stratified_154": "stratified", "Perforated_037": "perforated", "Mesh_114": "mesh",
        "Matted_069": "matted1", "Marbled_078": "marbled2", "Fibrous_183": "fibrous", "Blotchy_099": "blotchy"},
    # DAGM.py:22-23 (sub_class), Change_name 51-55 capitalises: meta_DAGM.json's Fabric1..8 (no 6)
    "DAGM": {f"classes{i}": f"Fabric{i}" for i in (1, 2, 3, 4, 5, 7, 8)},
}
# One-class data sets: whatever the folder, the converter's single class. KSDD2.py:20-21 maps "metal" -> "metal13",
# but its Change_name (48-50) never reads that map: the folder is "Metal" (meta_KSDD2.json). RSDD.py:21-22, 51-54:
# "Metal15". The medical converters map their one source folder "object" (line 28 or 29 of each file).
BAYESPFL_DATASET_WORD = {
    "KSDD2": "Metal", "RSDD": "Metal15", "HeadCT": "head ct", "BrainMRI": "brain ct", "Br35H": "brain",
    "ISIC": "skin", "ClinicDB": "colon", "ColonDB": "colon", "Endo": "colon", "Kvasir": "colon", "TN3K": "thyroid",
}
# how data-set names are spelled elsewhere (zsad.data.guess_dataset_name, --dataset-name, the papers' tables)
_DATASET_SPELLINGS = {"mvtec": "MVTec AD", "dtd": "DTD-Synthetic", "btech": "BTAD", "dagm2007": "DAGM"}


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ZsadError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


# -- class words --------------------------------------------------------------------------------------------------
def _release_dataset(dataset: str | None) -> str | None:
    """The data set's name in Bayes-PFL's converters (spelling and case ignored), or None when it has none."""
    key = _dataset_key(dataset)
    known = {_dataset_key(d): d for d in (*BAYESPFL_DATASET_CLASSES, *BAYESPFL_DATASET_WORD)}
    known.update(_DATASET_SPELLINGS)
    return known.get(key)


def class_words(cls: str, protocol: str = "zsad", dataset: str | None = None) -> str:
    """The words a class-aware prompt (Bayes-PFL) gets for the data-set class folder ``cls`` (module docstring)."""
    check_protocol(protocol)
    if not isinstance(cls, str) or not cls.strip():
        raise ZsadError(f"a class name must be a non-empty string, got {cls!r}")
    if protocol == "zsad":
        key = " ".join(cls.strip().lower().replace("_", " ").split())
        renames = {k.replace("_", " "): v for k, v in BAYESPFL_PROMPT_NAMES.items()}
        return renames.get(key, key)
    name = _release_dataset(dataset)
    if name in BAYESPFL_DATASET_WORD:
        cls = BAYESPFL_DATASET_WORD[name]
    elif name in BAYESPFL_DATASET_CLASSES:
        cls = BAYESPFL_DATASET_CLASSES[name].get(cls, cls)
    return BAYESPFL_PROMPT_NAMES.get(cls, cls).lower()


# -- ground-truth masks ---------------------------------------------------------------------------------------------
def afclip_mask(mask, size: int) -> np.ndarray:
    """A defect mask [H, W] (nonzero = defect) as AF-CLIP's test path makes it: stored as 0 / 255 in 8 bits, resized
    to ``size`` x ``size`` with PIL bicubic (8-bit result), / 255, > 0.5. float32 [size, size] in {0, 1}."""
    from PIL import Image

    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ZsadError(f"afclip_mask expects a non-empty 2-D mask, got shape {arr.shape}")
    img = Image.fromarray(np.where(arr != 0, 255, 0).astype(np.uint8))
    if img.size != (size, size):
        img = img.resize((int(size), int(size)), Image.Resampling.BICUBIC)
    return (np.asarray(img, dtype=np.float32) / np.float32(255.0) > 0.5).astype(np.float32)


def mask_transform(method: str, protocol: str):
    """How ground-truth masks reach S x S for ``method`` under ``protocol``: a function (mask, size) -> float32."""
    from zsad.data.transforms import preprocess_mask

    check_protocol(protocol)
    return afclip_mask if protocol == "paper" and method == "afclip" else preprocess_mask


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


def _same_length(*arrays) -> None:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ZsadError(f"per-image arrays differ in length: {sorted(lengths)}")


# -- Bayes-PFL -----------------------------------------------------------------------------------------------------
def bayespfl_topk(cls: str) -> int:
    """k of s_img = mean(top-k of the unsmoothed map) for a class (its folder name), as the released test script."""
    return BAYESPFL_TOPK[0] if cls in BAYESPFL_TOPK20_CLASSES else BAYESPFL_TOPK[1]


def _dataset_key(name: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (name or "").lower())


def is_classification_only(dataset: str | None) -> bool:
    """True for HeadCT, BrainMRI and Br35H (spelling and case ignored)."""
    return _dataset_key(dataset) in {_dataset_key(d) for d in CLASSIFICATION_ONLY_DATASETS}


def bayespfl_image_scores(s_text, s_img, classification_only: bool = False) -> np.ndarray:
    """Bayes-PFL's image scores of one class: 0.5 minmax(s_text) + 0.5 minmax(s_img), or minmax(s_text) alone."""
    text = minmax(s_text, BAYESPFL_MINMAX_EPS)
    if classification_only:
        return text
    _same_length(s_text, s_img)
    return 0.5 * text + 0.5 * minmax(s_img, BAYESPFL_MINMAX_EPS)


# -- SOWA ----------------------------------------------------------------------------------------------------------
def sowa_kshot_image_scores(image_prob, map_max) -> np.ndarray:
    """SOWA's K-shot image scores of one class: 0.5 (p + minmax(max of each final map)) (no eps, as released)."""
    _same_length(image_prob, map_max)
    return 0.5 * (np.asarray(image_prob, dtype=np.float64) + minmax(map_max))


# -- dispatch for zsad-eval ----------------------------------------------------------------------------------------
def paper_image_scores(method: str, cls: str, terms: dict, *, dataset: str | None = None,
                       shots: int = 0) -> np.ndarray | None:
    """The image scores of one class as ``method``'s released test script computes them, from the per-image
    ``terms`` of :func:`forward_with_terms`; None where that score is zsad's own per-image score."""
    if method == "bayespfl":
        k = bayespfl_topk(cls)
        return bayespfl_image_scores(terms["s_text"], terms[f"topk{k}"], is_classification_only(dataset))
    if method == "sowa" and shots:
        return sowa_kshot_image_scores(terms["image_prob"], terms["map_max"])
    return None


def paper_aupro_mode(method: str) -> str:
    """The AUPRO definition ``method``'s paper tables use (the value of --aupro-mode under --protocol paper): the
    registered method's ``paper_aupro_mode``; "anomalyclip" for a name the registry does not know."""
    from zsad.methods import METHODS

    cls = METHODS.get(method)
    return cls.paper_aupro_mode if cls is not None else "anomalyclip"


def paper_draw_seeds(method: str) -> tuple[int, ...]:
    """Seeds of the few-shot draws a paper averages (SOWA's eval seeds; five draws for AF-CLIP+)."""
    if method == "sowa":
        return SOWA_EVAL_SEEDS
    if method == "afclip":
        return tuple(range(AFCLIP_DRAWS))
    raise ZsadError(f"{method} reports no few-shot mean over draws (few-shot protocols: afclip, sowa)")


def describe(method: str, dataset: str | None = None, shots: int = 0) -> list[str]:
    """What ``--protocol paper`` changes for this run, one line each (written to metrics.json)."""
    lines = [f"AUPRO mode '{paper_aupro_mode(method)}'"]
    if method == "bayespfl":
        where = _release_dataset(dataset)
        lines.append(f"class words as released: the folder names {where}'s converter writes, then models/VPB.py's "
                     "table, lower case"
                     if where else "class words as released: models/VPB.py's table, lower case, underscores kept "
                     "(no renaming of this data set's folders in the release; --dataset-name names one)")
        if is_classification_only(dataset):
            lines.append("image score = min-max(s_text) over the class (classification-only data set)")
        else:
            lines.append("image score = 0.5 min-max(s_text) + 0.5 min-max(mean top-k of the unsmoothed map) over the "
                         f"class, k = 20 for {sorted(BAYESPFL_TOPK20_CLASSES)}, else 2000")
    if method == "sowa" and shots:
        lines.append("image score = 0.5 (text probability + min-max(max of the final map) over the class)")
    if method == "afclip":
        lines.append("ground-truth masks: 8-bit, PIL bicubic to the model size, / 255 > 0.5")
    if shots and method in ("afclip", "sowa"):
        lines.append(f"mean and std over the draws with seeds {list(paper_draw_seeds(method))}")
    return lines


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

    ``image_prob`` (the text / class-token probability, where the method has one; Bayes-PFL's s_text, also as
    ``s_text``), ``map_max`` (max of the final map) and, for Bayes-PFL, ``topk20`` / ``topk2000`` (mean of the
    top-k values of the unsmoothed mean map; all its pixels when the map has fewer than k).
    score and anomaly_map are exactly ``method(images, class_names)``'s (the same stage chain).
    """
    from zsad.methods.base import run_stages

    env = run_stages(method.stages(), **method.stage_inputs(images, class_names))
    score, amap = env["score"], env["anomaly_map"]
    terms = {"map_max": amap.flatten(1).amax(dim=1)}
    if "image_prob" in env:
        terms["image_prob"] = env["image_prob"]
    if method.name == "bayespfl":
        terms["s_text"] = env["image_prob"]
        flat = method.postprocess.mean_map(env["pair_logits"]).flatten(1)
        top = flat.topk(min(max(BAYESPFL_TOPK), flat.shape[1]), dim=1).values  # sorted, largest first
        for k in BAYESPFL_TOPK:
            terms[f"topk{k}"] = top[:, :k].mean(dim=1)
    return score, amap, {k: v.detach().float().cpu().numpy().astype(np.float64) for k, v in terms.items()}
