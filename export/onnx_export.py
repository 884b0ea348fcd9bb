"""One ONNX file per ``Stage``: named inputs/outputs, a dynamic batch axis, static spatial sizes, opset 18.

Generic over ``Method.stages()``: nothing here knows a method. Positional embeddings are already baked for the
model's image size at load time, and heads hold their static text embeddings as buffers, so both become
initializers. Uses torch's dynamo exporter (a batch-2 example plus an explicit ``Dim``: a batch-1 example would
silently fix the batch at 1). Files above ~2 GB are written with external data (``model.onnx.data``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from zsad import ZsadError

OPSET = 18
_PROTO_LIMIT = 1_900_000_000  # protobuf's 2 GB cap, with headroom for the graph itself


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings for every stage; keep our own output readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_stage(stage, path: Path, max_batch: int = 32) -> Path:
    """Export ``stage.module`` to ``path`` (ONNX). Returns the path; external data lands beside it if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    dynamic = tuple({i: batch for i, d in enumerate(shape) if d == "B"} or None for shape in stage.inputs.values())
    example = stage.example_inputs(batch=2, generator=torch.Generator().manual_seed(0))
    stage.module.eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                stage.module, example, input_names=list(stage.inputs), output_names=list(stage.outputs),
                dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, verbose=False)
    except Exception as err:
        raise ZsadError(f"stage '{stage.name}' could not be exported to ONNX: {type(err).__name__}: "
                        f"{str(err).splitlines()[0][:300]}") from err
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(path), external_data=size > _PROTO_LIMIT)
    return path


def onnx_files(path: Path) -> list[Path]:
    """The model file and its external-data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])
