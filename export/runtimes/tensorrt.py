"""``tensorrt``: one TensorRT plan per stage (``tensorrt_plan``), built from the gated ONNX stages.

TensorRT cannot be installed on our build machines: the configs are validated against Triton's schema, and the
plans are built only where ``import tensorrt`` works (export/trt_engine.py). zsad-bench times it served only.
"""
from __future__ import annotations

from zsad.export.runtimes.base import register
from zsad.export.runtimes.onnx_runtime import OnnxStages
from zsad.export.runtimes.runners import Skip


def _installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@register
class TensorRT(OnnxStages):
    name = "tensorrt"
    summary = "fp16/fp32 plans (needs TensorRT)"
    bench_variants = ("tensorrt",)

    def available(self):
        if _installed():
            return None
        return ("--backend tensorrt needs TensorRT (pip install 'zsad[gpu]' on a machine with NVIDIA's TensorRT); it "
                "is not installed here. The onnxruntime backend runs the same ONNX stages.")

    def check_fp16(self, device):
        """fp16 is a TensorRT builder flag: nothing to check before the build."""

    def runs_on(self):
        return {"platform": "tensorrt_plan"}

    def model_files(self, stage, stage_files, opts):
        from zsad.export.trt_engine import build_engine

        return {"model.plan": build_engine(stage_files[stage.name][0], stage, opts)}

    def bench_skip(self, variant, device):
        if not _installed():
            return "TensorRT is not installed here (pip install 'zsad[gpu]' on a TensorRT machine)"
        return "time TensorRT through the served mode (zsad-export --backend tensorrt + a GPU tritonserver)"

    def bench_runner(self, variant, method, device, max_batch, scratch):
        raise Skip(self.bench_skip(variant, device))
