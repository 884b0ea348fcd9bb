"""Triton python backend: one exported zsad stage run by ONNX Runtime (the `python-ort` backend).

For servers without the onnxruntime backend (e.g. the CPU tritonserver bundled with nvidia-pytriton). Requests
of a dynamic batch are concatenated along the batch axis, run in one ORT call and split back.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], p["onnx_file"])
        wanted = p.get("providers", "CPUExecutionProvider").split(",")
        providers = [x for x in wanted if x in ort.get_available_providers()] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        threads = int(p.get("intra_op_threads", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, opts, providers=providers)
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]

    def execute(self, requests):
        feeds = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        sizes = [f[0].shape[0] for f in feeds]
        batch = {n: np.concatenate([f[i] for f in feeds]) for i, n in enumerate(self.inputs)}
        out = self.session.run(self.outputs, batch)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o[start:start + size]))
                       for n, o in zip(self.outputs, out)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
