"""The serving runtimes, one module per backend (``base.Runtime`` is the interface); see base.py.

Importing this package imports every module of its folder, and each registers its runtime: adding a backend is
adding a file. ``names()`` are zsad-export's ``--backend`` choices; ``bench_names()`` zsad-bench's timed backends.
"""
from __future__ import annotations

import importlib
import pkgutil

from zsad import ZsadError
from zsad.export.runtimes.base import RUNTIMES, Runtime, register

__all__ = ["RUNTIMES", "Runtime", "bench_names", "bench_owner", "get", "names", "register"]

_NOT_RUNTIMES = {"base", "runners"}  # the interface and the bench glue
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _NOT_RUNTIMES:
        importlib.import_module(f"{__name__}.{_module}")


def names() -> tuple[str, ...]:
    """Every registered backend, in registration order."""
    return tuple(RUNTIMES)


def get(name: str) -> Runtime:
    """The runtime of backend ``name``; an unknown name is refused with the list."""
    if name not in RUNTIMES:
        raise ZsadError(f"backend must be one of {names()}, got '{name}'")
    return RUNTIMES[name]


def bench_names() -> tuple[str, ...]:
    """The zsad-bench backends the runtimes time, in registration order."""
    return tuple(v for rt in RUNTIMES.values() for v in rt.bench_variants)


def bench_owner(variant: str) -> Runtime | None:
    """The runtime that times zsad-bench backend ``variant``, or None."""
    return next((rt for rt in RUNTIMES.values() if variant in rt.bench_variants), None)
