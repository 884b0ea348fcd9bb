"""zsad: CLIP-based zero-shot industrial anomaly detection, from training to serving.

Importing ``zsad`` is light (no torch): the serving pre-processing imports only numpy and PIL through it.
"""

__version__ = "0.1.0"


class ZsadError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it (CLIs print it, no traceback)."""


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
