"""zsad-serve (run a Triton server on a model repository) and zsad-infer (score images against a served ensemble)."""
from __future__ import annotations

import csv
import glob
import json
import signal
import sys
import threading
import time
from pathlib import Path

import click

from zsad import ZsadError
from zsad.cli import cli_entry


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("repo", type=click.Path())
@click.argument("tritonserver_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--http-port", type=int, default=None, help="HTTP port [default: a free one].")
@click.option("--grpc-port", type=int, default=None, help="gRPC port [default: a free one].")
@click.option("--metrics-port", type=int, default=None, help="Metrics port [default: a free one].")
@click.option("--binary", type=click.Path(), default=None, help="tritonserver binary [default: PATH, else the one "
              "bundled in nvidia-pytriton].")
@click.option("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level.")
@cli_entry
def serve_main(repo, http_port, grpc_port, metrics_port, binary, log_verbose, tritonserver_args):
    """Start tritonserver on REPO (loopback only), print the endpoints, stop cleanly on Ctrl-C / SIGTERM.

    Arguments after `--` go to tritonserver as they are (e.g. `zsad-serve repo -- --log-info=false`). Clients
    cannot use the shared-memory, repository, trace and logging APIs; a model whose python stub dies is reloaded
    (logged), and if that fails zsad-serve stops with an error rather than serve a broken model.
    """
    import logging

    from zsad.serve.server import TritonServer

    logging.basicConfig(level=logging.INFO, format="zsad-serve %(levelname)s: %(message)s")
    server = TritonServer(repo, http_port, grpc_port, metrics_port, binary, log_verbose=log_verbose,
                          extra_args=list(tritonserver_args))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"starting tritonserver on {Path(repo).resolve()} ...")
    server.start()
    try:
        models = server.models()
        click.echo(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics 127.0.0.1:{server.metrics_port}")
        for m in models:
            click.echo(f"  {m['name']:<36} {m.get('state', '?')}")
        click.echo(f"log: {server.log_path}   (Ctrl-C to stop)")
        while not stop.is_set():
            if server.process.poll() is not None:
                raise ZsadError(f"tritonserver exited unexpectedly (code {server.process.returncode}):\n"
                                f"{server.log_tail()}")
            if not server.healthy:
                raise ZsadError(f"a model's python stub died and could not be reloaded: {server.events[-1]['model']}")
            stop.wait(0.5)
        click.echo("stopping ...")
    finally:
        server.stop()
    click.echo("stopped")


def expand_images(patterns) -> list[Path]:
    """Files, folders (their images, recursively) and glob patterns -> sorted unique image paths."""
    from zsad.data.io import is_image_file

    found: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(pat, recursive=True))
            if not matches:
                raise ZsadError(f"no such file, folder or glob match: {pat}")
            found += [m for m in matches if m.is_file() and is_image_file(m)]
    return list(dict.fromkeys(found))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("images", nargs=-1, required=True)
@click.option("--url", default="127.0.0.1:8000", help="Server address; 'grpc://host:port' selects gRPC.")
@click.option("--model", required=True, help="Ensemble name (as exported, e.g. bagclip).")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default=None, help="Overrides the URL scheme.")
@click.option("--batch-size", type=int, default=8, help="Images per request.")
@click.option("--threshold", type=float, default=None, help="Score at or above which an image is NG (else OK).")
@click.option("--out", type=click.Path(), default="infer_out", help="Where scores.csv / scores.json / heatmaps go.")
@click.option("--heatmaps/--no-heatmaps", default=True, help="Write heatmap overlay PNGs.")
@click.option("--class-name", default=None, help="The object's class name (e.g. bottle, 'metal nut'): required by "
              "models whose prompts use it (Bayes-PFL), ignored by the others.")
@click.option("--no-progress", is_flag=True)
@cli_entry
def infer_main(images, url, model, protocol, batch_size, threshold, out, heatmaps, class_name, no_progress):
    """Score IMAGES (files, folders, globs) with a served zsad ensemble; write scores and heatmaps."""
    from tqdm import tqdm

    from zsad.serve.client import AnomalyClient

    paths = expand_images(images)
    if not paths:
        raise ZsadError("no images found in " + " ".join(images))
    if batch_size < 1:
        raise ZsadError("--batch-size must be >= 1")
    client = AnomalyClient(url, model, protocol)
    if client.text_fields and not class_name:
        raise ZsadError(f"model '{model}' takes the object's class name with every image: pass --class-name "
                        f"(e.g. --class-name bottle)")
    if class_name and not client.text_fields:
        click.echo(f"note: model '{model}' does not use a class name; --class-name ignored", err=True)
    out_dir = Path(out)
    rows, results, t0 = [], [], time.perf_counter()
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    for batch in tqdm(batches, desc=f"{model} @ {client.protocol}://{client.url}", disable=no_progress,
                      unit="batch", dynamic_ncols=True):
        try:
            preds = client.infer(batch, class_names=class_name)
        except ZsadError:
            preds = []
            for p in batch:  # isolate the bad image(s): one request each
                try:
                    preds += client.infer([p], class_names=class_name)
                except ZsadError as err:
                    preds.append(err)
        for path, pred in zip(batch, preds):
            if isinstance(pred, ZsadError):
                rows.append({"image": str(path), "score": "", "decision": "", "error": str(pred)})
                continue
            decision = "" if threshold is None else ("NG" if pred.score >= threshold else "OK")
            rows.append({"image": str(path), "score": f"{pred.score:.6f}", "decision": decision, "error": ""})
            results.append((path, pred))
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "score", "decision", "error"])
        w.writeheader()
        w.writerows(rows)
    (out_dir / "scores.json").write_text(json.dumps({
        "model": model, "url": url, "protocol": client.protocol, "threshold": threshold, "class_name": class_name,
        "seconds": round(seconds, 3),
        "images": [{**r, "score": float(r["score"]) if r["score"] else None} for r in rows]}, indent=2))
    if heatmaps and results:
        from zsad.visualize import save_prediction_panels

        save_prediction_panels(out_dir / "heatmaps", results)
    failed = [r for r in rows if r["error"]]
    ng = sum(r["decision"] == "NG" for r in rows)
    click.echo(f"{len(rows) - len(failed)} images scored in {seconds:.1f} s"
               + (f", {ng} NG at threshold {threshold}" if threshold is not None else "")
               + f"; wrote {out_dir / 'scores.csv'}, scores.json" + (", heatmaps/" if heatmaps and results else ""))
    for r in failed:
        click.echo(f"error: {r['image']}: {r['error']}", err=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    serve_main()
