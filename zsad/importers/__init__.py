"""Import the authors' released checkpoints as zsad checkpoints (``zsad-import``).

``import_checkpoint(fmt, files, out)`` reads the released file(s) without running code from them and in bounded
memory (zsad.importers.torchfile), maps every tensor the released model uses at inference onto the zsad method's
trainable parameters (each shape checked against a table computed from the config before the tensor is read,
zsad.importers.shapes; reshaped where layouts differ; one module per format documents its table),
sets the backbone settings the weights were trained with, and writes ``out`` with ``zsad.checkpoint.save_checkpoint``
(safetensors + checkpoint.json). checkpoint.json's ``imported`` block records the source files and their sha256,
the format, every ``source -> zsad`` mapping with its reshape, the dropped tensors with reasons, and the settings.

``import_released(path, clip_weights)`` is the on-the-fly path ``zsad.checkpoint.load_checkpoint`` takes for a
released file given where a checkpoint is expected (``--checkpoint`` of zsad-eval / zsad-export / zsad-predict): the
format is detected, the user's ``--clip-weights`` go into the import as with zsad-import, and the result goes to a
temporary directory.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from zsad import ZsadError
from zsad.files import sha256_file
from zsad.importers.afclip import AfClipImporter
from zsad.importers.anomalyclip import AnomalyClipImporter
from zsad.importers.base import Importer, Mapping
from zsad.importers.bayespfl import BayesPflImporter
from zsad.importers.clipfile import check_clip_shapes, clip_tensors, write_clip_safetensors
from zsad.importers.detect import AFCLIP_ADAPTOR, AFCLIP_PROMPT, detect_format
from zsad.importers.shapes import clip_state_shapes, trainable_shapes
from zsad.importers.sowa import SowaImporter
from zsad.importers.torchfile import read_torch_file

IMPORTERS: dict[str, Importer] = {i.name: i for i in (AnomalyClipImporter(), AfClipImporter(), BayesPflImporter(),
                                                      SowaImporter())}
CLIP_NAME = "clip_weights.safetensors"


def import_checkpoint(fmt: str, files, out, clip_weights: str | Path | None = None, profile: str = "paper",
                      overrides: dict | None = None) -> Path:
    """Convert released ``files`` of format ``fmt`` into the zsad checkpoint directory ``out``; returns ``out``.

    No model is built: the released tensors are checked against the method's shape table (zsad.importers.shapes)
    before any is read, a ``clip_weights`` file against the CLIP table (its keys and shapes, nothing read), and a
    CLIP the file carries (SOWA) is streamed to ``clip_weights.safetensors`` one tensor at a time.
    """
    from zsad.checkpoint import config_sidecar, write_checkpoint
    from zsad.configs import deep_merge
    from zsad.methods import resolve_config

    if fmt not in IMPORTERS:
        raise ZsadError(f"unknown released format '{fmt}' (known: {', '.join(sorted(IMPORTERS))})")
    imp = IMPORTERS[fmt]
    files = [Path(f) for f in files]
    if len(files) != imp.n_files:
        raise ZsadError(f"--from {fmt} takes {imp.n_files} file(s): {imp.files_help}; got {len(files)}")
    out = Path(out)
    source = imp.read(files)
    source.notes["profile"] = profile
    settings = imp.settings(source, profile)
    config = resolve_config(imp.method, profile, **deep_merge(settings, overrides or {}))
    b = config.backbone
    clip_source = None
    if clip_weights is not None:  # the user's CLIP: its keys and shapes must fit the architecture (nothing read)
        table = clip_state_shapes(b.arch)
        check_clip_shapes(clip_tensors(clip_weights, table), table, str(clip_weights), b.arch)
    mapping = Mapping(source, trainable_shapes(imp.method, config))
    imp.convert(source, mapping)
    mapping.finish()
    if clip_weights is None and (clip := imp.clip_state(source)) is not None:
        # the released file carries the frozen CLIP itself: keep it next to the checkpoint (no download needed)
        clip_path = (out / CLIP_NAME).resolve()
        write_clip_safetensors(clip, clip_state_shapes(b.arch), clip_path, f"{files[0]} (clip_model.*)")
        clip_weights, clip_source = clip_path, f"extracted from {files[0].name} (clip_model.*)"
    profile_backbone = resolve_config(imp.method, profile).backbone
    if clip_weights:
        b.weights, b.pretrained = str(Path(clip_weights).resolve()), None
        where = str(b.weights)
    else:  # the CLIP the weights were trained on: the profile's (OpenAI's for paper), fetched when evaluated
        b.weights, b.pretrained = profile_backbone.weights, profile_backbone.pretrained
        where = f"open_clip:{b.pretrained}" if b.pretrained else (b.weights or "random")
    imported = {
        "format": fmt,
        "files": [{"path": str(f.resolve()), "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files],
        "settings": settings,
        "backbone": {"arch": b.arch, "quick_gelu": b.quick_gelu, "pos_interpolation": b.pos_interpolation,
                     "pos_align_corners": b.pos_align_corners, "pos_antialias": b.pos_antialias,
                     "image_size": b.image_size, "taps": list(config.taps), "clip_weights": where,
                     **({"clip_source": clip_source} if clip_source else {})},
        "mapping": mapping.applied,
        "dropped": mapping.dropped,
        "values_imported": int(sum(t.numel() for t in mapping.tensors.values())),
        "notes": {k: v for k, v in source.notes.items() if k != "profile"},
    }
    state = {k: v.contiguous() for k, v in mapping.tensors.items()}
    write_checkpoint(out, state, config_sidecar(imp.method, profile, config, state, clip_weights=where,
                                                imported=imported))
    return out


def _afclip_partner(path: Path) -> Path:
    """AF-CLIP's other file beside ``path``: <data>_prompt.pt <-> <data>_adaptor.pt."""
    for a, b in (("_prompt", "_adaptor"), ("_adaptor", "_prompt")):
        if path.stem.endswith(a):
            partner = path.with_name(path.stem[: -len(a)] + b + path.suffix)
            if partner.is_file():
                return partner
    raise ZsadError(f"{path} is one of AF-CLIP's two files; its partner (<data>_prompt.pt / <data>_adaptor.pt) "
                    f"is not beside it: run zsad-import --from afclip PROMPT ADAPTOR --out DIR")


