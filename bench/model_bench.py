"""One model's benchmark run (what zsad-bench does per --model): build the method and its torch fp32 reference on
synthetic-defect images, time every backend at every batch size (each in its own worker process, zsad.bench.worker),
sweep the served ensemble, add the speed-ups and, on the CPU, the efficiency against the machine's peak.

Each timed row carries its parity against the reference (``zsad.export.parity.chain_parity``), so a fast but wrong
backend shows as wrong. The result files are written by ``zsad.bench.report``.
"""
from __future__ import annotations

import gc
import os
import shutil
from dataclasses import dataclass, field, replace

import click
import numpy as np
import torch

from zsad import ZsadError
from zsad.bench.one_backend import build_method, skipped_rows, timed_rows
from zsad.export import runtimes


@dataclass
class Reference:
    """The parity batch and the torch fp32 eager outputs every backend is compared with."""

    images: torch.Tensor  # [n,3,S,S] preprocessed synthetic-defect images
    score: np.ndarray  # [n] float64
    anomaly_map: np.ndarray  # [n,S,S] float64
    stages: list = field(default_factory=list)  # the method's stage chain (for selections, zsad.selection)
    env: dict = field(default_factory=dict)  # every tensor of the torch chain on the images, numpy

    @property
    def selections(self) -> list[str]:
        return [n for st in self.stages for n in st.selections]

    def parity(self, outputs: dict, precision: str) -> dict:
        """The report's parity columns (parity_score_max_rel, ..., parity_ok) of one backend's outputs: "score",
        "anomaly_map", and the chain's selections where the backend returns them.

        fp32 / fp16: a backend's selections are taken by the tie rule (zsad.export.parity.reference_on_selections)
        and its outputs compared with the torch chain on them; ``parity_selection_differing`` counts the
        selections that differed (near-ties), and one that is no near-tie fails the row. bf16 / int8: compared with
        the fp32 chain as it is (their gate measures what a user gets, selection changes included); the differing
        selections are counted."""
        from zsad.export.parity import CHAIN_TOL, GATED, chain_parity, reference_on_selections

        score, amap, extra = self.score, self.anomaly_map, {}
        if self.selections and all(n in outputs for n in self.selections):
            produced = {n for st in self.stages for n in st.outputs}
            feed = {n: v for n, v in self.env.items() if n not in produced}  # the chain's inputs
            ref, rows = reference_on_selections(self.stages, feed, outputs, CHAIN_TOL[precision], self.env)
            extra = {"selection_differing": sum(r.differing or 0 for r in rows),
                     "selection_max_gap": max(r.max_abs for r in rows), "selection_ok": all(r.ok for r in rows)}
            if precision not in GATED:
                score, amap = ref["score"].astype(np.float64), ref["anomaly_map"].astype(np.float64)
            else:
                extra.pop("selection_ok")
        out = chain_parity(score, amap, outputs["score"], outputs["anomaly_map"], precision)
        out = {**out, **extra, "ok": bool(out["ok"] and extra.get("selection_ok", True))}
        return {f"parity_{k}": v for k, v in out.items()}


@dataclass
class ServedSettings:
    """Served mode (zsad-bench --served-*): a running server at ``url``, or one exported and started here."""

    url: str | None = None
    concurrency: list[int] = field(default_factory=lambda: [1])
    seconds: float = 10.0
    backend: str = "python-ort"
    precision: str = "fp32"
    calibration_images: int = 16
    hint: str = "latency"  # python-openvino: OpenVINO's performance hint (zsad-export --ov-hint)


def reference_outputs(method, n: int = 4) -> Reference:
    from zsad.data.feeds import synthetic_feed
    from zsad.export.parity import synthetic_images
    from zsad.methods import run_stages

    images = torch.from_numpy(synthetic_images(method.image_size, n=n))
    stages = method.eval().stages()
    with torch.inference_mode():
        out = run_stages(stages, **synthetic_feed(method, images))
    env = {k: v.numpy() for k, v in out.items()}
    return Reference(images, env["score"].astype(np.float64), env["anomaly_map"].astype(np.float64), stages, env)


