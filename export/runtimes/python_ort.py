"""``python-ort``: ONNX Runtime inside Triton's python backend, one model per stage (triton_models/stage_ort).

Runs on any Triton server, the CPU one zsad-serve starts included. Built and gated as ``onnxruntime``; zsad-bench
times the same sessions as ``ort``.
"""
from __future__ import annotations

from zsad.export.runtimes.base import register
from zsad.export.runtimes.onnx_runtime import OnnxStages
from zsad.export.triton_repo import index_bounds_parameters, python_model_files


@register
class PythonOrt(OnnxStages):
    name = "python-ort"
    summary = "ONNX Runtime inside the python backend (any server, incl. the CPU one zsad-serve starts)"
    default_device = "cpu"

    def runs_on(self):
        return {"backend": "python"}

    def parameters(self, opts, stage, precision):
        return {"onnx_file": "model.onnx",
                "providers": "CUDAExecutionProvider,CPUExecutionProvider"
                if opts.instance_kind == "KIND_GPU" else "CPUExecutionProvider",
                **index_bounds_parameters(stage)}

    def model_files(self, stage, stage_files, opts):
        return {**super().model_files(stage, stage_files, opts), **python_model_files("stage_ort")}
