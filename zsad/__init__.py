"""zsad: CLIP-based zero-shot industrial anomaly detection, from training to serving.

Importing ``zsad`` is light (no torch): the serving pre-processing imports only numpy and PIL through it.
"""

__version__ = "0.1.0"


class ZsadError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it (CLIs print it, no traceback)."""


def __getattr__(name):
    # lazy, so that `import zsad` stays free of torch (the served pre-processing imports zsad)
    if name == "Predictor":
        from zsad.predict import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
