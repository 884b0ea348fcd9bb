"""Timing that means something: warm-up first, then per-iteration wall time measured with CUDA events on a GPU
(synchronised at the end of each iteration) or a synchronised perf_counter on the CPU."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch


def time_iterations(fn: Callable[[], object], iters: int, warmup: int, device: str) -> list[float]:
    """Milliseconds per call of ``fn`` for ``iters`` calls after ``warmup`` untimed calls."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}
