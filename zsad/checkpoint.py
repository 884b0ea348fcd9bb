"""Checkpoints: the trainable parameters only (safetensors) + a JSON sidecar that rebuilds the method.

A checkpoint directory holds ``checkpoint.safetensors`` and ``checkpoint.json`` (method, profile, the full
resolved config, where the CLIP weights came from, versions, data, epochs). The frozen CLIP is not stored: it
is rebuilt from the config (pretrained tag, weights file, or seeded random init for tests), and
``load_checkpoint(..., clip_weights=FILE)`` points it at a local file on an offline machine.
Each file is written atomically (temp file + rename), and the sidecar records the SHA-256 of the weights file
it belongs with: a pair left mismatched by an interrupted save is refused on load instead of mislabelled. (Training
commits its resumable state, weights included, in one file first: see ``zsad.train.loop``.) This module reads and
writes zsad checkpoints only; ``zsad.load`` is the loader every command uses (released files, untrained methods).
"""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zsad import ZsadError, __version__
from zsad.files import atomic_write, atomic_write_text, sha256_file  # noqa: F401 (part of this module's API)

FORMAT = "zsad-checkpoint/1"
WEIGHTS_NAME = "checkpoint.safetensors"
SIDECAR_NAME = "checkpoint.json"


def versions() -> dict[str, str]:
    from zsad._compat import import_open_clip

    open_clip = import_open_clip()
    return {"zsad": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def trainable_state(method) -> dict[str, torch.Tensor]:
    """The method's trainable parameters as CPU tensors (a copy: later training steps do not change it)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in method.trainable_state_dict().items()}


def checkpoint_sidecar(method, state: dict[str, torch.Tensor], **meta) -> dict:
    """The sidecar JSON of a checkpoint of ``method`` holding ``state``; extra ``meta`` goes in as is."""
    return config_sidecar(method.name, method.profile, method.config, state,
                          **{"clip_weights": method.backbone.info.weights, **meta})


def config_sidecar(name: str, profile: str, config, state: dict[str, torch.Tensor], **meta) -> dict:
    """The sidecar JSON from a method's name, profile and resolved config, with no model built (zsad-import)."""
    from zsad.configs import config_to_dict

    return {
        "format": FORMAT,
        "method": name,
        "profile": profile,
        "config": config_to_dict(config),
        "trainable_parameters": int(sum(v.numel() for v in state.values())),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
    }


def write_checkpoint(directory: Path, state: dict[str, torch.Tensor], sidecar: dict) -> Path:
    """Write ``state`` (safetensors) and ``sidecar`` (JSON, plus the weights file's SHA-256) into ``directory``."""
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    sidecar = {**sidecar, "weights_sha256": sha256_file(directory / WEIGHTS_NAME)}
    atomic_write_text(directory / SIDECAR_NAME, json.dumps(sidecar, indent=2, default=str))
    return directory


def save_checkpoint(directory: Path, method, **meta) -> Path:
    """Write the method's trainable parameters and sidecar into ``directory``; extra ``meta`` goes in the JSON."""
    state = trainable_state(method)
    return write_checkpoint(directory, state, checkpoint_sidecar(method, state, **meta))


def clip_override(clip_weights: str | Path | None) -> dict:
    """Config overrides that point the backbone at a local CLIP weights file instead of the profile's pretrained
    tag (none for None): the one way every command applies ``--clip-weights``."""
    return {"backbone": {"weights": str(clip_weights), "pretrained": None}} if clip_weights else {}


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """Accept the directory, the .safetensors or the .json of a zsad checkpoint; return (weights, sidecar).
    (An authors' released file is a source for ``zsad.load``, which imports it into a checkpoint first.)"""
    p = Path(path)
    if p.is_dir():
        weights, sidecar = p / WEIGHTS_NAME, p / SIDECAR_NAME
    elif p.suffix in (".safetensors", ".json"):
        weights, sidecar = p.with_suffix(".safetensors"), p.with_suffix(".json")
    else:
        raise ZsadError(f"not a zsad checkpoint: {p} (give the directory train/run.py wrote, or its "
                        f"{WEIGHTS_NAME})")
    for f in (weights, sidecar):
        if not f.is_file():
            raise ZsadError(f"checkpoint file missing: {f}")
    return weights, sidecar


def read_sidecar(path: str | Path) -> dict:
    """The checkpoint.json of a zsad checkpoint (its directory, weights or sidecar path), checked."""
    _, sidecar = checkpoint_paths(path)
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ZsadError(f"corrupt checkpoint sidecar {sidecar}: {str(err)[:200]}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ZsadError(f"{sidecar} is not a {FORMAT} sidecar (format={found!r})")
    missing = [k for k in ("method", "profile", "config") if k not in meta]
    if missing or not isinstance(meta["config"], dict):
        raise ZsadError(f"corrupt checkpoint sidecar {sidecar}: missing or bad {', '.join(missing) or 'config'}")
    return meta


def build_from_sidecar(weights: Path, meta: dict, overrides: dict | None = None, where: str = ""):
    """The method ``meta`` (a checked sidecar) describes, with the trainable parameters of ``weights`` loaded.

    ``overrides`` deep-merge into the stored config (e.g. ``{"backbone": {"image_size": 336}}`` to export at
    another resolution, or a local CLIP file: ``zsad.load.clip_override``); the trainable parameters must still fit.
    """
    import zsad.methods as M
    from zsad.configs import build_config, deep_merge

    where = where or str(weights.parent)
    name = meta["method"]
    if name not in M.METHODS:
        raise ZsadError(f"checkpoint {where} is for method '{name}', which this zsad does not know")
    try:
        cfg = build_config(M.METHODS[name].config_class, deep_merge(meta["config"], overrides or {}),
                           where=f"checkpoint {where}")
        method = M.build(name, cfg, meta["profile"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # a hand-edited or garbled config
        raise ZsadError(f"checkpoint {where}: its config does not build a {name} ({type(err).__name__}: "
                        f"{str(err)[:200]})") from err
    if "weights_sha256" in meta and sha256_file(weights) != meta["weights_sha256"]:
        raise ZsadError(f"{weights} is not the weights file {SIDECAR_NAME} was written with (an interrupted or "
                        f"mixed-up save); re-save the checkpoint, or --resume the training run to rewrite it")
    try:
        state = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
        raise ZsadError(f"could not read {weights}: {str(err)[:200]}") from err
    method.load_trainable_state_dict(state)
    return method


def load_checkpoint(path: str | Path, clip_weights: str | Path | None = None, device: str | torch.device = "cpu",
                    overrides: dict | None = None):
    """Rebuild the method a zsad checkpoint was trained as and load its trainable parameters: (method, sidecar).

    ``overrides`` as :func:`build_from_sidecar`; ``clip_weights`` a local CLIP file in place of the config's. For any
    source (an authors' released file too) and for untrained methods, use ``zsad.load.load``."""
    from zsad.configs import deep_merge

    weights, _ = checkpoint_paths(path)
    meta = read_sidecar(path)
    method = build_from_sidecar(weights, meta, deep_merge(overrides or {}, clip_override(clip_weights)), str(path))
    return method.to(device).eval(), meta