def _rebuilt_by_a_worker(model: str, backend: str) -> bool:
    """A spawned worker imports zsad alone: a method or backend registered at run time by the caller's own code (a
    plugin script, a test) exists in this process only, so such a backend is timed here instead."""
    from zsad.export import runtimes
    from zsad.methods import METHODS

    owner = runtimes.bench_owner(backend)
    classes = [METHODS.get(model), type(owner) if owner is not None else None]
    return all(c is None or c.__module__.startswith("zsad.") for c in classes)


def bench_model(model: str, profile: str, image_size: int | None, batches: list[int], backends: list[str],
                device: str, iters: int, warmup: int, checkpoint: str | None, served_url: str | None,
                concurrency: list[int], served_seconds: float, progress: bool, log=click.echo,
                served_backend: str = "python-ort", served_precision: str = "fp32",
                calibration_images: int = 16, isolate: bool = True, served_hint: str = "latency"):
    """(method, flops, rows): one row per (backend, batch), plus the served rows when ``backends`` has "served".

    ``isolate``: each timed backend runs in its own spawned worker process (zsad.bench.worker; its rows carry the
    worker's peak RSS), sharing the ONNX export and calibration images through files; False runs them here, one
    after another (for tests that watch this process)."""
    import tempfile

    from tqdm import tqdm

    from zsad.bench.backends import skip_reason
    from zsad.bench.flops import method_flops
    from zsad.bench.report import add_efficiency, add_speedups
    from zsad.export.runtimes.runners import Scratch

    method, overrides = build_method(model, profile, image_size, checkpoint)
    flops = method_flops(method)
    ref = reference_outputs(method)
    base = {"model": model, "profile": method.profile, "image_size": method.image_size, "device": device,
            "gflops_per_image": round(flops["total"], 3)}
    timed = [b for b in backends if b != "served"]
    bar = tqdm(total=len(timed) * len(batches) + (1 if "served" in backends else 0), disable=not progress,
               desc=f"bench {model}", dynamic_ncols=True)
    rows: list[dict] = []
    workdir = tempfile.mkdtemp(prefix="zsad-bench-")  # ONNX exported once for ort / ort-int8 / openvino-*
    try:
        for backend in timed:
            reason = skip_reason(backend, device)
            if reason is not None:  # no worker for a backend that cannot run here
                rows += skipped_rows(base, backend, batches, reason)
            elif isolate and _rebuilt_by_a_worker(model, backend):
                from zsad.bench.worker import BackendTask, run_in_worker

                images_npy = os.path.join(workdir, "parity-images.npy")
                if not os.path.exists(images_npy):
                    np.save(images_npy, ref.images.numpy())
                rows += worker_rows(run_in_worker(BackendTask(
                    backend, model, profile, image_size, checkpoint, images_npy, base, batches, device, iters,
                    warmup, flops["total"], workdir, calibration_images)), ref, base, backend, batches)
            else:
                rows += backend_rows(backend, method, Scratch(workdir, calibration_images), ref, base, batches,
                                     device, iters, warmup, flops["total"])
                # release this backend's sessions / compiled models now (closures hold cycles)
                gc.collect()
            bar.update(len(batches))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the temporary folder this run made
    if "served" in backends:
        served = ServedSettings(served_url, concurrency, served_seconds, served_backend, served_precision,
                                calibration_images, served_hint)
        rows += served_rows(served, method, ref, base, checkpoint, overrides, device, log)
        bar.update(1)
    bar.close()
    add_speedups(rows)
    if device == "cpu":
        from zsad.cpu import read_cpu

        add_efficiency(rows, read_cpu())
    return method, flops, rows


def backend_rows(backend: str, method, scratch, ref: Reference, base: dict, batches: list[int], device: str,
                 iters: int, warmup: int, gflops: float) -> list[dict]:
    """One row per batch size for ``backend``, timed in this process: timed with parity, or skipped with the
    reason."""
    rows, outputs = timed_rows(backend, method, scratch, ref.images, base, batches, device, iters, warmup, gflops)
    return with_parity(rows, outputs, ref)


def worker_rows(result: dict, ref: Reference, base: dict, backend: str, batches: list[int]) -> list[dict]:
    """A worker's rows (zsad.bench.worker.run_in_worker) with parity against ``ref`` and the worker's pid and peak
    RSS; skipped rows with the reason where the worker failed."""
    if "error" in result:
        rows = skipped_rows(base, backend, batches, result["error"])
    else:
        rows = with_parity(result["rows"], result["outputs"], ref)
    return [{**r, "worker_pid": result["pid"], "peak_rss_mb": result.get("peak_rss_mb")} for r in rows]


