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
"""
from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import click
import numpy as np
import torch

from zsad import ZsadError
from zsad.cli import cli_entry

PARITY_TOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1, "int8": 1e-1}  # score/map max relative error vs torch fp32
# bf16 / int8 also pass zsad-export's precision gate criteria on the parity images (zsad.export.openvino_export):
# anomaly-map correlation and image-score Spearman >= 0.99 (pixel AUROC needs masks: zsad-export checks it)
GATE_MIN = {"map_corr": 0.99, "score_spearman": 0.99}


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v]
    except ValueError as err:
        raise ZsadError(f"expected comma-separated integers, got '{text}'") from err
    if not out or min(out) < 1:
        raise ZsadError(f"expected positive integers, got '{text}'")
    return out


def _rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of image pairs that both score vectors order the same way (1.0 = identical ranking)."""
    n = len(a)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        return 1.0
    return float(np.mean([np.sign(a[i] - a[j]) == np.sign(b[i] - b[j]) for i, j in pairs]))


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def build(model: str, profile: str, image_size: int | None, checkpoint: str | None):
    import zsad.methods as M
    from zsad.checkpoint import load_checkpoint

    overrides = {"backbone": {"image_size": image_size}} if image_size else {}
    if checkpoint:
        return load_checkpoint(checkpoint, overrides=overrides)[0], overrides
    overrides = {**overrides, "backbone": {**overrides.get("backbone", {}), "pretrained": None}}
    return M.create(model, profile, **overrides), overrides


