"""Triton python backend: one exported zsad stage run by OpenVINO (the `python-openvino` backend).

For CPU servers without Triton's openvino backend (e.g. the tritonserver bundled with nvidia-pytriton). The IR
(model.xml + model.bin, int8 where NNCF quantised it) is compiled with the inference precision the export gated
(parameter ``inference_precision``: f32 or bf16), which must be given explicitly: on CPUs with AVX-512 BF16 / AMX
OpenVINO's default is bf16. Requests are checked (finite floats, integers non-negative and below the export's
declared index bounds), the valid ones of a
dynamic batch concatenated, run in one call and split back; if that call fails, each runs alone
(zsad_common.guard.run_stage_requests, copied beside this file at export).

Parameter ``performance_hint`` (zsad-export --ov-hint): LATENCY compiles one stream on every core; THROUGHPUT lets
OpenVINO choose several streams (OPTIMAL_NUMBER_OF_INFER_REQUESTS of them), and a batch of more than one image is cut
into single images run on those streams at once (one infer request per stream, started together and waited for in
order; no callbacks from OpenVINO's threads), their outputs put back in order.
"""
import json
import os

import numpy as np
import openvino as ov
import triton_python_backend_utils as pb_utils

from zsad_common.guard import run_stage_requests


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        path = os.path.join(args["model_repository"], args["model_version"], p.get("model_file", "model.xml"))
        hint = p.get("performance_hint", "LATENCY")
        props = {"INFERENCE_PRECISION_HINT": p.get("inference_precision", "f32"), "PERFORMANCE_HINT": hint}
        threads = int(p.get("inference_threads", "0"))
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(path, "CPU", props)
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.bounds = json.loads(p.get("index_bounds", "{}"))  # the export's Stage.index_bounds (BAG-CLIP's knn_index)
        by_name = {o.get_any_name(): o for o in self.compiled.outputs}
        self.ports = [by_name[n] for n in self.outputs]
        self.stream_requests = []
        if hint == "THROUGHPUT":
            streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            if streams > 1:
                self.stream_requests = [self.compiled.create_infer_request() for _ in range(streams)]

    def _run(self, batch):
        n = len(next(iter(batch.values())))
        if not self.stream_requests or n == 1:
            result = self.compiled(batch)
            return [result[port] for port in self.ports]
        return self._run_on_streams(batch, n)

    def _run_on_streams(self, batch, n):
        """One image per infer request, as many at once as there are streams; outputs stacked in input order."""
        parts = []
        for first in range(0, n, len(self.stream_requests)):
            started = list(zip(self.stream_requests, range(first, n), strict=False))  # the last round may be short
            for request, i in started:
                request.start_async({name: a[i:i + 1] for name, a in batch.items()})
            for request, _ in started:
                request.wait()
                parts.append([np.copy(request.get_tensor(port).data) for port in self.ports])
        return [np.concatenate([part[j] for part in parts]) for j in range(len(self.ports))]

    def execute(self, requests):
        return run_stage_requests(pb_utils, requests, self.inputs, self.outputs, self._run, self.model_name,
                                  self.bounds)