def with_parity(rows: list[dict], outputs: dict | None, ref: Reference) -> list[dict]:
    """``rows`` of one backend with its parity columns against ``ref`` (``outputs``: its predictions on the parity
    images; None when it was skipped)."""
    if outputs is None:
        return rows
    parity = ref.parity(outputs, rows[0]["precision"])
    return [{**r, **parity} if r["status"] == "ok" else r for r in rows]


def served_rows(served: ServedSettings, method, ref: Reference, base: dict, checkpoint: str | None,
                overrides: dict, device: str, log=click.echo) -> list[dict]:
    """Concurrency sweep rows of the ensemble at ``served.url``, or of one exported and served here with and without
    dynamic batching (a skipped row with the reason when that export or server fails)."""
    from zsad.bench.served import export_and_serve
    from zsad.data.synthetic import sample_pngs

    pngs = sample_pngs(len(ref.images), with_good=True)  # the parity images, encoded as a client sends them
    texts = None
    if method.text_inputs():  # the same class names the reference used (zsad.data.feeds.synthetic_feed)
        from zsad.export.parity import synthetic_class_names

        texts = {ti.request_name: synthetic_class_names(len(pngs)) for ti in method.text_inputs()}
    base = {**base, "backend": "served", "precision": served.precision, "batch": 1,
            **({"ov_hint": served.hint} if runtimes.get(served.backend).takes_ov_hint and not served.url else {})}
    if served.url:
        host = served.url.split("://")[-1]
        log(f"served mode against grpc://{host}, ensemble '{method.name}'")
        return _sweep_rows(host, [(method.name, None)], pngs, texts, served, ref, base)
    log(f"served mode: exporting ({served.backend}, {served.precision}"
        + (f", OpenVINO {served.hint} hint" if "ov_hint" in base else "") + ") with and without dynamic batching and "
        "starting tritonserver ...")
    try:
        # max batch: at least the 4 parity images of one request, and room for the batcher at high concurrency
        with export_and_serve(method.name, method.profile, checkpoint, overrides, max(8, *served.concurrency),
                              backend=served.backend, device="gpu" if device.startswith("cuda") else "cpu",
                              precision=served.precision, calibration_images=served.calibration_images,
                              ov_hint=served.hint) as (server, precision):
            if precision != served.precision:  # --served-precision auto: what the export kept
                log(f"served precision: {precision} (--served-precision {served.precision})")
                served = replace(served, precision=precision)
                base = {**base, "precision": precision}
            return _sweep_rows(server.grpc_url, [(method.name, True), (f"{method.name}_nodb", False)], pngs, texts,
                               served, ref, base)
    except ZsadError as err:
        return [{**base, "status": "skipped", "reason": str(err)[:300]}]


def _sweep_rows(grpc_url: str, variants: list[tuple[str, bool | None]], pngs: list[bytes], texts, served,
                ref: Reference, base: dict) -> list[dict]:
    """Parity from one request to the first variant, then one row per (variant, concurrency)."""
    from zsad.bench.served import served_predictions, sweep_one

    parity = ref.parity(served_predictions(f"grpc://{grpc_url}", variants[0][0], pngs, texts, ref.selections),
                        served.precision)
    rows = []
    for name, dynamic in variants:
        for c in served.concurrency:
            r = sweep_one(grpc_url, name, pngs, c, served.seconds, texts)
            rows.append({**base, "concurrency": c, "dynamic_batching": dynamic,
                         "status": "ok" if r["requests"] else "skipped",
                         "reason": "" if r["requests"] else f"no request completed: {r['error_examples']}",
                         **{k: r.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s")},
                         "p50_ms_per_image": r.get("p50_ms"), "iters": r["requests"], **parity,
                         "note": f"{r['errors']} errors; {r['wall_s']} s; p95 {r.get('p95_ms')}"
                                 + (f"; OpenVINO {base['ov_hint']} hint" if "ov_hint" in base else "")
                                 + "".join(f"; error: {e}" for e in r["error_examples"])})
    return rows


