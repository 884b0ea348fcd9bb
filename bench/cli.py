"""zsad-bench: latency, FPS and VRAM of every model and backend, beside the papers' own tables.

    zsad-bench --model bagclip,anomalyclip --profile paper --image-size 518 --batch 1,8,32 \\
               --backend torch-fp32,torch-fp16,torch-bf16,torch-compile,cuda-graphs,cuda-graphs-fp16,ort,served \\
               --device cuda

cuda-graphs-fp16 / -bf16 are the fast path: the whole chain under autocast (fp32 islands where autocast keeps
them: LayerNorm, softmax, reductions), captured as one CUDA graph, with the Triton kernels on the hot path.

For each (model, backend, batch): warm-up, timed iterations (CUDA events on a GPU, synchronised perf_counter on
the CPU), p50/p90/p99 per batch and per image, images/s, peak VRAM, analytic GFLOPs and achieved TFLOP/s, and
parity against torch fp32 eager on the same synthetic-defect images (so a fast but wrong backend shows as wrong).
torch-fp32 at batch 1 is the papers' setting; every row states its speed-up over it, measured in the same run.
Backends that cannot run here are listed as skipped with the reason. Writes bench/results/<date>-<model>-
<device>-<torch>.json / .csv / .md / .png. Weights are random unless --checkpoint is given (timing does not
depend on them); the parity check compares backends with each other, not with the truth.
<date>-<model>-<device>-<torch>.html is the browser report (plots, the sortable table, the per-stage and per-op
breakdowns, the papers' figures where comparable, the machine and versions).
``zsad-bench --replot RESULT.json`` redraws the PNG and rewrites the .md and .html of a result file as the current
report writes them. ``zsad-bench --compare A.json B.json`` runs nothing: it puts two earlier results of one method
side by side (the speed-up of B over A per configuration both timed) in compare-<A>-vs-<B>.html / .md under --out.

``zsad-bench --curves A.json --curves B.json ...`` runs nothing: it draws latency per image vs batch and vs image size
and served throughput vs concurrency from earlier results of one machine (``zsad.bench.curves``).

``zsad-bench --forecast h100,h200,a100,l4 --model ... --batch 1,8,32`` runs nothing: it writes a roofline forecast
(``zsad.bench.forecast``: per-stage FLOPs and bytes at fp32 / tf32 / fp16 / bf16 / int8 against each GPU's published
peaks; lower-bound latency, throughput ceilings, the GPU goals and the papers' figures beside them), labelled
*forecast, not measured*, to <date>-forecast-<profile>-<models>.json / .md / .png; ``--measured RESULT.json`` (a
zsad-bench GPU run) adds measured / forecast per stage.

This module is the command only: the run is ``zsad.bench.model_bench``, the backends ``zsad.bench.backends``, the result
files ``zsad.bench.report``.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
import torch

from zsad import ZsadError
from zsad.cli import cli_entry
from zsad.export import runtimes
from zsad.export.cli import BackendChoice
from zsad.export.openvino_export import PRECISIONS
from zsad.export.triton_repo import OV_PERFORMANCE_HINTS


def _python_model(runtime) -> bool:
    """Served mode exports for the CPU server zsad-serve starts: python-backend models only."""
    return runtime.runs_on() == {"backend": "python"}


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v]
    except ValueError as err:
        raise ZsadError(f"expected comma-separated integers, got '{text}'") from err
    if not out or min(out) < 1:
        raise ZsadError(f"expected positive integers, got '{text}'")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="bagclip", help="Comma-separated methods.")
@click.option("--profile", default="paper", help="paper (ViT-L-14-336, random weights) or tiny.")
@click.option("--image-size", type=int, default=None, help="Input size [default: the profile's, 518 for paper].")
@click.option("--batch", default="1,8,32", help="Comma-separated batch sizes.")
@click.option("--backend", default=None,
              help="Comma-separated: torch-fp32, torch-fp16, torch-bf16, torch-compile, torch-compile-bf16, "
                   "cuda-graphs, cuda-graphs-fp16, cuda-graphs-bf16, ort, ort-int8, openvino-fp32, openvino-bf16, "
                   "openvino-int8, openvino-int8-bf16 (CPU; with per-stage times), tensorrt, served. Each runs in its "
                   "own worker process (its peak RSS in its rows). [default: on a GPU "
                   "torch-fp32,torch-fp16,torch-bf16,torch-compile,cuda-graphs,cuda-graphs-fp16,cuda-graphs-bf16,ort,"
                   "served; on the CPU chosen from its instruction sets: torch-fp32, torch-compile, torch-bf16 and "
                   "torch-compile-bf16 where it has bf16, ort, openvino at each precision zsad-export --precision "
                   "auto would try there, served]")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu.")
@click.option("--iters", type=int, default=20, help="Timed iterations per configuration.")
@click.option("--warmup", type=int, default=3, help="Untimed warm-up iterations.")
@click.option("--checkpoint", type=click.Path(), default=None, help="Time a trained checkpoint (single --model).")
@click.option("--served-url", default=None, help="gRPC address of a running server holding an ensemble named like "
              "the method (e.g. 127.0.0.1:8001 after zsad-serve). Default: export and serve one here (python-ort, "
              "with and without dynamic batching).")
@click.option("--concurrency", default="1,2,4,8,16,32,64", help="Served mode: in-flight requests to sweep.")
@click.option("--served-seconds", type=float, default=10.0, help="Served mode: seconds per concurrency level.")
@click.option("--served-backend", type=BackendChoice(_python_model),
              default="python-ort",
              help="Served mode without --served-url: the stage backend exported (python-torch with --device cuda: "
                   "the torch chain on the GPU, KIND_GPU instances; python-openvino: OpenVINO on the CPU, at "
                   "--served-precision).")
@click.option("--served-precision", type=click.Choice([*PRECISIONS, "auto"]), default="fp32",
              help="Served mode, python-openvino: the precision exported (all but fp32 must pass the precision gate; "
                   "auto: what zsad-export --precision auto keeps on this machine, the rows say which).")
@click.option("--served-hint", type=click.Choice(OV_PERFORMANCE_HINTS), default="latency",
              help="Served mode, python-openvino: OpenVINO's performance hint in the exported stages (zsad-export "
                   "--ov-hint): latency (one stream on every core) or throughput (several streams, the images of a "
                   "dynamic batch run on them at once).")
@click.option("--calibration-images", type=int, default=16,
              help="ort-int8 / openvino-int8(-bf16) / served int8: synthetic images the int8 calibration uses.")
@click.option("--out", type=click.Path(), default="bench/results", help="Where the result files go.")
@click.option("--no-progress", is_flag=True)
@click.option("--replot", type=click.Path(), multiple=True,
              help="Redraw the PNG and rewrite the .md of this result JSON (repeatable) and run nothing else.")
@click.option("--compare", nargs=2, type=click.Path(), default=None, metavar="A.json B.json",
              help="Put two earlier zsad-bench results of one method side by side (B's speed-up over A per "
                   "configuration timed in both) in OUT/compare-<A>-vs-<B>.html and .md; runs nothing.")
@click.option("--curves", type=click.Path(), multiple=True,
              help="Draw cost-as-work-grows curves from earlier results of one machine (repeatable: latency per "
                   "image vs batch and vs image size, served images/s vs concurrency) into OUT/<date>-curves-"
                   "<methods>.png / .md / .csv / .json; runs nothing.")
@click.option("--forecast", "forecast_gpus", default=None,
              help="Comma-separated GPUs (h100, h100-pcie, h200, a100, l4, rtx3090): write a roofline forecast for "
                   "--model / --profile / --batch (forecast, not measured) and time nothing.")
@click.option("--measured", type=click.Path(), multiple=True,
              help="With --forecast: a zsad-bench result JSON of a GPU run (repeatable), set beside the forecast "
                   "(measured / forecast per stage).")
@cli_entry
def main(model, profile, image_size, batch, backend, device, iters, warmup, checkpoint, served_url, concurrency,
         served_seconds, served_backend, served_precision, served_hint, calibration_images, out, no_progress, replot,
         compare, curves, forecast_gpus, measured):
    """Benchmark latency / FPS / VRAM of zsad methods across backends, beside the papers' tables."""
    from zsad.bench.html_report import write_page
    from zsad.bench.model_bench import bench_model
    from zsad.bench.report import environment, paper_rows, paper_setting, summary_table, write_results
    from zsad.bench.report import replot as replot_png

    if forecast_gpus is not None or measured:
        _forecast(model, profile, image_size, batch, forecast_gpus, measured, out)
        return
    if compare:
        from zsad.bench.html_report import write_compare

        paths = write_compare(Path(out), Path(compare[0]), Path(compare[1]))
        click.echo(f"wrote {paths['html']} and {paths['md']}")
        return
    if curves:
        from zsad.bench.curves import write_curves

        paths = write_curves(Path(out), [Path(p) for p in curves])
        click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
        return
    if replot:
        for path in replot:
            png = replot_png(Path(path))
            write_page(Path(path))
            click.echo(f"wrote {png}, {png.with_suffix('.md')} and {png.with_suffix('.html')}")
        return
    models = [m for m in model.split(",") if m]
    if backend is None:
        from zsad.bench.backends import default_backends
        from zsad.cpu import read_cpu

        backends = default_backends(device, read_cpu(measure=False))
        click.echo(f"backends (default for {device} on this machine): {','.join(backends)}")
    else:
        backends = [b for b in backend.split(",") if b]
    _check_arguments(models, backends, device, checkpoint, iters, warmup, calibration_images, served_backend,
                     served_precision, served_hint, served_url)
    batches, levels = _ints(batch), _ints(concurrency)
    command = "zsad-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    env = environment(device)
    for m in models:
        method, flops, rows = bench_model(m, profile, image_size, batches, backends, device, iters, warmup,
                                          checkpoint, served_url, levels, served_seconds, not no_progress,
                                          served_backend=served_backend, served_precision=served_precision,
                                          served_hint=served_hint, calibration_images=calibration_images)
        paper_name, paper_size = paper_setting(method.name)
        paths = write_results(Path(out), m, method.profile, rows, env, paper_rows(), flops, command,
                              plot_method=paper_name, paper_image_size=paper_size)
        paths["html"] = write_page(paths["json"])
        click.echo(summary_table(m, rows))
        click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
    from zsad.bench.worker import peak_rss_mb

    click.echo(f"peak RSS of this process (the timed backends ran in worker processes, each row has its own): "
               f"{peak_rss_mb() or float('nan'):.0f} MB")


