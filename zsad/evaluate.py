"""zsad-eval: per-class and mean metrics of a checkpoint on a data set, beside the papers' numbers.

    zsad-eval --checkpoint runs/bagclip/ --data /data/mpdd [--out DIR] [--aupro-mode anomalyclip|mvtec|sowa|afclip]
    zsad-eval --checkpoint runs/bayespfl/ --data /data/visa --protocol paper   (each paper's own test script)
    zsad-eval --checkpoint runs/afclip/ --data /data/mvtec --shots 4 --support /data/mvtec   (few-shot: AF-CLIP+, SOWA)

Writes OUT/metrics.json (everything, including per-class values and which classes a metric skipped),
OUT/metrics.csv (one row per class + the mean) and OUT/heatmaps/<class>/*.png (input | overlay with the GT
outline) for a sample of images, and prints a table with the published numbers beside ours when the data set
appears in the papers' tables. Metrics follow methods/bagclip_sowa.md section 5: per class, then the
unweighted mean over classes, maps at the model resolution, GT masks resized bilinearly and binarised > 0.5.
A mask whose size differs from its image's is refused (the defect would be scored at the wrong pixels) unless
``--resize-masks`` is given: then it is first resized to its image with nearest neighbour, with a warning.

Few-shot (``--shots K --support DIR``, methods with a few-shot mode): before each class is evaluated the method
builds its memory bank from K normal images of that class, drawn (seeded by ``--support-seed`` and the class
name) from DIR's train split (good images) when DIR is a data-set root, or from DIR itself when it is a folder of
images (the same K images for every class); the paper's few-shot-K numbers are printed beside ours.

Protocols (``--protocol``, see zsad/protocols.py): ``zsad`` (default) scores every image on its own, as a served
model does. ``paper`` follows each method's released test script where it differs: Bayes-PFL's and SOWA K-shot's
image scores are normalised over the test images of a class, the AUPRO mode is the paper's (unless
``--aupro-mode`` is given), and few-shot AF-CLIP+ / SOWA are evaluated once per draw of the papers' draw seeds
(``--support-seed`` is then unused), printed as mean and std beside the papers' mean and std.
"""
from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

from zsad.cli import cli_entry

