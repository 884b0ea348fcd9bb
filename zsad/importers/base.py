"""What every importer shares: the source files, the key mapping with its checks, and writing the checkpoint.

An importer (one module per released format) reads its files into a flat {source key: tensor} dict, says which
zsad method and settings the released weights need (``settings``), and maps every tensor the released model uses at
inference onto the method's trainable parameters (``convert``), through :class:`Mapping`: each ``take`` checks the
source key exists and its shape, applies the documented reshape, and records ``source -> target (op)``; each
``drop`` records an unused tensor with the reason. Keys neither taken nor dropped are an error naming them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zsad import ZsadError
from zsad.importers.torchfile import dtype_of, materialize, same_tensor, shape_of


@dataclass
class Source:
    """The released files of one model: flat tensors by key, plus what the files were."""

    format: str
    tensors: dict[str, object]  # key -> torch.Tensor or TensorRef
    files: list[Path]
    notes: dict = field(default_factory=dict)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.tensors:
            raise ZsadError(f"{self.format} checkpoint {self.names()}: missing key '{key}'")
        return shape_of(self.tensors[key])

    def names(self) -> str:
        return ", ".join(p.name for p in self.files)


class Mapping:
    """Source tensors -> zsad trainable tensors. ``target_shapes`` is the method's table (zsad.importers.shapes):
    every source tensor's declared shape is checked before it is read, every result against its target."""

    def __init__(self, source: Source, target_shapes: dict[str, tuple[int, ...]]):
        self.source, self.target_shapes = source, target_shapes
        self.tensors: dict[str, torch.Tensor] = {}
        self.applied: list[dict] = []
        self.dropped: list[dict] = []
        self.widened: dict[str, str] = {}  # source key -> its dtype where it was not float32
        self._used: set[str] = set()

    def _get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        got = self.source.shape(key)
        if tuple(got) != tuple(shape):
            raise ZsadError(f"{self.source.format} checkpoint {self.source.names()}: key '{key}' has shape "
                            f"{tuple(got)}, expected {tuple(shape)} for the {self.source.notes.get('profile', '')} "
                            f"profile")
        self._used.add(key)
        value = materialize(self.source.tensors[key], got)
        if value.dtype != torch.float32:  # e.g. fp16 prompts of a CUDA-trained learner: widened exactly
            self.widened[key] = str(value.dtype).replace("torch.", "")
        return value.float()

    def take(self, keys: str | list[str], target: str, source_shape: tuple[int, ...], op: str = "copy",
             fn: Callable[..., torch.Tensor] | None = None) -> None:
        """Map source ``keys`` (checked against ``source_shape``; one shape for all) onto ``target``.

        ``fn(*tensors)`` builds the target tensor (default: the single tensor as is); the result must have the
        target's shape. ``op`` says in words what ``fn`` does (recorded in checkpoint.json).
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        if target not in self.target_shapes:
            raise ZsadError(f"internal: zsad has no trainable parameter '{target}'")
        values = [self._get(k, source_shape) for k in keys]
        out = fn(*values) if fn is not None else values[0]
        want = tuple(self.target_shapes[target])
        if tuple(out.shape) != want:
            raise ZsadError(f"{self.source.format} checkpoint {self.source.names()}: key '{keys[0]}' gives shape "
                            f"{tuple(out.shape)} for zsad '{target}', which needs {want}")
        self.tensors[target] = out.contiguous()
        entry = {"source": keys, "target": target, "op": op}
        if any(k in self.widened for k in keys):
            entry["source_dtype"] = self.widened[keys[0]]
        self.applied.append(entry)

    def drop(self, key: str, reason: str, same_as: str | None = None) -> None:
        """Record ``key`` as unused at inference; ``same_as``: a duplicate of that key (checked equal)."""
        if key not in self.source.tensors:
            raise ZsadError(f"{self.source.format} checkpoint {self.source.names()}: missing key '{key}'")
        if same_as is not None and (self.source.shape(same_as) != self.source.shape(key)
                                    or dtype_of(self.source.tensors[key]) != dtype_of(self.source.tensors[same_as])
                                    or not same_tensor(self.source.tensors[key], self.source.tensors[same_as])):
            raise ZsadError(f"{self.source.format} checkpoint {self.source.names()}: '{key}' should be the same "
                            f"tensor as '{same_as}' (shared module) but differs")
        self._used.add(key)
        entry = {"key": key, "shape": list(self.source.shape(key)), "reason": reason}
        self.dropped.append(entry)

    def drop_prefix(self, prefix: str, reason: str) -> int:
        keys = [k for k in self.source.tensors if k.startswith(prefix) and k not in self._used]
        for k in keys:
            self._used.add(k)
        if keys:
            n = sum(int(torch.Size(self.source.shape(k)).numel()) for k in keys)
            self.dropped.append({"key": prefix + "*", "tensors": len(keys), "values": n, "reason": reason})
        return len(keys)

    def finish(self) -> None:
        extra = sorted(set(self.source.tensors) - self._used)
        if extra:
            raise ZsadError(f"{self.source.format} checkpoint {self.source.names()}: unexpected key '{extra[0]}'"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                            + ": not part of the released model this importer knows")
        missing = sorted(set(self.target_shapes) - set(self.tensors))
        if missing:
            raise ZsadError(f"internal: the {self.source.format} mapping leaves zsad '{missing[0]}' unset")


class Importer:
    """One released format. Subclasses set ``name`` / ``method`` and implement ``read`` / ``settings`` / ``convert``."""

    name = ""
    method = ""
    files_help = ""  # what FILE... is, for messages
    n_files = 1

    def read(self, files: list[Path]) -> Source:
        raise NotImplementedError

    def settings(self, source: Source, profile: str) -> dict:
        """Config overrides the released weights need (deep-merged into the profile), e.g. taps, activation."""
        return {}

    def convert(self, source: Source, mapping: Mapping) -> None:
        raise NotImplementedError

    def clip_state(self, source: Source) -> dict[str, object] | None:
        """The frozen CLIP's own weights where the released file carries them (SOWA's Lightning checkpoint)."""
        return None
