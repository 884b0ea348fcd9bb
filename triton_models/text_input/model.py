"""Triton python backend: a request's text field (Bayes-PFL's class name) -> the token tensor the stages take.

The ``text_input`` parameter is a serialised ``zsad.methods.base.TextInput``; its ``encode`` calls the method's own
encoder function, the one the eager path uses, so a served request and ``method(images, class_names)`` see the
same tokens. A name the encoder refuses (empty, too long), one over ``MAX_TEXT_BYTES`` (refused before it is
decoded or tokenised, and never echoed) or one that is not UTF-8 gets an error response for its request alone.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from zsad.methods.base import TextInput
from zsad.serve.backend_guard import BadInput, each_request

MAX_TEXT_BYTES = 256


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        self.text_input = TextInput(**json.loads(p["text_input"]))

    def _answer(self, request):
        ti = self.text_input
        items = pb_utils.get_input_tensor_by_name(request, ti.request_name).as_numpy().reshape(-1)
        texts = []
        for i, b in enumerate(items):
            b = b if isinstance(b, bytes) else str(b).encode("utf-8")
            if len(b) > MAX_TEXT_BYTES:
                raise BadInput(f"{ti.request_name} {i} is {len(b):,} bytes; at most {MAX_TEXT_BYTES} are allowed")
            try:
                texts.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadInput(f"{ti.request_name} {i} is not UTF-8 text") from None
        tokens = np.ascontiguousarray(ti.encode(texts).numpy().astype(np.int64))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(ti.tensor, tokens)])

    def execute(self, requests):
        return each_request(pb_utils, requests, self._answer, self.model_name)