METRIC_COLUMNS = [("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("image_f1max", "I-F1max"),
                  ("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"), ("pixel_f1max", "P-F1max"),
                  ("pixel_aupro", "P-AUPRO")]


def _display_image(path: str, size: int) -> np.ndarray:
    from PIL import Image

    from zsad.data import read_image

    return np.asarray(read_image(path).resize((size, size), Image.BICUBIC))


def predict(method, dataset, batch_size: int, device: str, desc: str, progress: bool, with_terms: bool = False):
    """Run the method over a dataset; returns scores [n], maps [n,S,S] float32, masks [n,S,S] bool, labels [n]
    and, with ``with_terms``, the per-image terms of :func:`zsad.protocols.forward_with_terms` (else None)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from zsad.protocols import forward_with_terms

    scores, maps, masks, labels, terms = [], [], [], [], defaultdict(list)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    takes_class_names = bool(method.text_inputs())  # class-aware prompts (Bayes-PFL): each sample's class
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            kwargs = {}
            if takes_class_names:
                kwargs["class_names"] = [c.replace("_", " ") for c in batch["cls"]]
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
    by_defect = defaultdict(list)
    for i, s in enumerate(samples):
        if s.label:
            by_defect[s.defect].append(i)
    picked, queues = [], [list(v) for _, v in sorted(by_defect.items())]
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
             dataset_name: str | None = None) -> dict:
    """Per-class metrics (fractions in [0,1]) + their mean; saves heatmap panels when ``heatmap_dir`` is given.

    ``support`` (few-shot): class -> paths of K normal images; the method's memory is built from them before
    that class is scored and dropped after it. ``protocol="paper"`` replaces the image scores by those of the
    method's released test script (:func:`zsad.protocols.paper_image_scores`; ``dataset_name`` selects
    Bayes-PFL's classification-only data sets, which then get image metrics only).
    """
    from zsad.data import AnomalyDataset
    from zsad.metrics import class_metrics, summarize
    from zsad.protocols import check_protocol, is_classification_only, paper_image_scores
    from zsad.visualize import save_panel

    check_protocol(protocol)
    paper = protocol == "paper"
    shots = len(next(iter(support.values()))) if support else 0
    pixel = not (paper and method.name == "bayespfl" and is_classification_only(dataset_name))

    by_class = defaultdict(list)
    for s in samples:
        by_class[s.cls].append(s)
    per_class, counts, heatmaps = {}, {}, []
    size = method.image_size
    for cls in sorted(by_class):
        cls_samples = by_class[cls]
        ds = AnomalyDataset(cls_samples, size, resize_masks=resize_masks)
        if support is not None:
            method.fit_memory(_load_support(support[cls], size, device))
        try:
            scores, maps, masks, labels, terms = predict(method, ds, batch_size, device, f"eval {cls}", progress,
                                                         with_terms=paper)
        finally:
            if support is not None:
                method.clear_memory()
        if paper:
            paper_scores = paper_image_scores(method.name, cls, terms, dataset=dataset_name, shots=shots)
            scores = scores if paper_scores is None else paper_scores
        per_class[cls] = class_metrics(labels, scores, masks, maps, aupro_mode=aupro_mode, pixel=pixel)
        counts[cls] = {"images": int(len(labels)), "anomalous": int(labels.sum())}
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


def _average_draws(draws: list[dict]) -> dict:
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


def _fmt(v) -> str:
    return "  n/a" if v is None or v != v else f"{100 * v:5.1f}"


def _fmt_mean_std(mean, std) -> str:
    return "n/a" if mean is None or mean != mean else f"{mean:.1f}" + ("" if std is None else f"±{std:.1f}")


def format_draws(mean_std: dict, n_draws: int, paper: dict) -> str:
    """Few-shot under --protocol paper: ours as mean ± std over the draws beside the paper's mean ± std (%)."""
    header = f"{'':<16}" + "".join(f"{h:>13}" for _, h in METRIC_COLUMNS)
    ours = "".join(f"{_fmt_mean_std(*(100 * v for v in mean_std[k])) if k in mean_std else '-':>13}"
                   for k, _ in METRIC_COLUMNS)
    lines = [f"mean ± std over {n_draws} draws of the support images", header,
             f"{'ours':<16}" + ours]
    if paper:
        lines.append(f"{'paper':<16}" + "".join(
            f"{_fmt_mean_std(paper[k].value, paper[k].std) if k in paper else '-':>13}" for k, _ in METRIC_COLUMNS))
    return "\n".join(lines)


def format_table(result: dict, paper: dict, paper_label: str | None) -> str:
    header = f"{'class':<16}" + "".join(f"{h:>9}" for _, h in METRIC_COLUMNS)
    lines = [header, "-" * len(header)]
    for cls, m in result["per_class"].items():
        lines.append(f"{cls:<16}" + "".join(f"{_fmt(m.get(k)):>9}" for k, _ in METRIC_COLUMNS))
    lines.append("-" * len(header))
    lines.append(f"{'mean (ours)':<16}" + "".join(f"{_fmt(result['mean'].get(k)):>9}" for k, _ in METRIC_COLUMNS))
    if paper:
        row = "".join(f"{(f'{paper[k].value:5.1f}' if k in paper else '    -'):>9}" for k, _ in METRIC_COLUMNS)
        lines.append(f"{'paper':<16}" + row)
        lines.append(f"  paper numbers: {paper_label}")
    return "\n".join(lines)


def write_csv(path: Path, result: dict) -> None:
    keys = [k for k, _ in METRIC_COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "images", "anomalous"] + keys)
        for cls, m in result["per_class"].items():
            c = result["counts"][cls]
            w.writerow([cls, c["images"], c["anomalous"]] + [m.get(k, float("nan")) for k in keys])
        w.writerow(["mean", sum(c["images"] for c in result["counts"].values()),
                    sum(c["anomalous"] for c in result["counts"].values())] + [result["mean"].get(k) for k in keys])


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", required=True, type=click.Path(),
              help="Checkpoint directory written by train/run.py (or its checkpoint.safetensors).")
@click.option("--data", type=click.Path(), default=None,
              help="Data set root (MVTec AD / MPDD / VisA / BTAD layout or meta.json, auto-detected). "
                   "Default: the synthetic-defect set's held-out test classes.")
@click.option("--split", default="test", type=click.Choice(["train", "test"]))
@click.option("--classes", default=None, help="Comma-separated classes (default: all).")
@click.option("--dataset-name", default=None, help="Name for the paper tables (e.g. 'MVTec AD'); guessed from "
              "the folder name otherwise.")
