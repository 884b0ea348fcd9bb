"""CLIP weights files, read and written with bounded memory: ``--clip-weights`` files (``.safetensors``, a
``torch.save`` state dict, or OpenAI's TorchScript ``.pt``) and the CLIP SOWA's checkpoint carries.

- :func:`clip_tensors`: the file's tensors, unread (safetensors: its header; torch files: zsad.importers.torchfile,
  which runs nothing; a TorchScript archive is read as data too, never ``torch.jit.load``-ed).
- :func:`check_clip_shapes`: keys and declared shapes against an expected table (the model's own ``state_dict``
  when it exists, else zsad.importers.shapes.clip_state_shapes), before any tensor is read; the positional table
  may hold another square grid of the same width (it is resized on loading).
- :func:`read_clip_state`: check, then read each tensor (float32) for ``zsad.backbone.load_clip``.
- :func:`write_clip_safetensors`: check, then stream the tensors into a ``.safetensors`` file one at a time (the
  header first, from the declared shapes), so extracting SOWA's 1.7 GB CLIP never holds more than one tensor.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from zsad import ZsadError
from zsad.importers.torchfile import ModuleState, TensorRef, read_torch_file

OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # OpenAI JIT attributes, not weights
POSITIONAL = "visual.positional_embedding"
MAX_GRID = 256  # patches per side a positional table may declare
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


class SafetensorsRef:
    """A tensor of a .safetensors file, read on ``load``; shape from the header (safetensors checks the header's
    offsets against the file, so a tensor never spans more bytes than the file holds)."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: str):
        self.path, self.key, self.shape = path, key, torch.Size(shape)
        self.dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}.get(dtype, torch.float32)

    def load(self, shape) -> torch.Tensor:
        if tuple(self.shape) != tuple(shape):
            raise ZsadError(f"{self.path}: '{self.key}' has shape {tuple(self.shape)}, expected {tuple(shape)}")
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(self.key)


def clip_tensors(path: str | Path, expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, object]:
    """{state_dict key: unread tensor} of a CLIP weights file (``module.`` prefixes and OpenAI's extras dropped).

    A TorchScript object lists every tensor attribute, not only its parameters and buffers (``torch.jit.load``'s
    ``state_dict()`` would hold those alone): given ``expected``, its tensors outside that table are left out."""
    path = Path(path)
    if not path.is_file():
        raise ZsadError(f"CLIP weights file not found: {path}")
    obj: object
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                obj = {k: SafetensorsRef(path, k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                       for k in f.keys()}  # noqa: SIM118 -- a safe_open handle, not a dict
        except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
            raise ZsadError(f"Could not read CLIP weights from {path}: {type(err).__name__}: "
                            f"{str(err)[:200]}") from err
    else:
        obj = read_torch_file(path)
        if isinstance(obj, ModuleState):  # a TorchScript archive (OpenAI's ViT-*.pt): its tensor attributes
            obj = {k: v for k, v in obj.tensors().items() if expected is None or k in expected}
        for key in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, (TensorRef, SafetensorsRef)) for v in obj.values()):
        raise ZsadError(f"{path} does not hold a CLIP state dict (a mapping of parameter names to tensors)")
    out: dict[str, object] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ZsadError(f"{path}: a state dict key is a {type(k).__name__}, not a string")
        k = k[len("module."):] if k.startswith("module.") else k
        if k not in OPENAI_EXTRAS:
            out[k] = v
    return out


def _resizable(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A positional table of another square grid, same width (it is resized on loading)."""
    if key != POSITIONAL or len(got) != 2 or len(want) != 2 or got[1] != want[1]:
        return False
    g = math.isqrt(max(got[0] - 1, 0))
    return g * g + 1 == got[0] and 1 <= g <= MAX_GRID


def check_clip_shapes(tensors: dict[str, object], expected: dict[str, tuple[int, ...]], where: str,
                      arch: str = "the chosen CLIP architecture") -> None:
    """Keys and declared shapes against ``expected`` (no tensor read); a mismatch is a one-line ZsadError."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}  # type: ignore[attr-defined]
    mismatched = sorted(k for k in set(shapes) & set(expected)
                        if shapes[k] != tuple(expected[k]) and not _resizable(k, shapes[k], tuple(expected[k])))
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append("shape mismatch: " + ", ".join(f"{k} {shapes[k]} vs {tuple(expected[k])}"
                                                        for k in mismatched[:4]))
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(repr(k)[:60] for k in unexpected[:3])})")
        raise ZsadError(f"{where} does not fit {arch}: " + "; ".join(parts)
                        + ". Check that --clip-arch matches the file (e.g. ViT-L-14-336 for OpenAI ViT-L/14@336px).")


def _load(ref, key: str) -> torch.Tensor:
    t = ref.load(tuple(ref.shape))  # shape already checked against the table
    return t.float() if t.is_floating_point() else t


def read_clip_state(path: str | Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The CLIP weights in ``path`` after :func:`check_clip_shapes` against ``expected`` (floats widened)."""
    tensors = clip_tensors(path, expected)
    check_clip_shapes(tensors, expected, str(path))
    return {k: _load(v, k) for k, v in tensors.items()}


def write_clip_safetensors(tensors: dict[str, object], expected: dict[str, tuple[int, ...]], path: Path,
                           where: str) -> None:
    """Check ``tensors`` against ``expected``, then write them (floats as float32) to ``path`` one at a time."""
    from zsad.files import atomic_write

    check_clip_shapes(tensors, expected, where)
    keys = sorted(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k in keys:
        ref = tensors[k]
        dtype = ref.dtype  # type: ignore[attr-defined]
        out_dtype = torch.float32 if dtype.is_floating_point else dtype
        n = math.prod(ref.shape) * out_dtype.itemsize  # type: ignore[attr-defined]
        header[k] = {"dtype": SAFETENSORS_DTYPES[out_dtype], "shape": list(ref.shape),  # type: ignore[attr-defined]
                     "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for k in keys:
                t = _load(tensors[k], k).contiguous()
                want = header[k]
                if SAFETENSORS_DTYPES[t.dtype] != want["dtype"]:  # type: ignore[index]
                    raise ZsadError(f"{where}: '{k}' is {t.dtype}, its header entry says {want['dtype']}")  # type: ignore[index]
                f.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")

    atomic_write(path, write)
