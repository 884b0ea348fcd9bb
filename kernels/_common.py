"""Shared by the kernel modules: the guarded triton import, the dispatch rule, the launch-time choice between
Triton's interpreter and its compiler, the online-softmax step the attention kernels share, and perf-sweep rows.

Triton is optional. Without it, ``triton.jit`` below is the identity, the kernels stay plain Python functions, and
``dispatch()`` never launches them: every call runs the torch reference (tests/test_kernels.py checks this with
triton hidden from ``sys.modules``).

Interpreted or compiled: ``triton.jit`` fixes that when it wraps a function, from ``TRITON_INTERPRET`` at that
moment, i.e. when a kernel module is imported. Every launch goes through :func:`for_current_mode`, which returns
the kernel as ``TRITON_INTERPRET`` says now (the module's own object, or a copy built once in the other mode,
helpers included). So one process can run the interpreter tests (tests/test_kernels.py sets the variable for its
whole pytest process) and, with the variable removed, compile the same kernels for a real GPU
(tests/test_kernels_gpu.py, tests/test_chain_gpu.py): one ``pytest -m gpu`` run does both.
"""
from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the kernels below stay plain functions that dispatch() never launches
    triton = types.SimpleNamespace(jit=lambda fn: fn)  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False


class KernelArgumentError(ValueError):
    """Bad arguments to a kernel or its reference (``zsad`` turns these into ``ZsadError``)."""


# -- interpreted or compiled, decided at launch -----------------------------------------------------------------
_VARIANTS: dict[tuple[int, bool], tuple[Any, Any]] = {}  # (id(kernel), interpret) -> (kernel, its variant)


def _is_jitted(obj: Any) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (JITFunction, InterpretedFunction))


def _interpret_now() -> bool:
    """What ``triton.jit`` would choose now: triton >= 3.4 reads its knob, older versions the variable itself."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def for_current_mode(kernel: Any) -> Any:
    """``kernel`` (a ``@triton.jit`` function) interpreted if ``TRITON_INTERPRET`` is set now, compiled if not.

    The other mode's copy wraps a copy of the Python function whose globals name the same-mode copies of the
    ``@triton.jit`` helpers it calls (Triton resolves callees by global name), so the module's own objects are
    never changed. Built once per mode and kept.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed (pip install 'zsad[kernels]'): call dispatch(), which runs the "
                           "torch reference without it")
    from triton.runtime.interpreter import InterpretedFunction

    interpret = _interpret_now()
    if isinstance(kernel, InterpretedFunction) == interpret:
        return kernel
    key = (id(kernel), interpret)
    if key not in _VARIANTS:
        fn = kernel.fn
        scope = dict(fn.__globals__)
        scope.update({name: for_current_mode(scope[name]) for name in fn.__code__.co_names
                      if _is_jitted(scope.get(name))})
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__, copy.__annotations__ = fn.__kwdefaults__, fn.__annotations__
        copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        _VARIANTS[key] = (kernel, triton.jit(copy))
    return _VARIANTS[key][1]


# -- the online-softmax step (flash attention's inner loop), shared by the attention kernels ---------------------
LOG2E = 1.4426950408889634  # softmax(x) == softmax in base 2 of x * log2(e); the kernels use exp2


@triton.jit
def online_softmax_update(m_i, l_i, acc, s, v, DOT_PREC: tl.constexpr):
    """Fold one key block into a running softmax(s) @ v: ``s`` [M, N] are logits in log2 units (scaled by log2(e),
    -inf at masked keys), ``v`` [N, D] the block's values. ``m_i`` [M] is the running max, ``l_i`` [M] the
    denominator, ``acc`` [M, D] the unnormalised output; the last two are rescaled to the new max. Returns all three."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


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
    return HAS_TRITON


def capability(device: torch.device | str) -> int | None:
    """Compute capability x 10 of a CUDA device (80 for an A100, 89 for an L4, 90 for an H100), None for anything
    else (CPU tensors under the interpreter). Launchers choose their blocks with it where the targets differ;
    kernels/aot.py stands in for it to build each target's choice ahead of time."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(dev)
    return 10 * major + minor


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
    if not HAS_TRITON:
        return "triton is not installed (pip install 'zsad[kernels]')"
    return None


def environment_info(device: str) -> dict:
    info: dict[str, str | None] = {"device": str(device), "torch": torch.__version__}
    if HAS_TRITON:
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