_IMPORTED: dict[tuple, Path] = {}  # (file, size, mtime, clip weights) -> its temporary import


def import_released(path: str | Path, clip_weights: str | Path | None = None) -> Path:
    """Detect the format of a released file and import it into a temporary directory (said on stderr)."""
    path = Path(path).resolve()
    clip = str(Path(clip_weights).resolve()) if clip_weights else None
    key = (str(path), path.stat().st_size, path.stat().st_mtime_ns, clip)
    if key in _IMPORTED and (_IMPORTED[key] / "checkpoint.json").is_file():
        return _IMPORTED[key]
    fmt = detect_format(read_torch_file(path))
    files = [path]
    if fmt in (AFCLIP_PROMPT, AFCLIP_ADAPTOR):
        fmt, files = "afclip", [path, _afclip_partner(path)]
    if fmt not in IMPORTERS:
        raise ZsadError(f"{path} is neither a zsad checkpoint nor a released checkpoint zsad-import knows "
                        f"(detected: {fmt})")
    out = Path(tempfile.mkdtemp(prefix="zsad-import-"))
    with_clip = f" with the CLIP weights {clip}" if clip else ""
    print(f"zsad: {path} is a released {fmt} checkpoint: importing it{with_clip} into {out} (zsad-import --from "
          f"{fmt} ... --out DIR keeps it)", file=sys.stderr)
    _IMPORTED[key] = import_checkpoint(fmt, files, out, clip_weights=clip)
    return _IMPORTED[key]


__all__ = ["IMPORTERS", "import_checkpoint", "import_released", "detect_format", "read_torch_file"]
