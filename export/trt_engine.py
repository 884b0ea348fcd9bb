"""TensorRT engines (``model.plan``) from the exported ONNX stages.

Written against TensorRT 10's documented Python API (Builder, OnnxParser, an optimisation profile over the batch
axis, BuilderFlag.FP16 with normalisation layers pinned to fp32). TensorRT cannot be installed on our build
machines, so this code has NOT been run here; the Triton configs it goes with are validated against Triton's
schema, and its test runs only where ``import tensorrt`` works.
"""
from __future__ import annotations

from pathlib import Path

from zsad import ZsadError


def build_engine(onnx_path: Path, stage, opts, workspace_gib: float = 4.0) -> bytes:
    """Serialized engine for one stage: batch profile min 1 / opt = largest preferred batch / max = max batch."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ZsadError("TensorRT is not installed (pip install 'zsad[gpu]' on a machine with NVIDIA's "
                        "TensorRT)") from err
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ZsadError(f"TensorRT could not parse stage '{stage.name}' ({onnx_path}): {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if opts.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):  # LayerNorm / reductions overflow in fp16: keep them fp32
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    profile = builder.create_optimization_profile()
    opt = max(opts.preferred_batch, default=opts.max_batch)  # no preferred sizes: optimise for the largest
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)[1:]
        profile.set_shape(tensor.name, [1] + dims, [opt] + dims, [opts.max_batch] + dims)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ZsadError(f"TensorRT failed to build an engine for stage '{stage.name}' (see the TensorRT log above)")
    return bytes(engine)
