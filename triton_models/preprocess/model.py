"""Triton python backend: decode + resize + CLIP-normalise, with zsad's own pre-processing (the eager path's code:
``zsad_common``, copied as is beside this file; the model needs numpy and Pillow only, so a stock Triton container
runs it).

Inputs (per batch item): ``image_bytes`` (TYPE_STRING, an encoded image) or ``image`` (TYPE_UINT8 [H,W,3]),
chosen by the ``input_kind`` parameter. Outputs ``images`` FP32 [3,S,S] and ``original_size`` INT32 [2] (H, W).
``max_pixels`` bounds a request's decoded pixels summed over its images (checked from each header before it is
decoded), which bounds this model's memory and the restore model's output. A request with an undecodable,
non-image, empty or oversized image gets an error naming the image's index; the other requests are unaffected.
Any further inputs (a method's text tokens, e.g. Bayes-PFL's ``class_tokens``) are never read: the ensemble feeds
them in only so that this step runs after the text models (see zsad.export.exporter._ensemble).
"""
import io
import json
import re
import warnings

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

# zsad's own decoder and pre-processing (what zsad.data.io and zsad.data.transforms run), copied beside this file
from zsad_common.guard import BadInput, each_request
from zsad_common.image import decode_image
from zsad_common.transforms import preprocess

# what a JSON client sends when it base64-encodes a file into image_bytes (checked only on bytes Pillow refused)
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\r\n]+")


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        self.kind = p["input_kind"]
        self.size = int(p["image_size"])
        self.mean = [float(v) for v in p["mean"].split(",")]
        self.std = [float(v) for v in p["std"].split(",")]
        self.max_pixels = int(p["max_pixels"])

    def _decode(self, data: bytes, i: int, budget: int):
        """One encoded image -> PIL RGB image; whatever the decoder raises is this input's fault."""
        try:
            if not data:
                raise BadInput(f"image {i} is empty")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w, h = Image.open(io.BytesIO(data)).size  # header only: nothing decoded yet
            if w * h > budget:
                raise BadInput(f"image {i} is {w}x{h} pixels; a request's images may have at most "
                               f"{self.max_pixels:,} pixels together")
            return decode_image(data, budget, f"image {i}")  # PIL RGB: preprocess resizes it without a copy
        except BadInput:
            raise
        except Exception as err:  # noqa: BLE001 - Pillow raises NotImplementedError, struct.error, ...
            if _BASE64_TEXT.fullmatch(data[:4096]):
                raise BadInput(f"image {i} is base64 text, not image bytes: JSON requests cannot carry binary "
                               f"image_bytes; send the file's bytes with Triton's binary-data extension "
                               f"(Inference-Header-Content-Length; see docs/protocols.md)") from None
            raise BadInput(f"cannot decode image {i} ({type(err).__name__})") from None

    def _images(self, request):
        """The request's images (PIL or uint8 arrays) and their (H, W)."""
        if self.kind == "bytes":
            items = pb_utils.get_input_tensor_by_name(request, "image_bytes").as_numpy().reshape(-1)
            images, used = [], 0
            for i, b in enumerate(items):
                images.append(self._decode(bytes(b), i, self.max_pixels - used))
                used += images[-1].width * images[-1].height
            return images, [(img.height, img.width) for img in images]
        arr = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
        if 0 in arr.shape:
            raise BadInput(f"empty image of shape {list(arr.shape[1:])}")
        if arr.shape[0] * arr.shape[1] * arr.shape[2] > self.max_pixels:
            raise BadInput(f"{arr.shape[0]} images of {arr.shape[2]}x{arr.shape[1]} pixels; a request's images "
                           f"may have at most {self.max_pixels:,} pixels together")
        return list(arr), [arr.shape[1:3]] * arr.shape[0]

    def _answer(self, request):
        images, sizes = self._images(request)
        x = np.stack([preprocess(img, self.size, self.mean, self.std) for img in images])
        sizes = np.array(sizes, dtype=np.int32)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("images", x), pb_utils.Tensor("original_size", sizes)])

    def execute(self, requests):
        return each_request(pb_utils, requests, self._answer, self.model_name)
