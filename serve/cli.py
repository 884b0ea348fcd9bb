"""zsad-serve (run a Triton server on a model repository) and zsad-infer (score images against a served ensemble)."""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import click

from zsad import ZsadError
from zsad.cli import cli_entry
from zsad.data.io import image_paths
from zsad.results import report_errors, rerun_command, result_rows, score_in_batches, write_results


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("repo", type=click.Path())
@click.argument("tritonserver_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--http-port", type=int, default=None, help="HTTP port [default: a free one].")
@click.option("--grpc-port", type=int, default=None, help="gRPC port [default: a free one].")
@click.option("--metrics-port", type=int, default=None, help="Metrics port [default: a free one].")
@click.option("--binary", type=click.Path(), default=None, help="tritonserver binary [default: PATH, else the one "
              "bundled in nvidia-pytriton].")
@click.option("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level.")
@click.option("--run-dir", type=click.Path(), default=None, help="Private folder (0700) for the admin key file and "
              "server.json, where zsad-deploy finds this server [default: $XDG_RUNTIME_DIR or the temp dir, "
              "/zsad-serve-<uid>/<hash of REPO's path>].")
@click.option("--drain-timeout", type=float, default=30.0, help="On SIGTERM / Ctrl-C: how long to wait for the "
              "requests already accepted to finish before stopping anyway.")
@click.option("--allow-key-in-argv", is_flag=True, help="Where no C compiler exists to build the shim that hands "
              "tritonserver the admin key, put the key on its command line (every local user can read it with ps) "
              "instead of refusing to start.")
@cli_entry
def serve_main(repo, http_port, grpc_port, metrics_port, binary, log_verbose, run_dir, drain_timeout,
               allow_key_in_argv, tritonserver_args):
    """Start tritonserver on REPO (loopback only), print the endpoints, drain and stop on Ctrl-C / SIGTERM.

    Arguments after `--` go to tritonserver as they are (e.g. `zsad-serve repo -- --log-info=false`), except ones
    that would change what zsad relies on (ports: use the options below; a model control mode other than explicit;
    HTTP or strict readiness off), which are refused. Clients
    cannot use the shared-memory, repository, trace and logging APIs: their key is in an owner-only file of the run
    directory, never on a command line. A model whose python stub dies is reloaded (logged), and if that fails
    zsad-serve stops with an error rather than serve a broken model. On SIGTERM readiness turns false, every model
    is unloaded (requests already accepted are answered, new ones refused), then tritonserver stops. Model
    versions are switched while it runs with zsad-deploy.
    """
    import logging

    from zsad.serve.server import TritonServer, default_run_dir

    logging.basicConfig(level=logging.INFO, format="zsad-serve %(levelname)s: %(message)s")
    server = TritonServer(repo, http_port, grpc_port, metrics_port, binary, log_verbose=log_verbose,
                          extra_args=list(tritonserver_args), run_dir=run_dir or default_run_dir(repo),
                          allow_key_in_argv=allow_key_in_argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"starting tritonserver on {Path(repo).resolve()} ...")
    server.start()
    try:
        models = server.models()
        click.echo(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}")
        for m in models:
            click.echo(f"  {m['name']:<36} {m.get('state', '?')}")
        click.echo(f"log: {server.log_path}   run dir: {server.run_dir}   (Ctrl-C to stop)")
        while not stop.is_set():
            if server.process.poll() is not None:
                raise ZsadError(f"tritonserver exited unexpectedly (code {server.process.returncode}):\n"
                                f"{server.log_tail()}")
            if not server.healthy:
                raise ZsadError(f"a model's python stub died and could not be reloaded: {server.events[-1]['model']}")
            stop.wait(0.5)
        click.echo("draining: not ready, finishing accepted requests ...")
        drained = server.drain(drain_timeout)
        click.echo(f"drained in {drained['seconds']} s" if drained["drained"] else
                   f"drain timed out after {drained['seconds']} s, still busy: {', '.join(drained['left'])}")
        click.echo("stopping ...")
    finally:
        server.stop()
    click.echo("stopped")


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
@click.option("--report", is_flag=True, help="Also write OUT/report.html: the images sorted by score with their "
              "maps, and a threshold control that counts NG / OK (open it in a browser; no network).")
@click.option("--no-progress", is_flag=True)
@cli_entry
def infer_main(images, url, model, protocol, batch_size, threshold, out, heatmaps, class_name, report, no_progress):
    """Score IMAGES (files, folders, globs) with a served zsad ensemble; write scores and heatmaps."""
    from zsad.serve.client import AnomalyClient

    paths = image_paths(images)
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
    t0 = time.perf_counter()
    outcomes = score_in_batches(paths, lambda batch: client.infer(batch, class_names=class_name), batch_size,
                                f"{model} @ {client.protocol}://{client.url}", progress=not no_progress)
    seconds = time.perf_counter() - t0
    rows = result_rows(outcomes, threshold)
    write_results(out_dir, rows, outcomes, heatmaps, summary={
        "model": model, "url": url, "protocol": client.protocol, "threshold": threshold, "class_name": class_name,
        "seconds": round(seconds, 3)}, report=None if not report else {
        "title": f"zsad-infer: {model} on {len(paths)} images", "threshold": threshold,
        "command": rerun_command("zsad-infer", images, {"--url": url, "--model": model, "--class-name": class_name})})
    n_scored = sum(not r["error"] for r in rows)
    ng = sum(r["decision"] == "NG" for r in rows)
    click.echo(f"{n_scored} images scored in {seconds:.1f} s"
               + (f", {ng} NG at threshold {threshold}" if threshold is not None else "")
               + f"; wrote {out_dir / 'scores.csv'}, scores.json" + (", heatmaps/" if heatmaps and n_scored else "")
               + (", report.html" if report else ""))
    if report_errors(rows):
        sys.exit(1)


if __name__ == "__main__":
    serve_main()
