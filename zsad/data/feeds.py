"""The synthetic inputs every check feeds a stage chain: the parity gate, the precision gate, OpenVINO calibration
and zsad-bench's reference all see the same images and, for methods whose prompts take the object's class
(Bayes-PFL), those images' own class names (one implementation, here)."""
from __future__ import annotations

import numpy as np


def synthetic_images(image_size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """n preprocessed synthetic-defect images [n,3,S,S] (held-out classes, defects and good ones mixed)."""
    from zsad.data import preprocess
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample

    out = []
    for i in range(n):
        cls = SYNTHETIC_TEST_CLASSES[i % len(SYNTHETIC_TEST_CLASSES)]
        part = "test_good" if i % 3 == 2 else "test_defect"
        out.append(preprocess(render_sample(cls, part, i, seed=seed).image, image_size))
    return np.stack(out)


def synthetic_class_names(n: int) -> list[str]:
    """The class name of each image ``synthetic_images`` renders (for methods that take one per image)."""
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES

    return [SYNTHETIC_TEST_CLASSES[i % len(SYNTHETIC_TEST_CLASSES)] for i in range(n)]


def synthetic_feed(method, images) -> dict:
    """The chain's inputs for a batch of synthetic images (torch [n,3,S,S]): the images, plus the class-name tokens
    of ``synthetic_class_names`` for methods with text inputs (``Method.stage_inputs``)."""
    names = synthetic_class_names(images.shape[0]) if method.text_inputs() else None
    return method.stage_inputs(images, names)
