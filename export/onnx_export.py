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
    assert program is not None  # None only for the legacy exporter (dynamo=False)
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(path), external_data=size > _PROTO_LIMIT)
    return path


def onnx_files(path: Path) -> list[Path]:
    """The model file and its external-data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])


def export_metadata(method, trained: bool, checkpoint: str | Path | None = None, fp16: bool = False) -> dict[str, str]:
    """What a stage file says about itself (ONNX ``metadata_props``): enough to pre-process for it without zsad.

    The image size, mean and std are those of the served ``preprocess`` model (RGB, bicubic resize straight to
    size x size, [0, 1] then (x - mean) / std). ``checkpoint_sha256`` is that of the file the weights came from:
    ``checkpoint.safetensors`` of a checkpoint folder (or the released file given itself).
    """
    from zsad import __version__
    from zsad.data import CLIP_MEAN, CLIP_STD

    props = {
        "zsad.version": __version__,
        "zsad.method": method.name,
        "zsad.profile": method.profile,
        "zsad.image_size": str(method.image_size),
        "zsad.mean": ",".join(repr(float(v)) for v in CLIP_MEAN),
        "zsad.std": ",".join(repr(float(v)) for v in CLIP_STD),
        "zsad.trained": "true" if trained else "false",
        "zsad.precision": "fp16" if fp16 else "fp32",
    }
    if checkpoint:
        props["zsad.checkpoint_sha256"] = _checkpoint_sha256(Path(checkpoint))
    return props


def _checkpoint_sha256(checkpoint: Path) -> str:
    from zsad.checkpoint import WEIGHTS_NAME, sha256_file

    path = checkpoint / WEIGHTS_NAME if checkpoint.is_dir() else checkpoint
    if path.suffix == ".json":  # the sidecar was given: its weights file is the source
        path = path.with_suffix(".safetensors")
    return sha256_file(path)


def stamp_metadata(path: Path, props: dict[str, str]) -> None:
    """Set ``props`` as ``metadata_props`` of the ONNX file at ``path`` (replacing keys it already holds).

    External weights (``model.onnx.data``) are neither read nor rewritten: only the graph file changes.
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    kept = {p.key: p.value for p in model.metadata_props if p.key not in props}
    del model.metadata_props[:]
    for key, value in {**kept, **props}.items():
        model.metadata_props.add(key=str(key), value=str(value))
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def stamp_stage_files(stage_files: dict, props: dict[str, str]) -> None:
    """Stamp every exported stage's ONNX file (``{stage name: [model.onnx, ...]}``) with ``props`` + its stage name."""
    for stage, files in stage_files.items():
        for f in files if isinstance(files, list) else []:
            if Path(f).suffix == ".onnx":
                stamp_metadata(f, {**props, "zsad.stage": stage})