@click.option("--clip-weights", type=click.Path(), default=None, help="Local CLIP weights file (offline use).")
@click.option("--out", type=click.Path(), default=None, help="Output directory [default: CHECKPOINT/eval-<data>].")
@click.option("--protocol", default="zsad", type=click.Choice(["zsad", "paper"]),
              help="zsad: every image scored on its own (what a served model gives); paper: each method's released "
                   "test script (per-class score normalisation, its AUPRO mode, few-shot mean ± std over its draws).")
@click.option("--aupro-mode", default=None, type=click.Choice(["anomalyclip", "mvtec", "sowa", "afclip"]),
              help="anomalyclip: 200 thresholds, FPR<0.3 min-max rescaled (most papers' tables); mvtec: the official "
                   "integral to FPR 0.3 / 0.3; sowa: as anomalyclip with FPR = mean of per-image FPRs; afclip: as "
                   "anomalyclip with FPRs divided by their max. [default: anomalyclip; the paper's with --protocol "
                   "paper]")
@click.option("--batch-size", type=int, default=8)
@click.option("--heatmaps", type=int, default=4, help="Heatmap panels saved per class (0 = none).")
@click.option("--shots", type=int, default=0, help="Few-shot: K normal reference images per class (AF-CLIP+, "
              "SOWA K-shot); 0 = zero-shot.")
@click.option("--support", type=click.Path(), default=None, help="Few-shot reference images: a data-set root (K "
              "drawn from each class's train/good images) or a folder of normal images (the same K for all classes).")
@click.option("--support-seed", type=int, default=0, help="Seed of the few-shot draw (the papers average 5 draws).")
@click.option("--resize-masks", is_flag=True, help="Resize masks whose size differs from their image's to the "
              "image (nearest neighbour, with a warning) instead of refusing them.")
@click.option("--device", default="auto", help="cpu, cuda or auto.")
@click.option("--no-progress", is_flag=True)
@cli_entry
def main(checkpoint, data, split, classes, dataset_name, clip_weights, out, protocol, aupro_mode, batch_size, heatmaps,
         shots, support, support_seed, resize_masks, device, no_progress):
    """Evaluate a checkpoint: image/pixel AUROC, AP, F1-max and AUPRO per class, JSON/CSV/PNG outputs."""
    run(checkpoint, data, split, classes, dataset_name, clip_weights, out, aupro_mode, batch_size, heatmaps,
        device, not no_progress, shots=shots, support=support, support_seed=support_seed, resize_masks=resize_masks,
        protocol=protocol)


def check_mask_sizes(samples, resize_masks: bool) -> None:
    """Refuse (or, with resize_masks, warn about) masks of another size than their image, before any inference."""
    from zsad import ZsadError
    from zsad.data.dataset import mask_size_mismatches

    bad = mask_size_mismatches(samples)
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    if not resize_masks:
        raise ZsadError(bad[0] + more)
    click.echo(f"warning: {len(bad)} mask(s) differ in size from their image, resized to it (nearest neighbour, "
               f"--resize-masks); first: {bad[0].split(' (give')[0]}", err=True)


