"""Triton python backend: one exported zsad stage run by OpenVINO (the `python-openvino` backend).

For CPU servers without Triton's openvino backend (e.g. the tritonserver bundled with nvidia-pytriton). The IR
(model.xml + model.bin, int8 where NNCF quantised it) is compiled with the inference precision the export gated
(parameter ``inference_precision``: f32 or bf16), which must be given explicitly: on CPUs with AVX-512 BF16 / AMX
OpenVINO's default is bf16. Requests are checked (finite floats, integers non-negative and below the export's
declared index bounds), the valid ones of a
dynamic batch concatenated, run in one call and split back; if that call fails, each runs alone
(zsad_common.guard.run_stage_requests, copied beside this file at export). An int8 IR whose weights would overflow
this CPU's int8 dot products (8-bit weights on an x86 CPU without VNNI: zsad_common.int8) is refused at load.

Parameter ``performance_hint`` (zsad-export --ov-hint): LATENCY compiles one stream on every core and runs a dynamic
batch in one call; THROUGHPUT lets OpenVINO choose several streams (OPTIMAL_NUMBER_OF_INFER_REQUESTS of them),
compiles the graph reshaped to one image, and runs every image of a batch as its own infer request on those streams
(one per stream at a time, started together and waited for in order; no callbacks from OpenVINO's threads), the
outputs put back in order.
"""
import json
import os

import numpy as np
import openvino as ov
import triton_python_backend_utils as pb_utils

from zsad_common.guard import run_stage_requests
from zsad_common.int8 import cpu_flags, overflow_refusal


def int8_weight_bits(model):
    """The width of the IR's int8 weights as zsad-export recorded it; exports older than the record were int8 in 8
    bits (NNCF's default); None: not quantised."""
    if model.has_rt_info(["zsad", "int8_weight_bits"]):
        return int(model.get_rt_info(["zsad", "int8_weight_bits"]).astype(str))
    quantized = model.has_rt_info(["zsad", "int8_quantized"]) and \
        model.get_rt_info(["zsad", "int8_quantized"]).astype(str) == "True"
    return 8 if quantized else None


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
        core = ov.Core()
        model = core.read_model(path)
        refusal = overflow_refusal(int8_weight_bits(model), cpu_flags())
        if refusal:  # the model fails to load, with the reason, rather than serve clipped int8 dot products
            raise RuntimeError(f"{self.model_name}: {refusal}")
        if hint == "THROUGHPUT":
            # every image its own infer request on the streams, so the graph is reshaped to one image: the
            # dynamic-batch graph run this way from two streams crashed the stub under load (a segfault in a CPU
            # plugin worker's memcpy, BAG-CLIP paper profile, 8 in flight; not reproduced outside Triton) and never
            # has since with static shapes; one compiled graph serves single images and batches alike
            model.reshape({port.get_any_name(): [1, *list(port.get_partial_shape())[1:]] for port in model.inputs})
        self.compiled = core.compile_model(model, "CPU", props)
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.bounds = json.loads(p.get("index_bounds", "{}"))  # the export's Stage.index_bounds (BAG-CLIP's knn_index)
        by_name = {o.get_any_name(): o for o in self.compiled.outputs}
        self.ports = [by_name[n] for n in self.outputs]
        self.stream_requests = []
        if hint == "THROUGHPUT":
            streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self.stream_requests = [self.compiled.create_infer_request() for _ in range(streams)]

    def _run(self, batch):
        if not self.stream_requests:
            result = self.compiled(batch)
            return [result[port] for port in self.ports]
        return self._run_on_streams(batch, len(next(iter(batch.values()))))

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
