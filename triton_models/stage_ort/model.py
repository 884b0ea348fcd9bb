"""Triton python backend: one exported zsad stage run by ONNX Runtime (the `python-ort` backend).

For servers without the onnxruntime backend (e.g. the CPU tritonserver bundled with nvidia-pytriton). Clients can
reach a stage model directly, so each request is checked before it runs: Triton has already checked names, dtypes
and shapes against config.pbtxt; here float inputs must be finite and integer inputs (token ids, indices) in the
range the graph indexes with them (read off the ONNX graph at load). Valid requests of a dynamic batch are
concatenated along the batch axis, run in one ORT call and split back; if that call fails, each runs alone
(zsad_common.guard.run_stage_requests, copied beside this file at export).
"""
import json
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from zsad_common.guard import run_stage_requests

# ops that carry an integer tensor's values through unchanged (only its layout changes)
_PASS_THROUGH = {"Unsqueeze", "Squeeze", "Reshape", "Expand", "Flatten", "Identity", "Concat", "Tile", "Transpose"}


def index_bounds(path: str, names: list) -> dict:
    """For each integer graph input: the smallest static size of a dimension it indexes (Gather, GatherElements,
    GatherND, ScatterElements, reached through layout-only ops). ONNX wraps negative indices silently, so they are
    refused too."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    g = model.graph
    shapes = {t.name: [d.dim_value if d.HasField("dim_value") else None for d in t.type.tensor_type.shape.dim]
              for t in list(g.value_info) + list(g.input) + list(g.output)}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # tensor name -> (node, input slot)
    for node in g.node:
        for k, x in enumerate(node.input):
            consumers.setdefault(x, []).append((node, k))
    bounds = {}
    for name in names:
        found, frontier, seen = [], [name], set()
        while frontier:
            x = frontier.pop()
            for node, k in consumers.get(x, []):
                if (node.name, k) in seen:
                    continue
                seen.add((node.name, k))
                data = shapes.get(node.input[0]) or []
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                if node.op_type in ("Gather", "GatherElements", "ScatterElements") and k == 1 and data:
                    found.append(data[axis % len(data)])
                elif node.op_type == "GatherND" and k == 1:
                    index_depth = (shapes.get(node.input[1]) or [None])[-1]
                    found += data[:index_depth] if index_depth else []
                elif node.op_type in _PASS_THROUGH:
                    frontier += list(node.output)
        static = [d for d in found if d]
        bounds[name] = min(static) if static else None
    return bounds


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.model_name = args["model_name"]
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
        ints = [i["name"] for i in cfg["input"] if i["data_type"] in ("TYPE_INT64", "TYPE_INT32")]
        found = index_bounds(path, ints) if ints else {}
        # the export's declared bounds (Stage.index_bounds) where the graph hides one: the tighter of the two
        declared = json.loads(p.get("index_bounds", "{}"))
        self.bounds = {n: min(b for b in (found.get(n), declared.get(n)) if b is not None)
                       for n in ints if found.get(n) is not None or declared.get(n) is not None}

    def _run(self, batch):
        return self.session.run(self.outputs, batch)

    def execute(self, requests):
        return run_stage_requests(pb_utils, requests, self.inputs, self.outputs, self._run, self.model_name,
                                  self.bounds)
