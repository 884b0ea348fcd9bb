"""Readers for the public zero-shot AD benchmarks, laid out exactly as downloaded.

Supported layouts (``detect_layout`` names):

* ``mvtec`` -- MVTec AD and MPDD: ``<class>/{train,test}/<good|defect>/*`` with masks in
  ``<class>/ground_truth/<defect>/<stem>_mask.png``.
* ``visa``  -- VisA: ``split_csv/1cls.csv`` (``object,split,label,image,mask``, paths relative to the root).
* ``btad``  -- BTAD (BTech_Dataset_transformed): ``<01|02|03>/{train,test}/{ok,ko}/*`` with masks in
  ``<class>/ground_truth/ko/`` matched by file stem (mask extensions differ from image extensions as shipped).
* ``meta``  -- AnomalyCLIP's ``meta.json`` (``{"train"|"test": {cls: [items]}}``), paths relative to the root.

Every problem with the data raises :class:`zsad.ZsadError` with the offending path in the message, because
a wrong path is by far the most common mistake when pointing a tool at a data set.
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsad import ZsadError
from zsad.data.io import is_image_file

__all__ = [
    "LAYOUTS",
    "Sample",
    "detect_layout",
    "guess_dataset_name",
    "list_classes",
    "load_samples",
]

LAYOUTS = ("mvtec", "visa", "btad", "meta")
_LAYOUT_ALIASES = {"mpdd": "mvtec", "mvtec_ad": "mvtec", "anomalyclip": "meta", "json": "meta"}
SPLITS = ("train", "test")
_VISA_CSV = Path("split_csv") / "1cls.csv"
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")

# Class names of the public sets, used to name an MVTec-layout folder whose own name says nothing.
_MVTEC_CLASSES = frozenset(
    ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
     "toothbrush", "transistor", "wood", "zipper"]
)
_MPDD_CLASSES = frozenset(["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"])


@dataclass(frozen=True)
class Sample:
    """One image of a data set. ``mask`` is None for normal images; ``defect`` is "good" for normal ones."""

    image: Path
    mask: Path | None
    label: int  # 0 normal, 1 anomalous
    cls: str
    defect: str


# ----------------------------------------------------------------------------------------------- layout


def _check_root(root) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise ZsadError(f"data set root does not exist: {root}")
    if not root.is_dir():
        raise ZsadError(f"data set root is not a directory: {root}")
    return root


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_dirs(root: Path) -> list[Path]:
    """Sub-folders of root that look like a class of a folder layout (they have train/ or test/)."""
    return [d for d in _subdirs(root) if (d / "train").is_dir() or (d / "test").is_dir()]


def _is_btad_class(d: Path) -> bool:
    return any((d / split / name).is_dir() for split in SPLITS for name in ("ok", "ko"))


def _normalise_layout(layout: str) -> str:
    key = str(layout).strip().lower()
    key = _LAYOUT_ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise ZsadError(f"unknown layout {layout!r}; supported layouts: {', '.join(LAYOUTS)} (mpdd = mvtec)")
    return key


def detect_layout(root) -> str:
    """Return "meta", "visa", "btad" or "mvtec" for a data set root; ZsadError if none fits."""
    root = _check_root(root)
    if (root / "meta.json").is_file():
        return "meta"
    if (root / _VISA_CSV).is_file():
        return "visa"
    classes = _class_dirs(root)
    if classes:
        return "btad" if any(_is_btad_class(d) for d in classes) else "mvtec"
    hint = ""
    if (root / "train").is_dir() or (root / "test").is_dir():
        hint = " This looks like a single class folder; pass the folder that contains the class folders."
    raise ZsadError(
        f"cannot tell the data set layout of {root}: looked for {root / 'meta.json'} (meta), "
        f"{root / _VISA_CSV} (visa) and <class>/train|test/ sub-folders (mvtec/MPDD: good/<defect>, "
        f"btad: ok/ko). Supported layouts: {', '.join(LAYOUTS)}.{hint}"
    )


def _resolve_layout(root: Path, layout: str | None) -> str:
    return detect_layout(root) if layout is None else _normalise_layout(layout)


# ----------------------------------------------------------------------------------------- folder layouts


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def _mask_index(folder: Path) -> dict[str, Path]:
    """stem (lower-case) -> mask file, for a ground-truth folder; sorted so duplicates resolve the same way."""
    index: dict[str, Path] = {}
    if folder.is_dir():
        for p in _images_in(folder):
            index.setdefault(p.stem.lower(), p)
    return index


def _folder_classes(root: Path, layout: str) -> list[str]:
    dirs = _class_dirs(root)
    if not dirs:
        raise ZsadError(f"no class folders (with train/ or test/) in {root} for layout {layout!r}")
    return [d.name for d in dirs]


def _load_folder_layout(root: Path, split: str, layout: str, classes: list[str]) -> list[Sample]:
    normal_names = {"good"} if layout == "mvtec" else {"ok", "good"}
    samples: list[Sample] = []
    for cls in classes:
        split_dir = root / cls / split
        found = 0
        if split_dir.is_dir():
            for defect_dir in _subdirs(split_dir):
                images = _images_in(defect_dir)
                found += len(images)
                if defect_dir.name in normal_names:
                    samples += [Sample(p, None, 0, cls, "good") for p in images]
                    continue
                gt_dir = root / cls / "ground_truth" / defect_dir.name
                masks = _mask_index(gt_dir)
                for p in images:
                    stem = p.stem.lower()
                    # MVTec/MPDD name masks <stem>_mask.png; BTAD keeps the image stem (any extension).
                    mask = masks.get(stem + "_mask") or masks.get(stem)
                    if mask is None:
                        expected = gt_dir / (p.stem + ("_mask.png" if layout == "mvtec" else ".png"))
                        raise ZsadError(
                            f"anomalous image {p} has no ground-truth mask: expected {expected}"
                            + (" (any image extension)" if layout == "btad" else "")
                        )
                    samples.append(Sample(p, mask, 1, cls, defect_dir.name))
        if found == 0:
            raise ZsadError(f"class {cls!r} has no {split} images: nothing found under {split_dir}")
    return samples


# -------------------------------------------------------------------------------------------------- VisA


def _read_visa_rows(root: Path) -> list[dict]:
    path = root / _VISA_CSV
    if not path.is_file():
        raise ZsadError(f"VisA split file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in _VISA_COLUMNS if c not in header]
        if missing:
            raise ZsadError(f"{path} lacks column(s) {', '.join(missing)}; expected header {','.join(_VISA_COLUMNS)}")
        rows = []
        for raw in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            if any(row.values()):
                rows.append(row)
    return rows


def _load_visa(root: Path, split: str, classes: list[str], rows: list[dict]) -> list[Sample]:
    csv_path = root / _VISA_CSV
    wanted = set(classes)
    samples: list[Sample] = []
    for row in rows:
        cls = row["object"]
        if row["split"].lower() != split or cls not in wanted:
            continue
        label_s = row["label"].lower()
        if label_s not in ("normal", "anomaly"):
            raise ZsadError(f"{csv_path}: label must be 'normal' or 'anomaly', got {row['label']!r} for {row['image']}")
        samples.append(_listed_sample(root, csv_path, row["image"], row["mask"], label_s == "anomaly", cls, "anomaly"))
    return samples


# -------------------------------------------------------------------------------------------------- meta


def _read_meta(root: Path) -> dict:
    path = root / "meta.json"
    if not path.is_file():
        raise ZsadError(f"meta.json not found: {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ZsadError(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict) or not any(isinstance(meta.get(s), dict) for s in SPLITS):
        raise ZsadError(
            f'{path} is not an AnomalyCLIP meta file: expected {{"train": {{cls: [...]}}, "test": {{...}}}}'
        )
    return meta


def _load_meta(root: Path, split: str, classes: list[str], meta: dict) -> list[Sample]:
    path = root / "meta.json"
    by_cls = meta.get(split) or {}
    samples: list[Sample] = []
    for cls in classes:
        for item in by_cls.get(cls) or []:
            if not isinstance(item, dict) or "img_path" not in item:
                raise ZsadError(f"{path}: every item needs an img_path, got {item!r} under {split}/{cls}")
            anomalous = int(item.get("anomaly", 0)) == 1
            defect = str(item.get("specie_name") or "anomaly")
            samples.append(
                _listed_sample(
                    # The dict key is the class (cls_name repeats it), so class filtering and counts agree.
                    root, path, item["img_path"], item.get("mask_path") or "", anomalous, cls, defect,
                )
            )
    return samples


def _listed_sample(
    root: Path, listing: Path, image_rel: str, mask_rel: str, anomalous: bool, cls: str, defect: str
) -> Sample:
    """A Sample from a csv/json row, checking the listed files exist."""
    image = root / image_rel
    if not image_rel or not image.is_file():
        raise ZsadError(f"image listed in {listing} does not exist: {image}")
    if not anomalous:
        return Sample(image, None, 0, cls, "good")
    if not mask_rel:
        raise ZsadError(f"anomalous image {image} has no mask path in {listing}")
    mask = root / mask_rel
    if not mask.is_file():
        raise ZsadError(f"mask of anomalous image {image} does not exist: expected {mask} (listed in {listing})")
    return Sample(image, mask, 1, cls, defect)


# ------------------------------------------------------------------------------------------------ public


def _classes_for(root: Path, layout: str, source=None) -> list[str]:
    if layout in ("mvtec", "btad"):
        return _folder_classes(root, layout)
    if layout == "visa":
        rows = source if source is not None else _read_visa_rows(root)
        return sorted({r["object"] for r in rows if r["object"]})
    meta = source if source is not None else _read_meta(root)
    names: set[str] = set()
    for split in SPLITS:
        names.update((meta.get(split) or {}).keys())
    return sorted(names)


def list_classes(root, layout: str | None = None) -> list[str]:
    """Sorted class names of a data set root."""
    root = _check_root(root)
    return _classes_for(root, _resolve_layout(root, layout))


def load_samples(root, split: str = "test", layout: str | None = None, classes: Iterable[str] | str | None = None
                 ) -> list[Sample]:
    """All samples of ``split`` ("train" or "test"), sorted by (class, image path).

    ``layout`` None auto-detects (meta.json wins when present). ``classes`` restricts to those classes; an
    unknown class, a class without images for the split, a missing mask of an anomalous image or a listed file
    that does not exist raise :class:`ZsadError`.
    """
    root = _check_root(root)
    split = str(split).lower()
    if split not in SPLITS:
        raise ZsadError(f"split must be one of {', '.join(SPLITS)}, got {split!r} (data set {root})")
    layout = _resolve_layout(root, layout)

    source: Any = None  # the parsed index: the visa rows (list) or meta.json (dict), by layout
    if layout == "visa":
        source = _read_visa_rows(root)
    elif layout == "meta":
        source = _read_meta(root)
    available = _classes_for(root, layout, source)

    if classes is None:
        selected = available
        if layout == "visa":
            selected = sorted({r["object"] for r in source if r["split"].lower() == split and r["object"]})
        elif layout == "meta":
            selected = sorted((source.get(split) or {}).keys())
    else:
        selected = [classes] if isinstance(classes, str) else list(dict.fromkeys(classes))
        unknown = [c for c in selected if c not in available]
        if unknown:
            raise ZsadError(
                f"unknown class(es) {', '.join(map(repr, unknown))} in {root}; available: {', '.join(available)}"
            )

    if layout in ("mvtec", "btad"):
        samples = _load_folder_layout(root, split, layout, selected)
    else:
        samples = _load_visa(root, split, selected, source) if layout == "visa" else _load_meta(
            root, split, selected, source)
        counts = {c: 0 for c in selected}
        for s in samples:
            counts[s.cls] = counts.get(s.cls, 0) + 1
        empty = [c for c in selected if counts.get(c, 0) == 0]
        if empty:
            listing = root / (_VISA_CSV if layout == "visa" else Path("meta.json"))
            raise ZsadError(f"class(es) {', '.join(map(repr, empty))} have no {split} images in {listing}")
    samples.sort(key=lambda s: (s.cls, str(s.image)))
    return samples


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _name_from_folder(name: str) -> str | None:
    n = _norm_name(name)
    if "mpdd" in n:
        return "MPDD"
    if "mvtec" in n:
        return "MVTec AD"
    if "visa" in n:
        return "VisA"
    if "btad" in n or "btech" in n:
        return "BTAD"
    return None


def data_source(data, classes: str | None, default_classes: Sequence[str], dataset_name: str | None = None,
                progress: bool = True) -> tuple[Path, str | None, list[str] | None]:
    """(root, data-set name, classes) of a command's ``--data`` / ``--classes`` (comma-separated or None): ``data``
    (named ``dataset_name`` or by its layout), or without it the synthetic set, generated if missing, named
    "synthetic" and limited to ``default_classes`` unless ``classes`` names others."""
    from zsad.data.synthetic import default_root, generate

    class_list = [c for c in classes.split(",") if c] if classes else None
    if data is None:
        return generate(default_root(), progress=progress), "synthetic", class_list or list(default_classes)
    root = Path(data)
    return root, dataset_name or guess_dataset_name(root), class_list


def guess_dataset_name(root) -> str | None:
    """"MVTec AD", "VisA", "MPDD" or "BTAD" from the layout and folder name (or class names), else None."""
    try:
        root = _check_root(root)
        layout = detect_layout(root)
    except ZsadError:
        return None
    by_folder = _name_from_folder(root.resolve().name)
    if layout == "visa":
        return "VisA"
    if layout == "btad":
        return "BTAD"
    if layout == "meta":
        return by_folder
    # mvtec layout: MVTec AD or MPDD.
    if by_folder in ("MVTec AD", "MPDD"):
        return by_folder
    if by_folder is not None:
        return None  # named like another data set but laid out like MVTec: do not guess
    names = {d.name for d in _class_dirs(root)}
    if names and names <= _MPDD_CLASSES:
        return "MPDD"
    if names and names <= _MVTEC_CLASSES:
        return "MVTec AD"
    return None
