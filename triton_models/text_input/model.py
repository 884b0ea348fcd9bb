"""Triton python backend: a request's text field (Bayes-PFL's class name) -> the token tensor the stages take.

The ``text_input`` parameter is a serialised ``zsad.methods.base.TextInput``; its ``encode`` calls the method's own
encoder function, the one the eager path uses, so a served request and ``method(images, class_names)`` see the
same tokens. A name the encoder refuses (empty, too long) gets an error response naming the problem.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from zsad import ZsadError
from zsad.methods.base import TextInput


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.text_input = TextInput(**json.loads(p["text_input"]))

    def execute(self, requests):
        ti, responses = self.text_input, []
        for request in requests:
            try:
                items = pb_utils.get_input_tensor_by_name(request, ti.request_name).as_numpy().reshape(-1)
                try:
                    texts = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in items]
                except UnicodeDecodeError as err:
                    raise ZsadError(f"{ti.request_name} is not UTF-8 text: {err}") from None
                tokens = np.ascontiguousarray(ti.encode(texts).numpy().astype(np.int64))
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(ti.tensor, tokens)]))
            except ZsadError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad input: {err}")))
        return responses
