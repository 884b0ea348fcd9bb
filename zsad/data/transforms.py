"""CLIP pre-processing of images and masks: zsad's names for ``zsad.triton_models.zsad_common.transforms``.

One implementation, shared with the served preprocess and restore models (which run the same file, copied beside
them, without zsad): the functions here are that module's, raising :class:`zsad.ZsadError` where it raises its
``BadInput``. See it for what they do.
"""
from __future__ import annotations

from zsad import raising_zsad_error
from zsad.triton_models.zsad_common import transforms as _shared

__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess", "preprocess_mask", "resize_map"]

CLIP_MEAN = _shared.CLIP_MEAN
CLIP_STD = _shared.CLIP_STD
preprocess = raising_zsad_error(_shared.preprocess, __name__)
preprocess_mask = raising_zsad_error(_shared.preprocess_mask, __name__)
resize_map = raising_zsad_error(_shared.resize_map, __name__)
