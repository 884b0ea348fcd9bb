"""Keeping an op in fp32 under ``torch.autocast`` (fp16 / bf16 inference on CUDA, bf16 on CPU).

Autocast runs matmuls and convolutions in half precision wherever it is on. A few of our ops cannot take that: their
output is compared at a resolution half precision does not have, or scaled up after the matmul so the rounding
grows with it (a 1/0.07 temperature on a sum of cosines). Those ops run as::

    with fp32_region(x):
        y = op(as_fp32(x), ...)

``fp32_region`` switches autocast off for the block only where it is on for the tensor's device type, so eager fp32,
``torch.export`` and ONNX export trace no context manager and no cast (``as_fp32`` leaves fp32 / fp64 as they are).
Each use says why beside it; tests/test_half_precision.py holds a targeted input per use that fails without it.
"""
from __future__ import annotations

import contextlib

import torch


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device type for the block, where it is on (else a no-op context)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def as_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 (float64 and float32 unchanged)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
