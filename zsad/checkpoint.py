"""Checkpoints: the trainable parameters only (safetensors) + a JSON sidecar that rebuilds the method.

A checkpoint directory holds ``checkpoint.safetensors`` and ``checkpoint.json`` (method, profile, the full
resolved config, where the CLIP weights came from, versions, data, epochs). The frozen CLIP is not stored: it
is rebuilt from the config (pretrained tag, weights file, or seeded random init for tests), and
``load_checkpoint(..., clip_weights=FILE)`` points it at a local file on an offline machine.
Each file is written atomically (temp file + rename), and the sidecar records the SHA-256 of the weights file
it belongs with: a pair left mismatched by an interrupted save is refused on load instead of mislabelled. (Training
commits its resumable state, weights included, in one file first: see ``zsad.train.loop``.)
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zsad import ZsadError, __version__

FORMAT = "zsad-checkpoint/1"
WEIGHTS_NAME = "checkpoint.safetensors"
SIDECAR_NAME = "checkpoint.json"


def versions() -> dict[str, str]:
    from zsad._compat import import_open_clip

    open_clip = import_open_clip()
    return {"zsad": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path`` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


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


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def checkpoint_paths(path: str | Path, clip_weights: str | Path | None = None) -> tuple[Path, Path]:
    """Accept the directory, the .safetensors or the .json of a checkpoint; return (weights, sidecar). An authors'
    released file is imported on the fly (cached per process), with ``clip_weights`` as zsad-import takes them."""
    p = Path(path)
    if p.is_file() and p.suffix not in (".safetensors", ".json"):  # an authors' released file: import it (cached)
        from zsad.importers import import_released
        p = import_released(p, clip_weights)
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


def read_sidecar(path: str | Path, clip_weights: str | Path | None = None) -> dict:
    _, sidecar = checkpoint_paths(path, clip_weights)
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


def load_checkpoint(path: str | Path, clip_weights: str | Path | None = None, device: str | torch.device = "cpu",
                    overrides: dict | None = None):
    """Rebuild the method a checkpoint was trained as and load its trainable parameters. Returns (method, sidecar).

    ``overrides`` deep-merge into the stored config (e.g. ``{"backbone": {"image_size": 336}}`` to export at
    another resolution); the trainable parameters must still fit.
    """
    import zsad.methods as M
    from zsad.configs import build_config, deep_merge

    weights, _ = checkpoint_paths(path, clip_weights)
    meta = read_sidecar(path, clip_weights)
    name = meta["method"]
    if name not in M.METHODS:
        raise ZsadError(f"checkpoint {path} is for method '{name}', which this zsad does not know")
    config = deep_merge(meta["config"], overrides or {})
    if clip_weights:
        config = deep_merge(config, {"backbone": {"weights": str(clip_weights), "pretrained": None}})
    try:
        cfg = build_config(M.METHODS[name].config_class, config, where=f"checkpoint {path}")
        method = M.build(name, cfg, meta["profile"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # a hand-edited or garbled config
        raise ZsadError(f"checkpoint {path}: its config does not build a {name} ({type(err).__name__}: "
                        f"{str(err)[:200]})") from err
    if "weights_sha256" in meta and sha256_file(weights) != meta["weights_sha256"]:
        raise ZsadError(f"{weights} is not the weights file {SIDECAR_NAME} was written with (an interrupted or "
                        f"mixed-up save); re-save the checkpoint, or --resume the training run to rewrite it")
    try:
        state = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
        raise ZsadError(f"could not read {weights}: {str(err)[:200]}") from err
    method.load_trainable_state_dict(state)
    return method.to(device).eval(), meta
