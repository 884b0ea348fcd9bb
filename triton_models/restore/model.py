"""Triton python backend: resize the model-resolution anomaly map back to each input image's size.

Each image's map is resized to its own (H, W) and the maps are flattened and concatenated in order, so memory is
the sum of the images' pixels, never the largest H x largest W times the batch. A batched output needs one row per
image, so the concatenation is zero-padded to a multiple of the image count and shaped [B, L]: clients read the
first H*W values of ``anomaly_map_original.reshape(-1)`` for image 0, the next for image 1, ... using
``original_size`` (zsad.serve.client does). ``max_pixels`` (the same per-request limit as preprocess) bounds the
sizes a client calling this model directly may ask for. Needs numpy and Pillow only: ``zsad_common`` (resize_map,
the code zsad.data.transforms runs, and the backend guard) is copied beside this file.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from zsad_common.guard import BadInput, check_tensor, each_request
from zsad_common.transforms import resize_map


def concat_maps(maps, sizes) -> np.ndarray:
    """Resized maps flattened, concatenated and zero-padded to shape [len(maps), ceil(total / len(maps))]."""
    total, rows = sum(h * w for h, w in sizes), len(maps)
    out = np.zeros(rows * -(-total // rows), np.float32)
    start = 0
    for m, (h, w) in zip(maps, sizes, strict=True):  # written in place: one map's copy at a time besides the output
        out[start:start + h * w] = resize_map(m, h, w).reshape(-1)
        start += h * w
    return out.reshape(rows, -1)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        self.max_pixels = int(p["max_pixels"])

    def _answer(self, request):
        maps = pb_utils.get_input_tensor_by_name(request, "anomaly_map").as_numpy()
        sizes = pb_utils.get_input_tensor_by_name(request, "original_size").as_numpy().tolist()
        check_tensor("anomaly_map", maps)
        if min(min(s) for s in sizes) < 1 or sum(h * w for h, w in sizes) > self.max_pixels:
            raise BadInput(f"original_size must be >= 1 with at most {self.max_pixels:,} pixels per request")
        out = concat_maps(maps, sizes)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("anomaly_map_original", out)])

    def execute(self, requests):
        return each_request(pb_utils, requests, self._answer, self.model_name)
