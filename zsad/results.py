"""The per-image results of a scoring command (zsad-predict locally, zsad-infer against a server).

Both score files in batches, isolate an unreadable image so that the others are still scored, and write
OUT/scores.csv (one row per image, with its error if any), optionally OUT/scores.json, heatmap panels and the
browser report OUT/report.html (the score-sorted gallery with a threshold control: zsad.report_html).
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from zsad import ZsadError


def score_in_batches(paths: Sequence[Path], infer: Callable[[list[Path]], list], batch_size: int, desc: str,
                     progress: bool = True) -> list[tuple[Path, object]]:
    """``(path, prediction)`` per path, or ``(path, ZsadError)`` for an image that could not be scored.

    ``infer(paths)`` scores one batch; when a batch fails it is retried one image at a time, so a bad image
    fails alone.
    """
    from tqdm import tqdm

    outcomes: list[tuple[Path, object]] = []
    batches = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch", dynamic_ncols=True):
        try:
            preds: list = infer(batch)
        except ZsadError:
            preds = []
            for p in batch:
                try:
                    preds += infer([p])
                except ZsadError as err:
                    preds.append(err)
        outcomes += zip(batch, preds, strict=True)
    return outcomes


def result_rows(outcomes, threshold: float | None, with_size: bool = False) -> list[dict]:
    """One CSV row per image: image, score, decision (NG at or above ``threshold``, else OK; empty without one),
    the map's height and width (``with_size``) and the error ("" when scored)."""
    rows = []
    for path, pred in outcomes:
        if isinstance(pred, ZsadError):
            row = {"image": str(path), "score": "", "decision": "", "height": "", "width": "", "error": str(pred)}
        else:
            h, w = pred.anomaly_map.shape
            decision = "" if threshold is None else ("NG" if pred.score >= threshold else "OK")
            row = {"image": str(path), "score": f"{pred.score:.6f}", "decision": decision, "height": h, "width": w,
                   "error": ""}
        if not with_size:
            del row["height"], row["width"]
        rows.append(row)
    return rows


def write_results(out_dir: Path, rows: list[dict], outcomes, heatmaps: bool, summary: dict | None = None,
                  report: dict | None = None) -> None:
    """OUT/scores.csv from ``rows``; OUT/scores.json (``summary`` + the rows) when ``summary`` is given; with
    ``heatmaps``, one input | overlay panel per scored image under OUT/heatmaps (one colour scale for the run); with
    ``report`` ({"title", "threshold", "command"}: :func:`rerun_command`), OUT/report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if summary is not None:
        (out_dir / "scores.json").write_text(json.dumps({
            **summary, "images": [{**r, "score": float(r["score"]) if r["score"] else None} for r in rows]}, indent=2))
    scored = [(path, pred) for path, pred in outcomes if not isinstance(pred, ZsadError)]
    if heatmaps and scored:
        from zsad.visualize import save_prediction_panels

        save_prediction_panels(out_dir / "heatmaps", scored)
    if report is not None:
        from zsad.report_html import write_scores_report

        write_scores_report(out_dir, outcomes, report["threshold"], report["title"], report["command"])


def rerun_command(program: str, images, options: dict) -> str:
    """The command line that scores ``images`` again with ``options`` (None values left out) and the threshold the
    report's control shows (``{T}``)."""
    import shlex

    opts = " ".join(f"{k} {shlex.quote(str(v))}" for k, v in options.items() if v is not None)
    return f"{program} {' '.join(shlex.quote(str(i)) for i in images)} {opts} --threshold {{T}}"


def report_errors(rows: list[dict]) -> bool:
    """Print one ``error:`` line per image that failed (stderr); True when any did."""
    import click

    failed = [r for r in rows if r["error"]]
    for r in failed:
        click.echo(f"error: {r['image']}: {r['error']}", err=True)
    return bool(failed)
