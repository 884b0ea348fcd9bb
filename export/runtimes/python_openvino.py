"""``python-openvino``: OpenVINO inside Triton's python backend, one model per stage (triton_models/stage_openvino),
for the CPU server zsad-serve starts. Built and gated as ``openvino``; zsad-bench times it as ``openvino-*``."""
from __future__ import annotations

from zsad.export.openvino_export import OV_HINT
from zsad.export.runtimes.base import register
from zsad.export.runtimes.openvino import OpenVinoStages
from zsad.export.triton_repo import index_bounds_parameters, python_model_files


@register
class PythonOpenVino(OpenVinoStages):
    name = "python-openvino"
    summary = "OpenVINO inside the python backend (the CPU server zsad-serve starts)"

    def runs_on(self):
        return {"backend": "python"}

    def parameters(self, opts, stage, precision):
        # the inference precision passed explicitly (see triton_models/stage_openvino)
        return {"model_file": "model.xml", "inference_precision": OV_HINT[precision], "zsad_precision": precision,
                "performance_hint": opts.ov_hint.upper(), **index_bounds_parameters(stage)}

    def model_files(self, stage, stage_files, opts):
        return {**super().model_files(stage, stage_files, opts), **python_model_files("stage_openvino")}
