"""zsad-predict: score image files locally with a checkpoint, without a server (the library is :mod:`zsad.predict`)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from zsad import ZsadError
from zsad.cli import cli_entry
from zsad.data.io import image_paths
from zsad.predict import Predictor
from zsad.results import report_errors, rerun_command, result_rows, score_in_batches, write_results


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("images", nargs=-1, required=True)
@click.option("--checkpoint", required=True, type=click.Path(),
              help="Checkpoint folder (train/run.py or zsad-import output), or an authors' released file.")
@click.option("--device", default="cpu", help="Torch device: cpu, cuda, cuda:1, ...")
@click.option("--clip-weights", type=click.Path(), default=None,
              help="Local CLIP weights file for an offline machine (else the checkpoint's own source).")
@click.option("--class-name", default=None, help="The object's class name (e.g. bottle): required by methods "
              "whose prompts use it (Bayes-PFL), ignored by the others.")
@click.option("--batch-size", type=int, default=8, help="Images per forward pass.")
@click.option("--threshold", type=float, default=None, help="Score at or above which an image is NG (else OK).")
@click.option("--out", type=click.Path(), default="predict_out", help="Where scores.csv and heatmaps/ go.")
@click.option("--heatmaps/--no-heatmaps", default=True, help="Write input | overlay PNGs (one colour scale "
              "for the whole run).")
@click.option("--report", is_flag=True, help="Also write OUT/report.html: the images sorted by score with their "
              "maps, and a threshold control that counts NG / OK (open it in a browser; no network).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@cli_entry
def main(images, checkpoint, device, clip_weights, class_name, batch_size, threshold, out, heatmaps, report,
         no_progress):
    """Score IMAGES (files, folders of images and globs) locally, without a server.

    Same pre- and post-processing as the served ensemble: each image is decoded, resized to the model's
    resolution and normalised exactly as the preprocess model does, and its anomaly map is resized back to
    the image's own size. Writes OUT/scores.csv (image, score, decision, height, width, error) and, with
    --heatmaps, OUT/heatmaps/<name>.png; with --report, OUT/report.html (the gallery sorted by score, a
    threshold control). An image that cannot be read is listed with its error and the exit code is 1; the
    others are still scored.
    """
    paths = image_paths(images)
    if not paths:
        raise ZsadError("no images found in " + " ".join(images))
    if batch_size < 1:
        raise ZsadError("--batch-size must be >= 1")
    predictor = Predictor.from_checkpoint(checkpoint, device=device, clip_weights=clip_weights,
                                          batch_size=batch_size)
    if predictor.takes_class_name and not class_name:
        raise ZsadError(f"{predictor.method.name} takes the object's class name: pass --class-name "
                        f"(e.g. --class-name bottle)")
    kwargs = {"class_names": class_name} if predictor.takes_class_name else {}
    t0 = time.perf_counter()
    outcomes = score_in_batches(paths, lambda batch: predictor.predict(batch, **kwargs), batch_size,
                                f"{predictor.method.name} on {predictor.device}", progress=not no_progress)
    rows = result_rows(outcomes, threshold, with_size=True)
    out_dir = Path(out)
    page = None if not report else {
        "title": f"zsad-predict: {predictor.method.name} on {len(paths)} images", "threshold": threshold,
        "command": rerun_command("zsad-predict", images, {"--checkpoint": checkpoint, "--class-name": class_name})}
    write_results(out_dir, rows, outcomes, heatmaps, report=page)
    n_scored = sum(not r["error"] for r in rows)
    click.echo(f"{n_scored} images scored in {time.perf_counter() - t0:.1f} s; wrote {out_dir / 'scores.csv'}"
               + (", heatmaps/" if heatmaps and n_scored else "") + (", report.html" if report else ""))
    if report_errors(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