def _forecast(model: str, profile: str, image_size: int | None, batch: str, gpus: str | None,
              measured: tuple[str, ...], out: str) -> None:
    """zsad-bench --forecast: the roofline forecast's files (zsad.bench.forecast, zsad.bench.report)."""
    import zsad.methods as M
    from zsad.bench.forecast import forecast, load_measured, parse_gpus
    from zsad.bench.report import environment, write_forecast

    if gpus is None:
        raise ZsadError("--measured needs --forecast GPUS (e.g. --forecast h100)")
    keys = parse_gpus(gpus)
    models = [m for m in model.split(",") if m]
    unknown = [m for m in models if m not in M.METHODS]
    if unknown or not models:
        raise ZsadError(f"unknown method(s) {unknown or '(none given)'} for --model; known: {', '.join(M.METHODS)}")
    batches = _ints(batch)
    results = [load_measured(p) for p in measured]
    command = "zsad-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    payload = forecast(models, profile, image_size, batches, keys, results, log=click.echo)
    paths = write_forecast(Path(out), payload, command, environment("cpu"))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()) + " (forecast, not measured)")


def _check_arguments(models, backends, device, checkpoint, iters, warmup, calibration_images, served_backend,
                     served_precision, served_hint="latency", served_url=None) -> None:
    """Reject a bad combination of options before anything is built (a one-line error each)."""
    from zsad.bench.backends import known_backends

    unknown = [b for b in backends if b not in known_backends()]
    if unknown:
        raise ZsadError(f"unknown backend(s) {unknown}; known: {', '.join(known_backends())}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ZsadError(f"--device must be cpu or cuda, got '{device}'")
    if checkpoint and len(models) != 1:
        raise ZsadError("--checkpoint times one method: give a single --model")
    if iters < 1 or warmup < 0:
        raise ZsadError("--iters must be >= 1 and --warmup >= 0")
    if calibration_images < 1:
        raise ZsadError(f"--calibration-images must be >= 1, got {calibration_images}")
    if served_precision != "auto" and served_precision not in runtimes.get(served_backend).precisions:
        takers = " / ".join(rt.name for rt in runtimes.RUNTIMES.values()
                            if _python_model(rt) and served_precision in rt.precisions)
        raise ZsadError(f"--served-precision {served_precision} needs --served-backend {takers}")
    if served_url and served_precision == "auto":
        raise ZsadError("--served-precision auto picks the precision of an export made here: against --served-url "
                        "give the precision that server runs")
    if served_hint != "latency" and not runtimes.get(served_backend).takes_ov_hint:
        raise ZsadError(f"--served-hint {served_hint} is an OpenVINO hint: it needs --served-backend python-openvino")


if __name__ == "__main__":
    main()
