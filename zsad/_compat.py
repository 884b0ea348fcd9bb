"""Make ``import open_clip`` work on CPU boxes where PyPI's torchvision (a CUDA build) sits beside CPU torch.

open_clip imports torchvision, whose Python side registers fake kernels for ``torchvision::nms`` at import and
fails ("operator torchvision::nms does not exist") when its compiled ops cannot load. open_clip needs none of
torchvision's compiled ops, so defining the two schemas is enough. We only do this after a real import failed,
so a working torchvision (the normal GPU install) is never touched.
"""
import sys

_SHIM = None


def ensure_torchvision_importable() -> None:
    global _SHIM
    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        return  # no torchvision at all: open_clip will report it itself
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _SHIM = torch.library.Library("torchvision", "DEF")
    _SHIM.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401


def import_open_clip():
    """``import open_clip`` after making torchvision importable; every zsad module gets open_clip from here."""
    ensure_torchvision_importable()
    import open_clip

    return open_clip
