"""Evaluation as a library: per-class and mean metrics of a method on a list of samples.

:func:`evaluate` scores every class (:func:`predict`), computes its metrics and saves heatmap panels;
:func:`support_images` draws the few-shot reference images; :func:`average_draws` averages evaluations over
several few-shot draws. The command ``zsad-eval`` around them is :mod:`zsad.evaluate_cli`. Metrics follow
methods/bagclip_sowa.md section 5: per class, then the unweighted mean over classes, maps at the model resolution,
GT masks resized bilinearly and binarised > 0.5 (AF-CLIP under ``--protocol paper``: bicubic on 8 bits, as released).

Few-shot support images: K normal images per class, drawn (seeded by the seed and the class name) from the
support folder's train split (good images) when it is a data-set root, or from the folder itself when it is a
folder of images (the same K images for every class).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _display_image(path: str, size: int) -> np.ndarray:
    from PIL import Image

    from zsad.data import read_image

    return np.asarray(read_image(path).resize((size, size), Image.Resampling.BICUBIC))


def predict(method, dataset, batch_size: int, device: str, desc: str, progress: bool, with_terms: bool = False,
            protocol: str = "zsad", dataset_name: str | None = None):
    """Run the method over a dataset; returns scores [n], maps [n,S,S] float32, masks [n,S,S] bool, labels [n]
    and, with ``with_terms``, the per-image terms of :func:`zsad.protocols.forward_with_terms` (else None).
    A class-aware method gets each sample's class folder as the ``protocol``'s words (its
    ``paper_protocol.class_words``, ``dataset_name`` selects the paper protocol's renaming)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from zsad.protocols import class_words, forward_with_terms

    scores, maps, masks, labels, terms = [], [], [], [], defaultdict(list)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    takes_class_names = bool(method.text_inputs())  # class-aware prompts (Bayes-PFL): each sample's class
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            kwargs = {}
            if takes_class_names:
                kwargs["class_names"] = [class_words(method, c, protocol, dataset_name) for c in batch["cls"]]
            if with_terms:
                score, amap, batch_terms = forward_with_terms(method, batch["image"].to(device), **kwargs)
                for k, v in batch_terms.items():
                    terms[k].append(v)
            else:
                out = method(batch["image"].to(device), **kwargs)
                score, amap = out.score, out.anomaly_map
            scores.append(score.float().cpu().numpy())
            maps.append(amap.float().cpu().numpy())
            masks.append(batch["mask"].numpy() > 0.5)
            labels.append(batch["label"].numpy())
    return (np.concatenate(scores).astype(np.float64), np.concatenate(maps), np.concatenate(masks),
            np.concatenate(labels).astype(np.int64),
            {k: np.concatenate(v) for k, v in terms.items()} if with_terms else None)


def _heatmap_sample(samples, k: int) -> list[int]:
    """Up to k indices: one anomalous image per defect type first (round robin), then one normal image."""
    by_defect: defaultdict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.label:
            by_defect[s.defect].append(i)
    picked: list[int] = []
    queues = [list(v) for _, v in sorted(by_defect.items())]
    while queues and len(picked) < max(k - 1, 1):
        for q in queues:
            if q and len(picked) < max(k - 1, 1):
                picked.append(q.pop(0))
        queues = [q for q in queues if q]
    good = [i for i, s in enumerate(samples) if not s.label][:1]
    return (picked + good)[:k]


def support_images(support, classes, shots: int, seed: int = 0) -> dict[str, list[Path]]:
    """K normal reference images per class (few-shot): see the module docstring for where they come from."""
    import zlib

    from zsad import ZsadError
    from zsad.data import load_samples
    from zsad.data.io import is_image_file

    root = Path(support)
    if shots < 1:
        raise ZsadError(f"--shots must be >= 1, got {shots}")
    if not root.is_dir():
        raise ZsadError(f"--support {root}: not a directory (give a folder of normal images or a data-set root)")
    files = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    if files:
        if len(files) < shots:
            raise ZsadError(f"--support {root} holds {len(files)} images, fewer than --shots {shots}")
        rng = np.random.default_rng([seed, len(files)])
        picked = [files[i] for i in sorted(rng.choice(len(files), shots, replace=False))]
        return {c: picked for c in classes}
    out = {}
    for cls in classes:
        try:
            good = [s.image for s in load_samples(root, "train", classes=[cls]) if not s.label]
        except ZsadError as err:
            raise ZsadError(f"--support {root}: no normal train images of class '{cls}' ({err})") from err
        if len(good) < shots:
            raise ZsadError(f"--support {root}: class '{cls}' has {len(good)} normal train images, fewer than "
                            f"--shots {shots}")
        rng = np.random.default_rng([seed, zlib.crc32(cls.encode())])
        out[cls] = [good[i] for i in sorted(rng.choice(len(good), shots, replace=False))]
    return out


def _load_support(paths, size: int, device: str):
    import torch

    from zsad.data import preprocess, read_image

    return torch.stack([torch.from_numpy(preprocess(read_image(p), size)) for p in paths]).to(device)


def evaluate(method, samples, *, batch_size: int = 8, device: str = "cpu", aupro_mode: str = "anomalyclip",
             heatmap_dir: Path | None = None, heatmaps_per_class: int = 4, progress: bool = True,
             support: dict[str, list] | None = None, resize_masks: bool = False, protocol: str = "zsad",
             dataset_name: str | None = None, on_class: Callable[..., None] | None = None) -> dict:
    """Per-class metrics (fractions in [0,1]) + their mean; saves heatmap panels when ``heatmap_dir`` is given.

    ``support`` (few-shot): class -> paths of K normal images; the method's memory is built from them before
    that class is scored and dropped after it. ``protocol="paper"`` replaces the image scores by those of the
    method's released test script (its ``paper_protocol`` hooks, zsad.protocols: ``dataset_name`` selects e.g.
    Bayes-PFL's classification-only data sets, which then get image metrics only, and its class words) and its
    ground-truth masks where the release makes them otherwise (AF-CLIP).

    ``on_class`` (zsad-eval's report, :class:`zsad.report_html.ReportCollector`) is called once per class, after its
    metrics, with ``(cls, samples, labels, scores, masks, maps, pixel)``: the very arrays the metrics were computed
    from (``pixel``: whether pixel metrics were). It changes nothing in what is returned.
    """
    from zsad.data import AnomalyDataset
    from zsad.metrics import class_metrics, summarize
    from zsad.protocols import check_protocol, mask_transform, paper_image_scores, paper_protocol
    from zsad.visualize import save_panel

    check_protocol(protocol)
    paper = protocol == "paper"
    shots = len(next(iter(support.values()))) if support else 0
    pixel = not paper or paper_protocol(method).pixel_metrics(dataset_name)

    by_class = defaultdict(list)
    for s in samples:
        by_class[s.cls].append(s)
    per_class, counts, heatmaps = {}, {}, []
    size = method.image_size
    for cls in sorted(by_class):
        cls_samples = by_class[cls]
        ds = AnomalyDataset(cls_samples, size, resize_masks=resize_masks,
                            mask_transform=mask_transform(method, protocol))
        if support is not None:
            method.fit_memory(_load_support(support[cls], size, device))
        try:
            scores, maps, masks, labels, terms = predict(method, ds, batch_size, device, f"eval {cls}", progress,
                                                         with_terms=paper, protocol=protocol,
                                                         dataset_name=dataset_name)
        finally:
            if support is not None:
                method.clear_memory()
        if paper:
            paper_scores = paper_image_scores(method, cls, terms, dataset=dataset_name, shots=shots)
            scores = scores if paper_scores is None else paper_scores
        per_class[cls] = class_metrics(labels, scores, masks, maps, aupro_mode=aupro_mode, pixel=pixel)
        counts[cls] = {"images": int(len(labels)), "anomalous": int(labels.sum())}
        if on_class is not None:
            on_class(cls, cls_samples, labels, scores, masks, maps, pixel)
        if heatmap_dir is not None and heatmaps_per_class > 0:
            vmin, vmax = float(maps.min()), float(maps.max())  # one colour scale per class
            for i in _heatmap_sample(cls_samples, heatmaps_per_class):
                s = cls_samples[i]
                name = f"{s.defect}_{Path(s.image).stem}.png"
                heatmaps.append(str(save_panel(heatmap_dir / cls / name, _display_image(str(s.image), size),
                                               maps[i], vmin, vmax, masks[i], float(scores[i]))))
        del maps, masks
    mean, skipped = summarize(per_class)
    return {"per_class": per_class, "mean": mean, "skipped": skipped, "counts": counts, "heatmaps": heatmaps}


def average_draws(draws: list[dict]) -> dict:
    """Per class, each metric's mean over the draws (NaN draws left out); the class mean of those; the first draw's
    counts and heatmaps (the test images are the same in every draw)."""
    from zsad.metrics import summarize

    per_class = {cls: {k: float(np.nanmean([d["per_class"][cls][k] for d in draws]))
                       if any(d["per_class"][cls][k] == d["per_class"][cls][k] for d in draws) else float("nan")
                       for k in m}
                 for cls, m in draws[0]["per_class"].items()}
    mean, skipped = summarize(per_class)
    return {"per_class": per_class, "mean": mean, "skipped": skipped, "counts": draws[0]["counts"],
            "heatmaps": draws[0]["heatmaps"]}
