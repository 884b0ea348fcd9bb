"""Plumbing shared by the kernel modules: lazy Triton JIT, the dispatch rule, and perf-sweep rows.

Importing a kernel module never imports ``triton``. Each module writes its kernels as plain functions in Triton's
language (``tl`` is a module global that is ``None`` until first use) and :func:`lazy_jit` imports triton and
wraps them with ``triton.jit`` the first time a Triton path runs. This keeps ``import zsad`` light, lets a missing
triton mean "reference path" instead of ImportError, and lets tests set ``TRITON_INTERPRET=1`` before the first
kernel is built (``triton.jit`` reads that variable when it wraps a function).

The kernels are built for the ``TRITON_INTERPRET`` value current at the call: when it changes, the next call
re-wraps the original functions. So one process can run the interpreter tests (tests/test_kernels.py sets the
variable for its whole pytest process) and, with the variable removed, compile the same kernels for a real GPU
(tests/test_kernels_gpu.py, tests/test_chain_gpu.py): one ``pytest -m gpu`` run does both.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Callable

import torch

_JIT_LOCK = threading.Lock()


class KernelArgumentError(ValueError):
    """Bad arguments to a kernel or its reference (``zsad`` turns these into ``ZsadError``)."""


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read now, as triton.jit does."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def lazy_jit(module_globals: dict, names: tuple[str, ...]) -> None:
    """Bind ``tl``/``triton`` in a kernel module and replace its kernel functions ``names`` by jitted ones: once,
    and again whenever ``TRITON_INTERPRET`` changed since (interpreted <-> compiled; the plain functions are kept).

    Helpers called from inside a kernel must be in ``names`` too (Triton resolves callees by global name).
    """
    mode = interpret_mode()
    if module_globals.get("_JITTED") and module_globals.get("_JIT_INTERPRET") == mode:
        return
    with _JIT_LOCK:
        if module_globals.get("_JITTED") and module_globals.get("_JIT_INTERPRET") == mode:
            return
        import triton
        import triton.language as tl

        module_globals["triton"] = triton
        module_globals["tl"] = tl
        plain = module_globals.setdefault("_PLAIN_KERNELS", {})
        for name in names:
            fn = plain.setdefault(name, module_globals[name])  # the undecorated function, kept for re-wrapping
            module_globals[name] = triton.jit(fn)
        module_globals["_JIT_INTERPRET"] = mode
        module_globals["_JITTED"] = True


def kernels_disabled() -> bool:
    """``ZSAD_KERNELS=0`` (or off/false/no) forces the torch reference everywhere (debugging, A/B checks)."""
    return os.environ.get("ZSAD_KERNELS", "1").strip().lower() in ("0", "off", "false", "no")


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule: Triton only for CUDA tensors, with triton importable, outside autograd and export.

    Anything else (CPU tensors, a tensor that needs a gradient while grad mode is on, ONNX export, tracing or
    ``torch.compile``, ``ZSAD_KERNELS=0``) runs the torch reference, so CPU results are the model's own math.
    """
    if not tensors or not all(t.is_cuda for t in tensors):
        return False
    if kernels_disabled():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the kernels have no backward
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return triton_importable()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise KernelArgumentError(f"{name}: the Triton kernel takes fp16/bf16/fp32, got {t.dtype}")


# -- perf sweep rows ---------------------------------------------------------------------------------------------
def sweep_unavailable_reason(device: str) -> str | None:
    """Why a perf sweep cannot time anything on ``device`` (None when it can)."""
    if not str(device).startswith("cuda"):
        return f"device '{device}' is not CUDA: the Triton kernels only run on CUDA (CPU uses the torch reference)"
    if not torch.cuda.is_available():
        return "no CUDA device available"
    if not triton_importable():
        return "triton is not installed (pip install 'zsad[kernels]')"
    return None


def environment_info(device: str) -> dict:
    info = {"device": str(device), "torch": torch.__version__}
    if triton_importable():
        import triton

        info["triton"] = triton.__version__
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def skipped_rows(kernel: str, cases: list[dict], reason: str, device: str) -> list[dict]:
    env = environment_info(device)
    return [dict(kernel=kernel, **case, impl=None, status="skipped", reason=reason, median_ms=None, **env)
            for case in cases]


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (warm-up, cache flush, CUDA sync)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, return_mode="median"))


def timed_row(kernel: str, case: dict, impl: str, fn: Callable[[], object], device: str) -> dict:
    env = environment_info(device)
    try:
        ms = time_ms(fn)
    except Exception as e:  # noqa: BLE001 - a failing config is a result row, not a crash of the sweep
        return dict(kernel=kernel, **case, impl=impl, status="error", reason=f"{type(e).__name__}: {e}",
                    median_ms=None, **env)
    return dict(kernel=kernel, **case, impl=impl, status="ok", reason=None, median_ms=ms, **env)
