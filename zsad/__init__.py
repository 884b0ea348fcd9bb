"""zsad: CLIP-based zero-shot industrial anomaly detection, from training to serving."""
from zsad._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"


class ZsadError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it (CLIs print it, no traceback)."""
