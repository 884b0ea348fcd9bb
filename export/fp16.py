"""fp16 ONNX for ONNX Runtime's CUDA provider, with the normalisation reductions kept in fp32.

CLIP's residual stream has large outlier channels: LayerNorm's mean/variance (and the L2 norms of the cosine
similarities) overflow or lose all precision in fp16, so those ops stay fp32 with casts around them
(clip-as-service found the same overflow in TensorRT). Inputs and outputs stay fp32, so the Triton configs and
clients do not change. TensorRT does not use this file: its fp16 is a builder flag on the fp32 ONNX.
"""
from __future__ import annotations

from pathlib import Path

from zsad import ZsadError

KEEP_FP32 = ["LayerNormalization", "ReduceMean", "ReduceL2", "ReduceSumSquare", "Pow", "Sqrt", "ReduceSum"]


def convert_to_fp16(path: Path) -> Path:
    """Rewrite the ONNX file at ``path`` in fp16 (weights and compute) except ``KEEP_FP32`` ops; I/O stays fp32."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as err:
        raise ZsadError("--fp16 for ONNX Runtime needs onnxconverter-common: pip install 'zsad[onnx]'") from err
    model = onnx.load(str(path))
    model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=KEEP_FP32,
                                             disable_shape_infer=False)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