def run(checkpoint, data, split="test", classes=None, dataset_name=None, clip_weights=None, out=None,
        aupro_mode=None, batch_size=8, heatmaps=4, device="auto", progress=True, shots=0, support=None,
        support_seed=0, resize_masks=False, protocol="zsad") -> dict:
    """zsad-eval; ``aupro_mode`` None = "anomalyclip", or the paper's mode under ``protocol="paper"``."""
    from zsad import ZsadError
    from zsad import protocols
    from zsad.checkpoint import load_checkpoint
    from zsad.data import guess_dataset_name, load_samples
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, default_root, generate
    from zsad.reference import paper_method_name, paper_metrics

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if bool(shots) != bool(support):
        raise ZsadError("few-shot evaluation needs both --shots K (>= 1) and --support DIR")
    protocols.check_protocol(protocol)
    method, meta = load_checkpoint(checkpoint, clip_weights=clip_weights, device=device)
    paper_protocol = protocol == "paper"
    if aupro_mode is None:
        aupro_mode = protocols.paper_aupro_mode(meta["method"]) if paper_protocol else "anomalyclip"
    if shots and not method.few_shot:
        from zsad.methods import METHODS

        able = ", ".join(n for n, c in sorted(METHODS.items()) if c.few_shot)
        raise ZsadError(f"{meta['method']} has no few-shot mode (--shots works with: {able})")
    class_list = [c for c in classes.split(",") if c] if classes else None
    if data is None:
        root = generate(default_root(), progress=progress)
        class_list = class_list or list(SYNTHETIC_TEST_CLASSES)
        name = "synthetic"
    else:
        root = Path(data)
        name = dataset_name or guess_dataset_name(root)
    samples = load_samples(root, split=split, classes=class_list)
    check_mask_sizes(samples, resize_masks)
    class_names = sorted({s.cls for s in samples})
    # few-shot under the paper protocol: one evaluation per draw of the papers' draw seeds
    draw_seeds = protocols.paper_draw_seeds(meta["method"]) if shots and paper_protocol else (support_seed,)
    support_maps = [support_images(support, class_names, shots, seed) for seed in draw_seeds] if shots else [None]
    setting = f"few-shot-{shots}" if shots else "zero-shot"
    ckpt = Path(checkpoint)
    out_dir = Path(out) if out else (ckpt if ckpt.is_dir() else ckpt.parent) / (
        f"eval-{(name or root.name).replace(' ', '_')}" + (f"-{shots}shot" if shots else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"evaluating {meta['method']} ({meta['profile']}, trained {meta.get('epochs', '?')} epochs) on "
               f"{name or root} [{len(samples)} images, {len({s.cls for s in samples})} classes], "
               f"image size {method.image_size}, protocol {protocol}, AUPRO mode {aupro_mode}, device {device}"
               + (f", {shots}-shot (support: {support}, draw seeds {list(draw_seeds)})" if shots else ""))
    t0 = time.perf_counter()
    draws = [evaluate(method, samples, batch_size=batch_size, device=device, aupro_mode=aupro_mode,
                      heatmap_dir=out_dir / "heatmaps", heatmaps_per_class=heatmaps if i == 0 else 0,
                      progress=progress, support=support_map, resize_masks=resize_masks, protocol=protocol,
                      dataset_name=name)
             for i, support_map in enumerate(support_maps)]
    seconds = time.perf_counter() - t0
    result = draws[0] if len(draws) == 1 else _average_draws(draws)
    paper = paper_metrics(meta["method"], name, setting) if name else {}
    paper_label = None
    if paper:
        first = next(iter(paper.values()))
        paper_label = (f"{paper_method_name(meta['method'], setting)} on {name} ({setting}), {first.paper} paper, "
                       f"{first.table}"
                       + (f" (trained on {first.train_dataset})" if first.train_dataset else ""))
    random_clip = method.backbone.info.weights == "random"
    report = {
        "method": meta["method"], "profile": meta["profile"], "checkpoint": str(checkpoint),
        "clip_weights": method.backbone.info.weights, "dataset": name, "data_path": str(root), "split": split,
        "image_size": method.image_size, "aupro_mode": aupro_mode, "seconds": round(seconds, 2),
        "setting": setting, "protocol": protocol,
        "protocol_notes": protocols.describe(meta["method"], name, shots) if paper_protocol else [],
        "few_shot": ({"shots": shots, "support": str(support), "seeds": list(draw_seeds),
                      "images": [{c: [str(p) for p in v] for c, v in m.items()} for m in support_maps]}
                     if shots else None),
        "device": device, "metrics_scale": "fraction (x100 for the papers' percent)",
        "note": "CLIP weights are random: these numbers say nothing about detection accuracy" if random_clip else None,
        **result,
        "paper": {k: vars(v) for k, v in paper.items()},
    }
    if len(draws) > 1:
        report["draws"] = [{"seed": seed, "per_class": d["per_class"], "mean": d["mean"]}
                           for seed, d in zip(draw_seeds, draws)]
        report["mean_std"] = protocols.mean_std([d["mean"] for d in draws])
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=float))
    write_csv(out_dir / "metrics.csv", result)
    click.echo(format_table(result, paper, paper_label))
    if len(draws) > 1:
        click.echo(format_draws(report["mean_std"], len(draws), paper))
    if paper_protocol:
        click.echo("protocol paper: " + "; ".join(report["protocol_notes"]))
    for metric, skipped in result["skipped"].items():
        if skipped:
            click.echo(f"note: {metric} undefined (no anomalies) for {', '.join(skipped)}: left out of the mean")
    if random_clip:
        click.echo("note: the CLIP backbone has RANDOM weights (tiny profile / no pretrained weights): these numbers "
                   "show the pipeline works, not how well the method detects anomalies.")
    click.echo(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'metrics.csv'} and {len(result['heatmaps'])} heatmaps "
               f"under {out_dir / 'heatmaps'} ({seconds:.1f} s)")
    return report


if __name__ == "__main__":
    main()