def bench_model(model: str, profile: str, image_size: int | None, batches: list[int], backends: list[str],
                device: str, iters: int, warmup: int, checkpoint: str | None, served_url: str | None,
                concurrency: list[int], served_seconds: float, progress: bool, log=click.echo,
                served_backend: str = "python-ort", served_precision: str = "fp32",
                calibration_images: int = 16):
    from tqdm import tqdm

    from zsad.bench.flops import method_flops
    from zsad.bench.runners import Scratch, Skip, make_runner, stage_feed
    from zsad.bench.timing import percentiles, time_iterations
    from zsad.export.parity import synthetic_images
    from zsad.methods import run_stages

    method, overrides = build(model, profile, image_size, checkpoint)
    size = method.image_size
    flops = method_flops(method)
    parity_x = torch.from_numpy(synthetic_images(size, n=4))
    with torch.inference_mode():
        ref = run_stages(method.eval().stages(), **stage_feed(method, parity_x))
    ref_score, ref_map = ref["score"].numpy().astype(np.float64), ref["anomaly_map"].numpy().astype(np.float64)
    base = {"model": model, "profile": method.profile, "image_size": size, "device": device,
            "gflops_per_image": round(flops["total"], 3)}
    rows: list[dict] = []
    timed = [b for b in backends if b != "served"]
    bar = tqdm(total=len(timed) * len(batches) + (1 if "served" in backends else 0), disable=not progress,
               desc=f"bench {model}", dynamic_ncols=True)
    scratch = Scratch(calibration_images=calibration_images)  # ONNX exported once for ort / ort-int8 / openvino-*
    for backend in timed:
        try:
            runner = make_runner(backend, method, device, max(batches), scratch)
        except Skip as skip:
            rows += [{**base, "backend": backend, "precision": "-", "batch": b, "status": "skipped",
                      "reason": str(skip)} for b in batches]
            bar.update(len(batches))
            continue
        score, amap = runner.predict(parity_x)
        parity = _parity(ref_score, ref_map, score, amap, runner.precision)
        for b in batches:
            x = parity_x[torch.arange(b) % len(parity_x)].contiguous()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            try:
                samples = time_iterations(runner.make_step(x), iters, warmup, device)
            except Exception as err:  # e.g. out of memory at a large batch
                rows.append({**base, "backend": backend, "precision": runner.precision, "batch": b,
                             "status": "skipped", "reason": f"{type(err).__name__}: {str(err)[:200]}"})
                bar.update(1)
                continue
            stats = percentiles(samples)
            stage_ms = {}
            if runner.stage_steps is not None:  # where the time goes: each stage alone on its real inputs
                stage_ms = {name: percentiles(time_iterations(step, iters, min(warmup, 1), device))["p50_ms"]
                            for name, step in runner.stage_steps(x)}
            # achieved_tflops: GFLOP per ms is TFLOP/s
            row = {**base, "backend": backend, "precision": runner.precision, "batch": b, "status": "ok",
                   "reason": "", "iters": iters, **stats, "p50_ms_per_image": stats["p50_ms"] / b,
                   "images_per_s": 1000.0 * b / stats["p50_ms"],
                   "achieved_tflops": flops["total"] * b / stats["p50_ms"], **parity, "note": runner.note}
            if stage_ms:
                row["stage_ms"] = stage_ms
            if device.startswith("cuda"):
                row["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
                row["nvml_used_mb"] = _nvml_used_mb(device)
            rows.append(row)
            bar.update(1)
    shutil.rmtree(scratch.workdir, ignore_errors=True)  # the temporary folder Scratch made for this run
    if "served" in backends:
        rows += _served_rows(base, method, checkpoint, overrides, served_url, concurrency, served_seconds,
                             ref_score, ref_map, log, served_backend, device, served_precision, calibration_images)
        bar.update(1)
    bar.close()
    _speedups(rows)
    return method, flops, rows


def _served_rows(base, method, checkpoint, overrides, served_url, concurrency, seconds, ref_score, ref_map, log,
                 served_backend="python-ort", device="cpu", precision="fp32", calibration_images=16):
    import io

    from PIL import Image

    from zsad.bench.served import export_and_serve, served_predictions, sweep_one
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample

    pngs = []
    for i in range(4):  # the same images as the parity batch, encoded
        cls = SYNTHETIC_TEST_CLASSES[i % len(SYNTHETIC_TEST_CLASSES)]
        buf = io.BytesIO()
        Image.fromarray(render_sample(cls, "test_good" if i % 3 == 2 else "test_defect", i).image).save(buf, "PNG")
        pngs.append(buf.getvalue())
    rows = []

    texts = None
    if method.text_inputs():  # the same class names the reference used (zsad.bench.runners.stage_feed)
        from zsad.export.parity import synthetic_class_names

        texts = {ti.request_name: synthetic_class_names(len(pngs)) for ti in method.text_inputs()}

    def sweep(grpc_url, variants):
        score, amap = served_predictions(f"grpc://{grpc_url}", variants[0][0], pngs, texts)
        parity = _parity(ref_score, ref_map, score, amap, precision)
        for name, dynamic in variants:
            for c in concurrency:
                r = sweep_one(grpc_url, name, pngs, c, seconds, texts)
                rows.append({**base, "backend": "served", "precision": precision, "batch": 1, "concurrency": c,
                             "dynamic_batching": dynamic, "status": "ok" if r["requests"] else "skipped",
                             "reason": "" if r["requests"] else f"no request completed: {r['error_examples']}",
                             **{k: r.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s")},
                             "p50_ms_per_image": r.get("p50_ms"), "iters": r["requests"], **parity,
                             "note": f"{r['errors']} errors; {r['wall_s']} s; p95 {r.get('p95_ms')}"})

    if served_url:
        host = served_url.split("://")[-1]
        log(f"served mode against grpc://{host}, ensemble '{method.name}'")
        sweep(host, [(method.name, None)])
        return rows
    log(f"served mode: exporting ({served_backend}, {precision}) with and without dynamic batching and starting "
        "tritonserver ...")
    try:
        # max batch: at least the 4 parity images of one request, and room for the batcher at high concurrency
        with export_and_serve(method.name, method.profile, checkpoint, overrides, max(8, *concurrency),
                              backend=served_backend, device="gpu" if device.startswith("cuda") else "cpu",
                              precision=precision, calibration_images=calibration_images) as server:
            sweep(server.grpc_url, [(method.name, True), (f"{method.name}_nodb", False)])
    except ZsadError as err:
        rows.append({**base, "backend": "served", "precision": precision, "batch": 1, "status": "skipped",
                     "reason": str(err)[:300]})
    return rows


def _parity(ref_score, ref_map, score, amap, precision: str) -> dict:
    """Max relative errors and rank agreement vs torch fp32; bf16 / int8 also get the gate's correlations and
    pass on those (their max relative error is large by nature, their ranking may swap near-ties)."""
    out = {"parity_score_max_rel": _rel(ref_score, score), "parity_map_max_rel": _rel(ref_map, amap),
           "parity_rank_agreement": _rank_agreement(ref_score, score)}
    within = max(out["parity_score_max_rel"], out["parity_map_max_rel"]) <= PARITY_TOL[precision]
    if precision in ("bf16", "int8"):
        from zsad.export.openvino_export import gate_metrics

        m = gate_metrics(ref_score, ref_map, score, amap, np.zeros(np.shape(ref_map)))
        out["parity_map_corr"], out["parity_score_spearman"] = m["map_corr"], m["score_spearman"]
        out["parity_ok"] = bool(within and m["map_corr"] >= GATE_MIN["map_corr"]
                                and m["score_spearman"] >= GATE_MIN["score_spearman"])
    else:
        out["parity_ok"] = bool(within and out["parity_rank_agreement"] == 1.0)
    return out


def _nvml_used_mb(device: str) -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    except Exception:
        return None


def _speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["backend"] == "torch-fp32" and r["batch"] == 1 and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok" and r.get("p50_ms_per_image"):
            r["speedup_vs_torch_fp32_b1"] = base["p50_ms_per_image"] / r["p50_ms_per_image"]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="bagclip", help="Comma-separated methods.")
@click.option("--profile", default="paper", help="paper (ViT-L-14-336, random weights) or tiny.")
@click.option("--image-size", type=int, default=None, help="Input size [default: the profile's, 518 for paper].")
@click.option("--batch", default="1,8,32", help="Comma-separated batch sizes.")
@click.option("--backend", default="torch-fp32,torch-fp16,torch-bf16,torch-compile,cuda-graphs,cuda-graphs-fp16,"
              "cuda-graphs-bf16,ort,served",
              help="Comma-separated: torch-fp32, torch-fp16, torch-bf16, torch-compile, cuda-graphs, cuda-graphs-fp16, "
                   "cuda-graphs-bf16, ort, ort-int8, openvino-fp32, openvino-bf16, openvino-int8 (CPU; with "
                   "per-stage times), tensorrt, served.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu.")
@click.option("--iters", type=int, default=20, help="Timed iterations per configuration.")
@click.option("--warmup", type=int, default=3, help="Untimed warm-up iterations.")
@click.option("--checkpoint", type=click.Path(), default=None, help="Time a trained checkpoint (single --model).")
@click.option("--served-url", default=None, help="gRPC address of a running server holding an ensemble named like "
              "the method (e.g. 127.0.0.1:8001 after zsad-serve). Default: export and serve one here (python-ort, "
              "with and without dynamic batching).")
@click.option("--concurrency", default="1,2,4,8,16,32,64", help="Served mode: in-flight requests to sweep.")
@click.option("--served-seconds", type=float, default=10.0, help="Served mode: seconds per concurrency level.")
@click.option("--served-backend", type=click.Choice(["python-ort", "python-torch", "python-openvino"]),
              default="python-ort",
              help="Served mode without --served-url: the stage backend exported (python-torch with --device cuda: "
                   "the torch chain on the GPU, KIND_GPU instances; python-openvino: OpenVINO on the CPU, at "
                   "--served-precision).")
@click.option("--served-precision", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32",
              help="Served mode, python-openvino: the precision exported (bf16 / int8 must pass the precision gate).")
@click.option("--calibration-images", type=int, default=16,
              help="ort-int8 / openvino-int8 / served int8: synthetic images the int8 calibration uses.")
@click.option("--out", type=click.Path(), default="bench/results", help="Where the result files go.")
@click.option("--no-progress", is_flag=True)
@cli_entry
def main(model, profile, image_size, batch, backend, device, iters, warmup, checkpoint, served_url, concurrency,
         served_seconds, served_backend, served_precision, calibration_images, out, no_progress):
    """Benchmark latency / FPS / VRAM of zsad methods across backends, beside the papers' tables."""
    from zsad.bench.report import environment, write_results
    from zsad.bench.runners import BACKENDS
    import zsad.methods as M
    from zsad.methods import METHODS
    from zsad.reference import efficiency_rows

    models = [m for m in model.split(",") if m]
    backends = [b for b in backend.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ZsadError(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ZsadError(f"--device must be cpu or cuda, got '{device}'")
    if checkpoint and len(models) != 1:
        raise ZsadError("--checkpoint times one method: give a single --model")
    if iters < 1 or warmup < 0:
        raise ZsadError("--iters must be >= 1 and --warmup >= 0")
    if calibration_images < 1:
        raise ZsadError(f"--calibration-images must be >= 1, got {calibration_images}")
    if served_precision != "fp32" and served_backend != "python-openvino":
        raise ZsadError(f"--served-precision {served_precision} needs --served-backend python-openvino")
    command = "zsad-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    env = environment(device)
    for m in models:
        method, flops, rows = bench_model(m, profile, image_size, _ints(batch), backends, device, iters, warmup,
                                          checkpoint, served_url, _ints(concurrency), served_seconds, not no_progress,
                                          served_backend=served_backend, served_precision=served_precision,
                                          calibration_images=calibration_images)
        # the papers' per-method latency rows (variants in brackets, e.g. Bayes-PFL's R sweep, are left out)
        paper = [p for p in efficiency_rows() if p["quantity"] in ("latency_ms", "fps", "it_per_s")
                 and p["method"] in {cls.paper_name for cls in METHODS.values() if cls.paper_name}]
        # the papers' image size for this method: the paper profile's (a figure is comparable only at it)
        paper_size = M.resolve_config(m, "paper").backbone.image_size if method.paper_name else None
        paths = write_results(Path(out), m, method.profile, rows, env, paper, flops, command,
                              plot_method=method.paper_name or None, paper_image_size=paper_size)
        click.echo(summary_table(m, rows))
        click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def summary_table(model: str, rows: list[dict]) -> str:
    lines = [f"{model}: {'backend':<14}{'prec':<6}{'batch':>6}{'conc':>6}{'p50 ms':>10}{'ms/img':>10}{'img/s':>9}"
             f"{'x fp32':>8}  parity"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{'':<{len(model) + 2}}{r['backend']:<14}skipped: {r['reason'][:90]}")
            continue
        conc = r.get("concurrency") or ""
        if r.get("dynamic_batching") is False:
            conc = f"{conc}n"
        lines.append(f"{'':<{len(model) + 2}}{r['backend']:<14}{r['precision']:<6}{r['batch']:>6}{conc!s:>6}"
                     f"{r['p50_ms']:>10.2f}{r['p50_ms_per_image']:>10.2f}{r['images_per_s']:>9.2f}"
                     f"{r.get('speedup_vs_torch_fp32_b1', float('nan')):>8.2f}  "
                     + ("ok" if r.get("parity_ok", True) else "FAIL") + f" ({r.get('parity_map_max_rel', 0):.1e})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
