"""The backends zsad-bench times: each runtime of zsad.export.runtimes names its own (``bench_variants``) and builds
their runners; ``served`` (bench/served.py) times an exported repository in a server.

``make_backend_runner(backend, ...)`` returns a ``BackendRunner`` (zsad.export.runtimes.runners): ``predict`` maps a
CPU float32 image batch to {"score" [B], "anomaly_map" [B,S,S], and the chain's selections (zsad.selection)} numpy
arrays for the parity check, and ``make_step(images)`` returns the call that is timed. A backend that cannot run
here raises ``Skip`` with the reason, which lands in the report. ``capture_hazards`` finds, on the CPU, what would
break the CUDA-graph runner.
"""
from __future__ import annotations

import torch

from zsad.data.feeds import synthetic_feed
from zsad.export import runtimes
from zsad.export.runtimes.runners import BackendRunner, Scratch, Skip

GPU_DEFAULT = ("torch-fp32", "torch-fp16", "torch-bf16", "torch-compile", "cuda-graphs", "cuda-graphs-fp16",
               "cuda-graphs-bf16", "ort", "served")


def default_backends(device: str, cpu) -> list[str]:
    """zsad-bench's --backend default: GPU_DEFAULT on a GPU; on the CPU (``cpu`` a zsad.cpu.CpuInfo) the plain-torch
    comparators (bf16 autocast ones only where the CPU has bf16), ort, and openvino at every precision
    ``zsad-export --precision auto`` would try on this CPU, fastest first (zsad.cpu.precision_preference, with
    bf16's speed measured here), then the served sweep."""
    from zsad.cpu import has_bf16, precision_preference
    from zsad.export.openvino_export import bf16_matmul_ratio

    if device.startswith("cuda"):
        return list(GPU_DEFAULT)
    bf16 = has_bf16(cpu.flags)
    plain = ["torch-fp32", "torch-compile"] + (["torch-bf16", "torch-compile-bf16"] if bf16 else [])
    order = precision_preference(cpu.flags, bf16_matmul_ratio() if bf16 else None)
    return [*plain, "ort", *(f"openvino-{p}" for p, _ in order), "served"]


def known_backends() -> tuple[str, ...]:
    """Every backend zsad-bench can time: the runtimes' own, then ``served``."""
    return (*runtimes.bench_names(), "served")


# ops that make the host wait for the device (a value read back, an output whose size depends on the data):
# each breaks CUDA-graph capture and stalls the pipeline even when not captured
_READ = "a tensor value read on the host (.item(), bool/int/float(tensor), `if tensor:`)"
_MASK = "nonzero / argwhere / boolean-mask indexing (data-dependent output size)"
SYNC_OPS = {"_local_scalar_dense": _READ, "item": _READ, "is_nonzero": _READ, "nonzero": _MASK,
            "masked_select": "masked_select (data-dependent output size)",
            "_unique2": "unique (data-dependent output size)", "unique_dim": "unique (data-dependent output size)",
            "unique_consecutive": "unique_consecutive (data-dependent output size)",
            "lift_fresh": "torch.tensor(...) from host data inside the chain (a host-to-device copy on a GPU)"}


def capture_hazards(method, images: torch.Tensor) -> list[str]:
    """What in ``method``'s stage chain would break CUDA-graph capture, found on the CPU: ops that synchronise
    with the host (``SYNC_OPS``, seen by a dispatch mode), and tensors created without an explicit device (run
    with the default device set to ``meta``: such a tensor is meta, and mixing it with the real ones fails; on a GPU
    it would be a CPU tensor copied to the device on every call). Empty list: capturable as far as the CPU can tell.
    The chain's inputs are made outside, as the graph runner does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from zsad.methods import run_stages

    found: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func._schema.name.split("::")[-1]
            why = SYNC_OPS.get(op)
            if op.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                why = _MASK  # x[mask] / x[mask] = v: a nonzero inside
            if why and why not in found:
                found.append(why)
            return func(*args, **(kwargs or {}))

    feed = synthetic_feed(method, images)
    stages = method.eval().stages()
    with torch.inference_mode(), Watch():
        run_stages(stages, **feed)
    try:
        with torch.inference_mode(), torch.device("meta"):
            run_stages(stages, **feed)
    except Exception as err:
        found.append(f"a tensor made without an explicit device: {type(err).__name__}: {str(err).splitlines()[0]}")
    return found


def skip_reason(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot be timed on ``device`` here, known before anything is built, or None."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    owner = runtimes.bench_owner(backend)
    if owner is None:
        return f"unknown backend '{backend}' (known: {', '.join(known_backends())})"
    return owner.bench_skip(backend, device)


def make_backend_runner(backend: str, method, device: str, max_batch: int,
                        scratch: Scratch | None = None) -> BackendRunner:
    """The runner of ``backend``; ``scratch`` is shared by the calls of one model's run (ONNX exported once)."""
    reason = skip_reason(backend, device)
    if reason is not None:
        raise Skip(reason)
    owner = runtimes.bench_owner(backend)
    assert owner is not None  # skip_reason named an unknown backend
    return owner.bench_runner(backend, method, device, max_batch, scratch or Scratch())
