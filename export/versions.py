"""Model versions in a repository zsad-export wrote: ``zsad-export --version N`` adds them, ``zsad-deploy`` switches.

Layout of an export NAME with versions (Triton's numbered version folders):

    NAME_<model>/1/, NAME_<model>/2/, ...   every model but the two ensembles has one folder per version; its
                                            config.pbtxt lists the versions to load (``version_policy: specific``)
    NAME/, NAME_raw/                        the ensembles, one version (1/); every step names its model's version
                                            (``model_version: N``), so a request runs version N's models only,
                                            even while two versions are loaded side by side
    NAME/versions.json                      {"active": N, "previous": M or null}: what the configs pin
    NAME/reference_vN.npz                   version N's check: the parity gate's images as a client sends them
                                            (uint8 [n,H,W,3]), their class names for methods that take one, and
                                            the eager answers (score [n], anomaly_map [n,S,S]) and, for a
                                            low-precision export, the rule to compare with them (the precision
                                            gate's); read without pickle

The configs on disk always say what a (re)started server loads: the active version. ``zsad-deploy`` changes them
(both versions during a switch, then the new one) and has the running server load them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from zsad import ZsadError

VERSIONS_FILE = "versions.json"
MARKER_NAME = ".zsad-export.json"  # zsad.export.exporter writes it into every model folder of an export


def reference_path(repo: Path, name: str, version: int) -> Path:
    return Path(repo) / name / f"reference_v{version}.npz"


def save_reference(path: Path, images: np.ndarray, score: np.ndarray, anomaly_map: np.ndarray,
                   class_names: list[str] | None, check: dict | None = None) -> None:
    """``check``: how zsad-deploy compares the served answers with these (zsad.serve.deploy.compare_with_reference;
    kept as a JSON string); None: within the fp32 relative tolerance."""
    arrays: dict[str, np.ndarray] = {"images": images.astype(np.uint8), "score": score.astype(np.float32).reshape(-1),
              "anomaly_map": anomaly_map.astype(np.float32)}
    if class_names is not None:
        arrays["class_names"] = np.array(class_names, dtype=str)  # fixed-width unicode, no object pickling
    if check is not None:
        arrays["check"] = np.array(json.dumps(check))
    np.savez(path, **arrays)


def load_reference(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ZsadError(f"{path} is missing: this version has no exported answers to check it against (re-export "
                        f"it with a zsad-export that writes them)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_config(path: Path):
    """A config.pbtxt as Triton's ModelConfig message."""
    from zsad.export.triton_repo import validate_config

    return validate_config(path.read_text())


def write_config(path: Path, cfg) -> None:
    """Replace ``path`` atomically (a server loading meanwhile reads the old or the new file, never half)."""
    from google.protobuf import text_format

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text_format.MessageToString(cfg))
    os.replace(tmp, path)


def export_models(repo: Path, name: str) -> dict[str, bool]:
    """{model folder: is an ensemble} of the export NAME: the folders whose marker says zsad-export wrote them for
    NAME. Refuses a NAME that zsad-export did not write."""
    repo = Path(repo)
    if not (repo / name / MARKER_NAME).is_file():
        raise ZsadError(f"{repo / name} is not a model zsad-export wrote (no {MARKER_NAME}): nothing to version")
    out = {}
    for marker in sorted(repo.glob(f"*/{MARKER_NAME}")):
        try:
            export = json.loads(marker.read_text()).get("export")
        except (OSError, ValueError):
            continue
        if export == name:
            out[marker.parent.name] = read_config(marker.parent / "config.pbtxt").platform == "ensemble"
    return out


def versions_state(repo: Path, name: str) -> dict:
    """{"active": N, "previous": M or None}; an export never versioned is at version 1."""
    path = Path(repo) / name / VERSIONS_FILE
    if not path.is_file():
        return {"active": 1, "previous": None}
    state = json.loads(path.read_text())
    if not isinstance(state.get("active"), int):
        raise ZsadError(f"{path} is damaged: {state}")
    return state


def write_versions_state(repo: Path, name: str, active: int, previous: int | None) -> None:
    path = Path(repo) / name / VERSIONS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"active": active, "previous": previous}, indent=2) + "\n")
    os.replace(tmp, path)


def set_versions(repo: Path, model: str, versions: list[int]) -> None:
    """The versions a (non-ensemble) model's config loads."""
    path = Path(repo) / model / "config.pbtxt"
    cfg = read_config(path)
    cfg.version_policy.specific.versions[:] = sorted(set(versions))
    write_config(path, cfg)


def pin_ensemble(repo: Path, ensemble: str, version: int) -> None:
    """Every step of an ensemble calls ``version`` of its model."""
    path = Path(repo) / ensemble / "config.pbtxt"
    cfg = read_config(path)
    for step in cfg.ensemble_scheduling.step:
        step.model_version = version
    write_config(path, cfg)


def unversioned(cfg):
    """A config without what differs between versions (the version policy, the ensemble steps' versions)."""
    out = type(cfg)()
    out.CopyFrom(cfg)
    out.ClearField("version_policy")
    for step in out.ensemble_scheduling.step:
        step.model_version = -1
    return out


def check_same_layout(repo: Path, staging: Path, name: str, models: list[str]) -> None:
    """A new version must fit the export it joins: the same models with the same configs (tensors, batching,
    parameters), versions aside. Else it is another model, to export under another --name."""
    existing = export_models(repo, name)
    if sorted(existing) != sorted(models):
        raise ZsadError(f"--version: {repo / name} holds the models {sorted(existing)}, this export writes "
                        f"{sorted(models)}: a different method or layout; export it under another --name")
    for m in models:
        old, new = (unversioned(read_config(d / m / "config.pbtxt")) for d in (Path(repo), staging))
        if old != new:
            raise ZsadError(f"--version: the config of {m} differs from the one in {repo} (method, profile, image "
                            f"size, batching or backend changed?): a new version must keep the served layout; "
                            f"export it under another --name")


def pin_active(repo: Path, name: str, models: dict[str, bool]) -> int:
    """Make the configs of a so far unversioned export say explicitly which version they load (the active one),
    so that adding a version folder changes nothing served; returns the active version."""
    state = versions_state(repo, name)
    for m, ensemble in models.items():
        cfg = read_config(Path(repo) / m / "config.pbtxt")
        if ensemble and any(s.model_version == -1 for s in cfg.ensemble_scheduling.step):
            pin_ensemble(repo, m, state["active"])
        elif not ensemble and not cfg.version_policy.specific.versions:
            set_versions(repo, m, [state["active"]])
    if not (Path(repo) / name / VERSIONS_FILE).is_file():
        write_versions_state(repo, name, state["active"], state["previous"])
    return state["active"]
