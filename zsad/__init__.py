"""zsad: CLIP-based zero-shot industrial anomaly detection, from training to serving.

Importing ``zsad`` is light (no torch): the serving pre-processing imports only numpy and PIL through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__version__ = "0.1.0"

_P = ParamSpec("_P")
_R = TypeVar("_R")


class ZsadError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it (CLIs print it, no traceback)."""


def raising_zsad_error(fn: Callable[_P, _R], module: str) -> Callable[_P, _R]:
    """``fn`` of ``zsad.triton_models.zsad_common`` (the code shared with the served models, which knows nothing of
    zsad and raises its ``BadInput``) as zsad calls it: a ``BadInput`` becomes a ``ZsadError``, same message.
    ``module``: the zsad module that holds the result under ``fn``'s name (pickle and help() look for it there)."""
    from zsad.triton_models.zsad_common.guard import BadInput  # numpy: imported where a wrapped function is made

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except BadInput as err:
            raise ZsadError(str(err)) from err

    wrapper.__module__ = module
    return wrapper


def per_image_names(names, n: int) -> list[str]:
    """Class names for ``n`` images: one str for all, or one per image (the eager, local and client paths agree)."""
    out = [names] * n if isinstance(names, str) else list(names)
    if len(out) != n:
        raise ZsadError(f"got {len(out)} class names for {n} images")
    return out


def __getattr__(name):
    # lazy, so that `import zsad` stays free of torch (the served pre-processing imports zsad)
    if name == "Predictor":
        from zsad.predict import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
