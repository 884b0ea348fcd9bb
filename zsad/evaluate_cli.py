"""zsad-eval: per-class and mean metrics of a checkpoint on a data set, beside the papers' numbers.

    zsad-eval --checkpoint runs/bagclip/ --data /data/mpdd [--out DIR] [--aupro-mode anomalyclip|mvtec|sowa|afclip]
    zsad-eval --checkpoint runs/bayespfl/ --data /data/visa --protocol paper   (each paper's own test script)
    zsad-eval --checkpoint runs/afclip/ --data /data/mvtec --shots 4 --support /data/mvtec   (few-shot: AF-CLIP+, SOWA)

Writes OUT/metrics.json (everything, including per-class values and which classes a metric skipped),
OUT/metrics.csv (one row per class + the mean) and OUT/heatmaps/<class>/*.png (input | overlay with the GT
outline) for a sample of images, and prints a table with the published numbers beside ours when the data set
appears in the papers' tables. With ``--report`` (the default; ``--no-report`` skips it) it also writes
OUT/report.html (zsad/report_html.py): the table (sortable), the ROC / PR curves per class, a threshold control that
recomputes the image-level confusion counts, precision, recall and F1 and gives the ``zsad-infer --threshold`` line,
and a score-sorted gallery of every test image (thumbnails under OUT/report_files/) with its overlay and GT outline.
The metrics themselves are computed by the library, :mod:`zsad.evaluate`.
A mask whose size differs from its image's is refused (the defect would be scored at the wrong pixels) unless
``--resize-masks`` is given: then it is first resized to its image with nearest neighbour, with a warning.

Few-shot (``--shots K --support DIR``, methods with a few-shot mode): before each class is evaluated the method
builds its memory bank from K normal images of that class (:func:`zsad.evaluate.support_images`); the paper's
few-shot-K numbers are printed beside ours.

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
from pathlib import Path

import click

from zsad import ZsadError, protocols
from zsad.cli import cli_entry
from zsad.evaluate import average_draws, evaluate, support_images

METRIC_COLUMNS = [("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("image_f1max", "I-F1max"),
                  ("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"), ("pixel_f1max", "P-F1max"),
                  ("pixel_aupro", "P-AUPRO")]


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
@click.option("--report/--no-report", "html_report", default=True,
              help="Write OUT/report.html, a page that opens offline in a browser: the per-class table (sortable) "
                   "beside the papers' numbers, ROC / PR curves per class, a score-sorted gallery of every test image "
                   "(overlay + GT outline; thumbnails in OUT/report_files/) with filters, and a threshold control "
                   "that recomputes TP/FP/TN/FN, precision, recall and F1 and shows the zsad-infer --threshold line. "
                   "--no-report writes only metrics.json, metrics.csv and the heatmaps.")
@click.option("--no-progress", is_flag=True)
@cli_entry
def main(checkpoint, data, split, classes, dataset_name, clip_weights, out, protocol, aupro_mode, batch_size, heatmaps,
         shots, support, support_seed, resize_masks, device, html_report, no_progress):
    """Evaluate a checkpoint: image/pixel AUROC, AP, F1-max and AUPRO per class, JSON/CSV/PNG/HTML outputs."""
    run(checkpoint, data, split, classes, dataset_name, clip_weights, out, aupro_mode, batch_size, heatmaps,
        device, not no_progress, shots=shots, support=support, support_seed=support_seed, resize_masks=resize_masks,
        protocol=protocol, html_report=html_report)


def check_mask_sizes(samples, resize_masks: bool) -> None:
    """Refuse (or, with resize_masks, warn about) masks of another size than their image, before any inference."""
    from zsad.data.dataset import mask_size_mismatches

    bad = mask_size_mismatches(samples)
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    if not resize_masks:
        raise ZsadError(bad[0] + more)
    click.echo(f"warning: {len(bad)} mask(s) differ in size from their image, resized to it (nearest neighbour, "
               f"--resize-masks); first: {bad[0].split(' (give')[0]}", err=True)


# ------------------------------------------------------------------------------------- the steps of run()


def _load_method(checkpoint: Path, clip_weights, device: str, shots: int, protocol: str, aupro_mode):
    """The method of a zsad ``checkpoint``, its metadata and the AUPRO mode (None = the protocol's default); checks
    the few-shot options against the method."""
    from zsad.load import load

    loaded = load(checkpoint, clip_weights=clip_weights, device=device)
    method, meta = loaded.method, loaded.sidecar
    if aupro_mode is None:
        aupro_mode = protocols.paper_aupro_mode(method) if protocol == "paper" else "anomalyclip"
    if shots and not method.few_shot:
        from zsad.methods import METHODS

        able = ", ".join(n for n, c in sorted(METHODS.items()) if c.few_shot)
        raise ZsadError(f"{meta['method']} has no few-shot mode (--shots works with: {able})")
    return method, meta, aupro_mode


def _load_data(data, split: str, classes, dataset_name, progress: bool, resize_masks: bool):
    """(root, data-set name, samples): ``data``, or the synthetic set's held-out classes when it is None."""
    from zsad.data import data_source, load_samples
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES

    root, name, class_list = data_source(data, classes, SYNTHETIC_TEST_CLASSES, dataset_name, progress)
    samples = load_samples(root, split=split, classes=class_list)
    check_mask_sizes(samples, resize_masks)
    return root, name, samples


def _out_dir(out, checkpoint, name, root: Path, shots: int) -> Path:
    ckpt = Path(checkpoint)
    out_dir = Path(out) if out else (ckpt if ckpt.is_dir() else ckpt.parent) / (
        f"eval-{(name or root.name).replace(' ', '_')}" + (f"-{shots}shot" if shots else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _paper_reference(method_name: str, name, setting: str) -> tuple[dict, str | None]:
    """The papers' numbers for this method, data set and setting, and a line saying where they come from."""
    from zsad.reference import paper_method_name, paper_metrics

    paper = paper_metrics(method_name, name, setting) if name else {}
    if not paper:
        return paper, None
    first = next(iter(paper.values()))
    label = (f"{paper_method_name(method_name, setting)} on {name} ({setting}), {first.paper} paper, {first.table}"
             + (f" (trained on {first.train_dataset})" if first.train_dataset else ""))
    return paper, label


def _print_summary(report: dict, result: dict, paper: dict, paper_label, out_dir: Path, seconds: float,
                   random_clip: bool) -> None:
    click.echo(format_table(result, paper, paper_label))
    if "mean_std" in report:
        click.echo(format_draws(report["mean_std"], len(report["draws"]), paper))
    if report["protocol"] == "paper":
        click.echo("protocol paper: " + "; ".join(report["protocol_notes"]))
    for metric, skipped in result["skipped"].items():
        if skipped:
            click.echo(f"note: {metric} undefined (no anomalies) for {', '.join(skipped)}: left out of the mean")
    if random_clip:
        click.echo("note: the CLIP backbone has RANDOM weights (tiny profile / no pretrained weights): these numbers "
                   "show the pipeline works, not how well the method detects anomalies.")
    click.echo(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'metrics.csv'} and {len(result['heatmaps'])} heatmaps "
               f"under {out_dir / 'heatmaps'} ({seconds:.1f} s)")


def run(checkpoint, data, split="test", classes=None, dataset_name=None, clip_weights=None, out=None,
        aupro_mode=None, batch_size=8, heatmaps=4, device="auto", progress=True, shots=0, support=None,
        support_seed=0, resize_masks=False, protocol="zsad", html_report=True) -> dict:
    """zsad-eval; ``aupro_mode`` None = "anomalyclip", or the paper's mode under ``protocol="paper"``;
    ``html_report``: also write OUT/report.html (:mod:`zsad.report_html`)."""
    import torch

    from zsad.load import resolve, sidecar

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if bool(shots) != bool(support):
        raise ZsadError("few-shot evaluation needs both --shots K (>= 1) and --support DIR")
    protocols.check_protocol(protocol)
    # the checkpoint's own files (a released file imported), then the data, then the model: a wrong --data is
    # said before CLIP loads (a first ViT-L load downloads 1.7 GB)
    resolved = resolve(checkpoint, clip_weights)
    sidecar(resolved)
    root, name, samples = _load_data(data, split, classes, dataset_name, progress, resize_masks)
    method, meta, aupro_mode = _load_method(resolved, clip_weights, device, shots, protocol, aupro_mode)
    class_names = sorted({s.cls for s in samples})
    # few-shot under the paper protocol: one evaluation per draw of the papers' draw seeds
    draw_seeds = protocols.paper_draw_seeds(method) if shots and protocol == "paper" else (support_seed,)
    support_maps = [support_images(support, class_names, shots, seed) for seed in draw_seeds] if shots else []
    setting = f"few-shot-{shots}" if shots else "zero-shot"
    out_dir = _out_dir(out, checkpoint, name, root, shots)
    click.echo(f"evaluating {meta['method']} ({meta['profile']}, trained {meta.get('epochs', '?')} epochs) on "
               f"{name or root} [{len(samples)} images, {len(class_names)} classes], "
               f"image size {method.image_size}, protocol {protocol}, AUPRO mode {aupro_mode}, device {device}"
               + (f", {shots}-shot (support: {support}, draw seeds {list(draw_seeds)})" if shots else ""))
    collector = None
    if html_report:
        from zsad.report_html import ReportCollector

        collector = ReportCollector(out_dir, method.image_size, progress=progress, aupro_mode=aupro_mode)
    t0 = time.perf_counter()
    draws = [evaluate(method, samples, batch_size=batch_size, device=device, aupro_mode=aupro_mode,
                      heatmap_dir=out_dir / "heatmaps", heatmaps_per_class=heatmaps if i == 0 else 0,
                      progress=progress, support=support_map, resize_masks=resize_masks, protocol=protocol,
                      dataset_name=name, on_class=collector if i == 0 else None)
             for i, support_map in enumerate(support_maps or [None])]
    seconds = time.perf_counter() - t0
    result = draws[0] if len(draws) == 1 else average_draws(draws)
    paper, paper_label = _paper_reference(meta["method"], name, setting)
    random_clip = method.backbone.info.weights == "random"
    report = {
        "method": meta["method"], "profile": meta["profile"], "checkpoint": str(checkpoint),
        "clip_weights": method.backbone.info.weights, "dataset": name, "data_path": str(root), "split": split,
        "image_size": method.image_size, "aupro_mode": aupro_mode, "seconds": round(seconds, 2),
        "setting": setting, "protocol": protocol,
        "protocol_notes": protocols.describe(method, name, shots) if protocol == "paper" else [],
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
                           for seed, d in zip(draw_seeds, draws, strict=True)]
        report["mean_std"] = protocols.mean_std([d["mean"] for d in draws])
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=float))
    write_csv(out_dir / "metrics.csv", result)
    _print_summary(report, result, paper, paper_label, out_dir, seconds, random_clip)
    if collector is not None:
        _write_report(collector, report, meta, method, checkpoint, protocol, len(draws))
    return report


def _write_report(collector, report: dict, meta: dict, method, checkpoint, protocol: str, n_draws: int) -> None:
    """OUT/report.html from what the collector kept (the first draw's images, under few-shot draws)."""
    from zsad.report_html import model_status

    status = model_status(report["clip_weights"], meta.get("epochs"))
    class_opt = " --class-name '{CLASS}'" if method.text_inputs() else ""
    infer: dict[str, str | None] = {
        "command": f"zsad-infer --model {meta['method']} --threshold {{T}}{class_opt} IMAGES...",
        "note": f"(zsad-predict --checkpoint {checkpoint} --threshold ... scores the same way, locally.)"}
    if protocol == "paper":
        infer = {"command": None, "note": "No zsad-infer line: under --protocol paper the image scores follow the "
                 "paper's test script (e.g. normalised over the test images of a class), which a served model, "
                 "scoring each image alone, does not reproduce. Evaluate with --protocol zsad to choose a threshold."}
    if n_draws > 1:
        infer["note"] = (infer["note"] or "") + f" The gallery and curves show the first of {n_draws} draws."
    path = collector.write(report, status, infer)
    click.echo(f"wrote {path} (open it in a browser; thumbnails under {path.parent / 'report_files'})")


if __name__ == "__main__":
    main()
