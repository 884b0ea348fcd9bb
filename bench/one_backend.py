"""One backend of one model timed (what each zsad-bench worker process runs, zsad.bench.worker): the method built
from its description, the backend's runner, one row per batch size (percentiles, images/s, achieved TFLOP/s,
per-stage and per-op times where the backend has them), and its outputs on the parity images, which the parent
(zsad.bench.model_bench) compares with its torch fp32 reference."""
from __future__ import annotations

import torch


def build_method(model: str, profile: str, image_size: int | None, checkpoint: str | None):
    """(method, overrides): a trained checkpoint, or ``model`` at ``profile`` with random weights (timing does not
    depend on them); ``overrides`` re-create the same method when it is exported for serving."""
    from zsad.configs import deep_merge
    from zsad.load import load

    overrides: dict[str, dict] = {"backbone": {"image_size": image_size}} if image_size else {}
    if checkpoint:
        return load(checkpoint, overrides=overrides).method, overrides
    overrides = deep_merge(overrides, {"backbone": {"pretrained": None}})
    return load(model=model, profile=profile, overrides=overrides).method, overrides


def failure_reason(err: BaseException) -> str:
    """A backend's failure as its skipped rows' reason: the error's kind and the start of its message."""
    return f"{type(err).__name__}: {str(err)[:300]}"


def skipped_rows(base: dict, backend: str, batches: list[int], reason: str) -> list[dict]:
    return [{**base, "backend": backend, "precision": "-", "batch": b, "status": "skipped", "reason": reason}
            for b in batches]


def timed_rows(backend: str, method, scratch, images: torch.Tensor, base: dict, batches: list[int], device: str,
               iters: int, warmup: int, gflops: float) -> tuple[list[dict], dict | None]:
    """(one row per batch size for ``backend``, without parity; its outputs on ``images`` for the parity check, or
    None when it cannot run here: then the rows are skipped with the reason). The batches are drawn from
    ``images``."""
    from zsad.bench.backends import make_backend_runner
    from zsad.export.runtimes.runners import Skip

    try:
        runner = make_backend_runner(backend, method, device, max(batches), scratch)
        outputs = runner.predict(images)
    except Skip as skip:
        return skipped_rows(base, backend, batches, str(skip)), None
    except Exception as err:  # noqa: BLE001 -- a runtime refusing the model here (OpenVINO's plugin under a oneDNN
        # cap, ...) is this backend's skipped rows, with the reason, as in a worker; the other backends still run
        return skipped_rows(base, backend, batches, failure_reason(err)), None
    rows = []
    for b in batches:
        batch = images[torch.arange(b) % len(images)].contiguous()
        row = {**base, "backend": backend, "precision": runner.precision, "batch": b}
        rows.append(time_batch(runner, batch, row, device, iters, warmup, gflops))
    return rows, outputs


def time_batch(runner, images: torch.Tensor, row: dict, device: str, iters: int, warmup: int,
               gflops: float) -> dict:
    """``row`` completed with the timing of ``runner`` on ``images`` (and per-stage times where it has them)."""
    from zsad.bench.timing import percentiles, time_iterations

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        samples = time_iterations(runner.make_step(images), iters, warmup, device)
    except Exception as err:  # noqa: BLE001 -- e.g. out of memory at a large batch
        return {**row, "status": "skipped", "reason": failure_reason(err)}
    stats = percentiles(samples)
    stage_ms = {}
    if runner.stage_steps is not None:  # where the time goes: each stage alone on its real inputs
        stage_ms = {name: percentiles(time_iterations(step, iters, min(warmup, 1), device))["p50_ms"]
                    for name, step in runner.stage_steps(images)}
    b = len(images)
    # achieved_tflops: GFLOP per ms is TFLOP/s
    # samples_ms: every timed call in order (the JSON only), so a warm-up transient or a slow spell shows as such
    row = {**row, "status": "ok", "reason": "", "iters": iters, **stats, "p50_ms_per_image": stats["p50_ms"] / b,
           "images_per_s": 1000.0 * b / stats["p50_ms"], "achieved_tflops": gflops * b / stats["p50_ms"],
           "samples_ms": [round(s, 3) for s in samples], "note": runner.note}
    if stage_ms:
        row["stage_ms"] = stage_ms
    if runner.op_profile is not None:
        row["op_ms"] = runner.op_profile(images)
    if cuda:
        row["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["nvml_used_mb"] = nvml_used_mb(device)
    return row


def nvml_used_mb(device: str) -> float | None:
    """Device memory in use as the driver sees it (other processes included); None without pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    except Exception:
        return None
