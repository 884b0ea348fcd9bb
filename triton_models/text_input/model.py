"""Triton python backend: a request's class name (Bayes-PFL's text input) -> the token tensor the stages take.

Needs the standard library and numpy only, so a stock Triton container runs it: CLIP's tokeniser and the class-name
rule are ``zsad_common.text`` (copied as is beside this file, with open_clip's vocabulary file). The rule is the one
zsad.methods.bayespfl.class_name_tokens applies: the client's text as given (no renaming of folder names: the
client sends words, e.g. "metal nut"; CLIP's tokeniser lower-cases them and collapses whitespace) becomes
``[SOT] words [EOT] 0...`` cut to the ``text_input`` parameter's length; tests/test_triton_repo_standalone.py
checks the ids equal the eager encoder's. An empty name, one whose tokens do not fit, one over ``MAX_TEXT_BYTES``
(refused before it is decoded or tokenised, and never echoed) or one that is not UTF-8 gets an error response for
its request alone.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from zsad_common.guard import BadInput, each_request
from zsad_common.text import ClipTokenizer, class_name_ids

MAX_TEXT_BYTES = 256
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"



class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        spec = json.loads(p["text_input"])
        self.request_name, self.tensor = spec["request_name"], spec["tensor"]
        self.length = int(spec["length"])
        here = os.path.dirname(os.path.abspath(__file__))
        self.tokenizer = ClipTokenizer(os.path.join(here, VOCAB_FILE))

    def _answer(self, request):
        items = pb_utils.get_input_tensor_by_name(request, self.request_name).as_numpy().reshape(-1)
        rows = []
        for i, b in enumerate(items):
            b = b if isinstance(b, bytes) else str(b).encode("utf-8")
            if len(b) > MAX_TEXT_BYTES:
                raise BadInput(f"{self.request_name} {i} is {len(b):,} bytes; at most {MAX_TEXT_BYTES} are allowed")
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput(f"{self.request_name} {i} is not UTF-8 text") from None
            rows.append(class_name_ids(text, self.tokenizer, self.length))
        tokens = np.asarray(rows, dtype=np.int64).reshape(len(rows), self.length)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.tensor, tokens)])

    def execute(self, requests):
        return each_request(pb_utils, requests, self._answer, self.model_name)
