"""Triton python backend: decode + resize + CLIP-normalise, with zsad's own pre-processing (the eager path's code).

Inputs (per batch item): ``image_bytes`` (TYPE_STRING, an encoded image) or ``image`` (TYPE_UINT8 [H,W,3]),
chosen by the ``input_kind`` parameter. Outputs ``images`` FP32 [3,S,S] and ``original_size`` INT32 [2] (H, W).
A request with an undecodable, non-image, empty or oversized image gets an error response naming the item;
the other requests of the batch are unaffected.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from zsad import ZsadError
from zsad.data import decode_image, preprocess


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.kind = p["input_kind"]
        self.size = int(p["image_size"])
        self.mean = [float(v) for v in p["mean"].split(",")]
        self.std = [float(v) for v in p["std"].split(",")]
        self.max_pixels = int(p["max_pixels"])

    def _images(self, request):
        if self.kind == "bytes":
            items = pb_utils.get_input_tensor_by_name(request, "image_bytes").as_numpy().reshape(-1)
            return [np.asarray(decode_image(bytes(b), self.max_pixels, f"image {i}")) for i, b in enumerate(items)]
        arr = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
        if arr.shape[1] * arr.shape[2] > self.max_pixels:
            raise ZsadError(f"image is {arr.shape[2]}x{arr.shape[1]} pixels, above the limit of {self.max_pixels:,}")
        if 0 in arr.shape:
            raise ZsadError(f"empty image of shape {list(arr.shape[1:])}")
        return list(arr)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = self._images(request)
                x = np.stack([preprocess(img, self.size, self.mean, self.std) for img in images])
                sizes = np.array([img.shape[:2] for img in images], dtype=np.int32)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("images", x), pb_utils.Tensor("original_size", sizes)]))
            except ZsadError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad input: {err}")))
        return responses
