"""Triton python backend: one exported zsad stage run by OpenVINO (the `python-openvino` backend).

For CPU servers without Triton's openvino backend (e.g. the tritonserver bundled with nvidia-pytriton). The IR
(model.xml + model.bin, int8 where NNCF quantised it) is compiled with the inference precision the export gated
(parameter ``inference_precision``: f32 or bf16), which must be given explicitly: on CPUs with AVX-512 BF16 / AMX
OpenVINO's default is bf16. Requests are checked (finite floats, integers non-negative and below the export's
declared index bounds), the valid ones of a
dynamic batch concatenated, run in one call and split back; if that call fails, each runs alone
(zsad_common.guard.run_stage_requests, copied beside this file at export).
"""
import json
import os

import openvino as ov
import triton_python_backend_utils as pb_utils

from zsad_common.guard import run_stage_requests


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        path = os.path.join(args["model_repository"], args["model_version"], p.get("model_file", "model.xml"))
        props = {"INFERENCE_PRECISION_HINT": p.get("inference_precision", "f32"), "PERFORMANCE_HINT": "LATENCY"}
        threads = int(p.get("inference_threads", "0"))
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(path, "CPU", props)
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.bounds = json.loads(p.get("index_bounds", "{}"))  # the export's Stage.index_bounds (BAG-CLIP's knn_index)
        by_name = {o.get_any_name(): o for o in self.compiled.outputs}
        self.ports = [by_name[n] for n in self.outputs]

    def _run(self, batch):
        result = self.compiled(batch)
        return [result[port] for port in self.ports]

    def execute(self, requests):
        return run_stage_requests(pb_utils, requests, self.inputs, self.outputs, self._run, self.model_name,
                                  self.bounds)
