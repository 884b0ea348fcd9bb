"""The synthetic inputs every check feeds a stage chain: the parity gate, the precision gate, OpenVINO calibration
and zsad-bench's reference all see the same images and, for methods whose prompts take the object's class
(Bayes-PFL), those images' own class names (one implementation, here)."""
from __future__ import annotations

import numpy as np


def synthetic_raw_images(n: int = 4, seed: int = 0) -> np.ndarray:
    """n synthetic-defect images as decoded pixels, uint8 [n,256,256,3] (held-out classes, defects and good ones
    mixed): what a client sends; ``synthetic_images`` is the same images preprocessed."""
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample

    return np.stack([render_sample(SYNTHETIC_TEST_CLASSES[i % len(SYNTHETIC_TEST_CLASSES)],
                                   "test_good" if i % 3 == 2 else "test_defect", i, seed=seed).image
                     for i in range(n)])


def synthetic_images(image_size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """n preprocessed synthetic-defect images [n,3,S,S] (``synthetic_raw_images`` at the model's size)."""
    from zsad.data import preprocess

    return np.stack([preprocess(img, image_size) for img in synthetic_raw_images(n, seed)])


def synthetic_class_names(n: int) -> list[str]:
    """The class name of each image ``synthetic_images`` renders (for methods that take one per image)."""
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES

    return [SYNTHETIC_TEST_CLASSES[i % len(SYNTHETIC_TEST_CLASSES)] for i in range(n)]


def synthetic_feed(method, images) -> dict:
    """The chain's inputs for a batch of synthetic images (torch [n,3,S,S]): the images, plus the class-name tokens
    of ``synthetic_class_names`` for methods with text inputs (``Method.stage_inputs``)."""
    names = synthetic_class_names(images.shape[0]) if method.text_inputs() else None
    return method.stage_inputs(images, names)
