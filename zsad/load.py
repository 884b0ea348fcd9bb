"""The one loader: a method from a source (a zsad checkpoint, or an authors' released file) or from a name.

Every command that takes ``--checkpoint`` / ``--model`` builds its method here, as open_clip's
``create_model(name, pretrained=tag|path)`` is its one entry point:

- :func:`resolve` turns a source into a zsad checkpoint once: a run directory or its ``checkpoint.safetensors`` /
  ``checkpoint.json`` as they are, an authors' released file imported (``zsad.importers.import_released``: detected,
  read in bounded memory, cached per process) with the user's CLIP weights;
- :func:`load` builds the method from it (``zsad.checkpoint``: sidecar, weights, SHA-256 check), or, with no source,
  an untrained method from ``model`` and ``profile``;
- ``clip_override`` (zsad.checkpoint) is the one way a local CLIP weights file replaces the profile's pretrained tag.

Dependencies point one way: this module imports ``zsad.checkpoint`` and ``zsad.importers``; neither imports it,
and ``zsad.checkpoint`` knows nothing of released formats.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from zsad import ZsadError
from zsad.checkpoint import build_from_sidecar, checkpoint_paths, clip_override, read_sidecar

if TYPE_CHECKING:
    from zsad.methods.base import Method


def resolve(source: str | Path, clip_weights: str | Path | None = None) -> Path:
    """The zsad checkpoint a source names: itself, or the import of an authors' released file."""
    p = Path(source)
    if p.is_file() and p.suffix not in (".safetensors", ".json"):
        from zsad.importers import import_released

        return import_released(p, clip_weights)
    return p


def sidecar(source: str | Path, clip_weights: str | Path | None = None) -> dict:
    """The checkpoint.json of a source (a released file is imported first)."""
    return read_sidecar(checkpoint_paths(resolve(source, clip_weights))[1])


@dataclass
class Loaded:
    """What :func:`load` built: the method (eval mode, on the device), and where it came from."""

    method: Method
    trained: bool  # from a checkpoint (False: an untrained method from its profile)
    sidecar: dict = field(default_factory=dict)  # the checkpoint's checkpoint.json ({} when untrained)
    checkpoint: Path | None = None  # the zsad checkpoint it was read from (a released file's import)


def load(source: str | Path | None = None, *, model: str | None = None, profile: str = "paper",
         clip_weights: str | Path | None = None, overrides: dict | None = None, device: str = "cpu") -> Loaded:
    """The method of ``source`` (``model``, when given, must match it), or untrained ``model`` at ``profile``.

    ``overrides`` deep-merge into the stored (or the profile's) config, e.g. ``{"backbone": {"image_size": 336}}``;
    ``clip_weights`` replaces the CLIP the config names (a released file is imported with it)."""
    import zsad.methods as M
    from zsad.configs import deep_merge

    if source is not None:
        checkpoint = resolve(source, clip_weights)
        weights, sidecar_path = checkpoint_paths(checkpoint)
        meta = read_sidecar(sidecar_path)
        if model and model != meta["method"]:
            raise ZsadError(f"--model {model} but {source} is a '{meta['method']}' checkpoint")
        method = build_from_sidecar(weights, meta, deep_merge(overrides or {}, clip_override(clip_weights)),
                                    where=str(source))
        return Loaded(method.to(device).eval(), True, meta, checkpoint)
    if not model:
        raise ZsadError("give a checkpoint, or a method name (--model) and a profile")
    method = M.create(model, profile, **deep_merge(overrides or {}, clip_override(clip_weights)))
    return Loaded(method.to(device).eval(), False)


__all__ = ["Loaded", "clip_override", "load", "resolve", "sidecar"]
