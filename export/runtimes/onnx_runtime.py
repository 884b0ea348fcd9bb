"""``onnxruntime``: one ONNX file per stage, served by Triton's ONNX Runtime backend (``onnxruntime_onnx``).

Its stage building (ONNX export, optional fp16 conversion, an ONNX Runtime session per stage for the parity gate)
is the first step of every backend served from ONNX (tensorrt, python-ort, openvino, python-openvino), which
subclass it. zsad-bench times it as ``ort`` (fp32) and ``ort-int8`` (static int8 QDQ of the encoder).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from zsad import ZsadError
from zsad.export.onnx_export import export_stage, onnx_files
from zsad.export.parity import ort_runner
from zsad.export.runtimes.base import Runtime, register
from zsad.export.runtimes.runners import Skip, stage_chain_runner


class OnnxStages(Runtime):
    """Builds and gates ONNX stages (not registered: the backends served from ONNX derive from it)."""

    def gate_runtime(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"

    def check_fp16(self, device: str) -> None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ZsadError("--fp16 with ONNX Runtime needs its CUDA provider (onnxruntime-gpu) here to run the "
                            "parity gate on the kernels that will serve it. The CPU provider computes these fp16 "
                            "graphs in fp32 (casts around every arithmetic node: no fp16 speed) and crashes in its "
                            "NchwcTransformer on the converted encoder unless that is disabled (zsad.export.fp16."
                            "cpu_session). Export fp32 for CPU serving, or use --backend tensorrt / python-torch "
                            "on a GPU machine.")

    def build_stages(self, method, stages, opts, scratch, log):
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if opts.fp16 else ["CPUExecutionProvider"]
        runners, files = {}, {}
        for st in stages:
            path = scratch / "onnx" / st.name / "model.onnx"
            log(f"  exporting stage '{st.name}' to ONNX ...")
            export_stage(st, path, opts.max_batch)
            if opts.fp16:
                from zsad.export.fp16 import convert_to_fp16

                convert_to_fp16(path)
            runners[st.name] = ort_runner(path, providers)
            files[st.name] = onnx_files(path)
        return runners, files


@register
class OnnxRuntime(OnnxStages):
    name = "onnxruntime"
    summary = "Triton's ORT backend"
    bench_variants = ("ort", "ort-int8")
    cpu_bench_variants = ("ort-int8",)

    def runs_on(self) -> dict:
        return {"platform": "onnxruntime_onnx"}

    def bench_runner(self, variant, method, device, max_batch, scratch):
        if variant == "ort-int8":
            return _int8_runner(method, scratch, max_batch)
        return _fp32_runner(method, device, scratch, max_batch)


def _fp32_runner(method, device: str, scratch, max_batch: int):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("onnxruntime has no CUDA provider in this environment (install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    stages = method.stages()
    files = scratch.onnx(method, max_batch)
    runs = [(st, ort_runner(files[st.name][0], providers)) for st in stages]
    return stage_chain_runner(method, runs, "ort", "fp32",
                              f"ONNX Runtime {ort.__version__}, {providers[0]}, one session per stage")


def _int8_runner(method, scratch, max_batch: int):
    """ONNX Runtime static int8 (QDQ, per-channel weights) of the encoder's MatMul/Conv, calibrated on the synthetic
    set's training classes; CLIP's final projection (found by value) stays fp32, as in the OpenVINO int8 path."""
    import onnxruntime as ort

    from zsad.methods.stages import EncoderStage

    stages = method.stages()
    files = scratch.onnx(method, max_batch)
    cal = scratch.calibration(method)
    runs = []
    for st in stages:
        path = files[st.name][0]
        if isinstance(st.module, EncoderStage):
            path = quantize_int8(method, stages, st, path, cal, scratch.workdir / "ort-int8" / st.name / "model.onnx")
        runs.append((st, ort_runner(path)))
    from zsad.cpu import int8_weight_bits_here

    return stage_chain_runner(method, runs, "ort-int8", "int8",
                              f"ONNX Runtime {ort.__version__} CPU, static int8 QDQ (per-channel "
                              f"{int8_weight_bits_here()}-bit weights) of the "
                              f"encoder's MatMul/Conv, final projection fp32, {len(cal)} synthetic calibration images")


def projection_nodes(model, proj: np.ndarray) -> list[str]:
    """The MatMul / Gemm nodes of ONNX ``model`` whose constant operand is ``proj`` (or its transpose): CLIP's final
    projection, kept fp32."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(
        i in inits and any(inits[i].shape == p.shape and np.array_equal(inits[i], p) for p in (proj, proj.T))
        for i in n.input)]


def quantize_int8(method, stages, stage, path, calibration: np.ndarray, out):
    """``stage``'s ONNX at ``path`` -> static int8 QDQ at ``out``, calibrated on ``calibration`` (preprocessed
    images) one image at a time, CLIP's final projection left fp32; returns ``out``."""
    import onnx

    from zsad.export.openvino_export import stage_calibration_feeds

    keep = projection_nodes(onnx.load(str(path)), method.backbone.visual.proj.detach().cpu().numpy())
    return quantize_static_int8(path, out, stage_calibration_feeds(method, stages, stage, calibration), keep)


def quantize_static_int8(path, out, feeds: list[dict[str, np.ndarray]], keep_fp32: list[str]):
    """ORT static int8 QDQ of the ONNX at ``path`` (MatMul / Conv / Gemm but the nodes ``keep_fp32``; per-channel
    weights) calibrated on ``feeds`` one at a time, written to ``out``. Weights in 7 bits (``reduce_range``) where
    this CPU has no VNNI: MLAS's int8 dot products there overflow int16 with 8-bit ones
    (zsad.triton_models.zsad_common.int8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from zsad.cpu import int8_weight_bits_here

    class Reader(CalibrationDataReader):
        """The calibration feeds, one image per step; ``set_range`` lets ORT calibrate in strides (below)."""

        def __init__(self, feeds):
            self.feeds = feeds
            self.set_range(0, len(feeds))

        def __len__(self):
            return len(self.feeds)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(self.feeds[start_index:end_index])

        def get_next(self):
            return next(self.it, None)

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with calibration_in_priority_order():
        quantize_static(str(path), str(out), Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        reduce_range=int8_weight_bits_here() == 7,
                        op_types_to_quantize=["MatMul", "Conv", "Gemm"], nodes_to_exclude=keep_fp32,
                        # min/max one image at a time, merged, rather than every image's min/max kept to the end
                        extra_options={"CalibStridedMinMax": 1})
    return out


@contextmanager
def calibration_in_priority_order():
    """ORT's static-int8 calibration runs a copy of the model in which every calibrated tensor also feeds a
    ReduceMin and a ReduceMax. In ORT's default execution order those reductions run late, so every such tensor of
    the whole model stays alive at once: 15.2 GB for one 518 px image through the paper-profile ViT-L encoder
    (measured, ORT 1.32; the zsad-bench worker was killed by the OOM killer at 19.7 GB). ``PRIORITY_BASED`` order
    runs each reduction as soon as its tensor exists: 1.7 GB peak for the same image. ORT builds that session inside
    ``quantize_static`` with no way to pass session options, so its one session factory is swapped for the call."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibraterBase

    original = CalibraterBase.create_inference_session

    def create_inference_session(self):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's own
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=options,
                                                  providers=self.execution_providers)

    CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = original
