"""Data: readers for MVTec AD / MPDD / VisA / BTAD / AnomalyCLIP meta.json, image IO, CLIP pre-processing,
a torch Dataset and the offline synthetic-defect data set.

``AnomalyDataset`` is imported lazily so that numpy+PIL users (the Triton python backend runs
:func:`preprocess`) do not pay for importing torch through this package.
"""
from zsad.data.io import IMAGE_EXTENSIONS, decode_image, read_image, read_mask
from zsad.data.readers import (
    LAYOUTS,
    Sample,
    data_source,
    detect_layout,
    guess_dataset_name,
    list_classes,
    load_samples,
)
from zsad.data.transforms import CLIP_MEAN, CLIP_STD, preprocess, preprocess_mask

__all__ = [
    "AnomalyDataset",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_EXTENSIONS",
    "decode_image",
    "LAYOUTS",
    "Sample",
    "data_source",
    "detect_layout",
    "guess_dataset_name",
    "list_classes",
    "load_samples",
    "preprocess",
    "preprocess_mask",
    "read_image",
    "read_mask",
]


def __getattr__(name):
    if name == "AnomalyDataset":
        from zsad.data.dataset import AnomalyDataset

        return AnomalyDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
