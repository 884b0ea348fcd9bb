"""Bayes-PFL's paper protocol: its released test script's image scores and its class words (zsad.protocols).

Scores (xiaozhen228/Bayes-PFL, models/metric_and_visualization.py ``calcuate_metric_pixel`` /
``calcuate_metric_image``, called with alpha 0.5 by test.py): s_img = the mean of the top-k values of the
*unsmoothed* map, k = 20 for the classes of :data:`BAYESPFL_TOPK20_CLASSES`, else 2000; s_text and s_img are
each min-max normalised over the test images of the class (``(x - min) / (max - min + 1e-8)``), then mixed
0.5 / 0.5; on HeadCT, BrainMRI and Br35H (no masks) the score is the normalised s_text alone. AUPRO: the
pooled-FPR definition (``aupro_mode`` "anomalyclip"; the released metric code has it commented out and reports 0).

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
"""
from __future__ import annotations

import numpy as np

from zsad.protocols import (
    PaperProtocol,
    check_protocol,
    dataset_key,
    is_classification_only,
    minmax,
    same_length,
    zsad_words,
)

# Bayes-PFL's test script: k = 20 for these classes (folder names), 2000 for every other class.
BAYESPFL_TOPK20_CLASSES = frozenset({"capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew",
                                     "chewinggum"})
BAYESPFL_TOPK = (20, 2000)
BAYESPFL_MINMAX_EPS = 1e-8  # the released code's denominator guard

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


def _release_dataset(dataset: str | None) -> str | None:
    """The data set's name in Bayes-PFL's converters (spelling and case ignored), or None when it has none."""
    key = dataset_key(dataset)
    known = {dataset_key(d): d for d in (*BAYESPFL_DATASET_CLASSES, *BAYESPFL_DATASET_WORD)}
    known.update(_DATASET_SPELLINGS)
    return known.get(key)


def class_words(cls: str, protocol: str = "zsad", dataset: str | None = None) -> str:
    """The words a class-aware prompt (Bayes-PFL) gets for the data-set class folder ``cls`` (module docstring)."""
    check_protocol(protocol)
    key = zsad_words(cls)  # checks it is a non-empty string
    if protocol == "zsad":
        renames = {k.replace("_", " "): v for k, v in BAYESPFL_PROMPT_NAMES.items()}
        return renames.get(key, key)
    name = _release_dataset(dataset)
    if name in BAYESPFL_DATASET_WORD:
        cls = BAYESPFL_DATASET_WORD[name]
    elif name in BAYESPFL_DATASET_CLASSES:
        cls = BAYESPFL_DATASET_CLASSES[name].get(cls, cls)
    return BAYESPFL_PROMPT_NAMES.get(cls, cls).lower()


def bayespfl_topk(cls: str) -> int:
    """k of s_img = mean(top-k of the unsmoothed map) for a class (its folder name), as the released test script."""
    return BAYESPFL_TOPK[0] if cls in BAYESPFL_TOPK20_CLASSES else BAYESPFL_TOPK[1]


def bayespfl_image_scores(s_text, s_img, classification_only: bool = False) -> np.ndarray:
    """Bayes-PFL's image scores of one class: 0.5 minmax(s_text) + 0.5 minmax(s_img), or minmax(s_text) alone."""
    text = minmax(s_text, BAYESPFL_MINMAX_EPS)
    if classification_only:
        return text
    same_length(s_text, s_img)
    return 0.5 * text + 0.5 * minmax(s_img, BAYESPFL_MINMAX_EPS)


class BayesPflProtocol(PaperProtocol):
    """Bayes-PFL's released test script: min-max normalised s_text / top-k s_img mix per class, its class words,
    image metrics only on the classification-only data sets."""

    def class_words(self, folder: str, protocol: str = "zsad", dataset: str | None = None) -> str:
        return class_words(folder, protocol, dataset)

    def pixel_metrics(self, dataset: str | None) -> bool:
        return not is_classification_only(dataset)

    def extra_terms(self, method, env: dict) -> dict:
        flat = method.postprocess.mean_map(env["pair_logits"]).flatten(1)
        top = flat.topk(min(max(BAYESPFL_TOPK), flat.shape[1]), dim=1).values  # sorted, largest first
        return {"s_text": env["image_prob"], **{f"topk{k}": top[:, :k].mean(dim=1) for k in BAYESPFL_TOPK}}

    def image_scores(self, cls: str, terms: dict, dataset: str | None, shots: int) -> np.ndarray | None:
        k = bayespfl_topk(cls)
        return bayespfl_image_scores(terms["s_text"], terms[f"topk{k}"], is_classification_only(dataset))

    def describe(self, dataset: str | None, shots: int) -> list[str]:
        where = _release_dataset(dataset)
        lines = [f"class words as released: the folder names {where}'s converter writes, then models/VPB.py's "
                 "table, lower case"
                 if where else "class words as released: models/VPB.py's table, lower case, underscores kept "
                 "(no renaming of this data set's folders in the release; --dataset-name names one)"]
        if is_classification_only(dataset):
            lines.append("image score = min-max(s_text) over the class (classification-only data set)")
        else:
            lines.append("image score = 0.5 min-max(s_text) + 0.5 min-max(mean top-k of the unsmoothed map) over the "
                         f"class, k = 20 for {sorted(BAYESPFL_TOPK20_CLASSES)}, else 2000")
        return lines
