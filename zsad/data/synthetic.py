"""Synthetic-defect data set: the offline default data set of the toolkit, written to disk.

No benchmark can be downloaded in CI or on an air-gapped box, so demos and tests train and evaluate on images
rendered by :mod:`zsad.data.synthetic_render` (textures and parts with procedural defects whose masks are exact).

The set is written in MVTec layout (``<class>/train/good``, ``<class>/test/<defect>``,
``<class>/ground_truth/<defect>/<stem>_mask.png``) so :func:`zsad.data.readers.load_samples` reads it like
MVTec AD. Train and test classes are disjoint, as in zero-shot cross-data-set training; a ZSAD model is trained
on the *test split* (which has masks) of :data:`SYNTHETIC_TRAIN_CLASSES`. A manifest records what was written, so
a second call with the same parameters returns at once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from zsad import ZsadError
from zsad.data.synthetic_render import (
    GENERATOR_VERSION,
    PARTS,
    SYNTHETIC_CLASSES,
    SYNTHETIC_DEFECTS,
    SYNTHETIC_TEST_CLASSES,
    SYNTHETIC_TRAIN_CLASSES,
    SyntheticImage,
    check_class,
    held_out_samples,
    render_sample,
    sample_pngs,
)

__all__ = [
    "GENERATOR_VERSION",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DEFECTS",
    "SYNTHETIC_TEST_CLASSES",
    "SYNTHETIC_TRAIN_CLASSES",
    "SyntheticImage",
    "default_root",
    "generate",
    "held_out_samples",
    "render_sample",
    "sample_pngs",
]

def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # compress_level 1: several times faster than the default and still deterministic.
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _expected_files(classes, n_train_good, n_test_good, n_test_defect) -> list[str]:
    files = []
    for cls in classes:
        files += [f"{cls}/train/good/{i:03d}.png" for i in range(n_train_good)]
        files += [f"{cls}/test/good/{i:03d}.png" for i in range(n_test_good)]
        kinds = SYNTHETIC_DEFECTS[cls]
        for i in range(n_test_defect):
            kind, stem = kinds[i % len(kinds)], f"{i // len(kinds):03d}"
            files += [f"{cls}/test/{kind}/{stem}.png", f"{cls}/ground_truth/{kind}/{stem}_mask.png"]
    return files


def _read_manifest(root: Path) -> dict | None:
    try:
        data = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == "zsad.data.synthetic" else None


def _write_manifest(root: Path, data: dict) -> None:
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(root / "manifest.json")  # atomic: readers never see half a manifest


def _outline(mask: np.ndarray) -> np.ndarray:
    # Drawn just outside the region so the defect itself stays visible under it.
    return ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_dilation(mask, iterations=1)


def _preview(root: Path, tiles: dict[str, list[tuple[np.ndarray, np.ndarray | None, str]]], thumb: int) -> None:
    """Contact sheet: one row per class, a good image then defect images with the mask outline in red."""
    cols = max((len(v) for v in tiles.values()), default=1)
    sheet = Image.new("RGB", (cols * thumb, max(len(tiles), 1) * thumb), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for row, (cls, items) in enumerate(tiles.items()):
        for col, (img, mask, label) in enumerate(items):
            t = np.asarray(Image.fromarray(img).resize((thumb, thumb), Image.Resampling.BILINEAR)).copy()
            if mask is not None:
                m = np.asarray(Image.fromarray(mask).resize((thumb, thumb), Image.Resampling.NEAREST))
                t[_outline(m)] = (255, 0, 0)
            sheet.paste(Image.fromarray(t), (col * thumb, row * thumb))
            draw.rectangle([col * thumb, row * thumb, col * thumb + 6 * len(cls + label) + 10, row * thumb + 12],
                           fill=(0, 0, 0))
            draw.text((col * thumb + 2, row * thumb + 1), f"{cls}/{label}", fill=(255, 255, 0))
    sheet.save(root / "preview.png", format="PNG", compress_level=1)


def default_root(seed: int = 0) -> Path:
    """Where train/run.py and zsad-eval keep the default set: $ZSAD_CACHE (or ~/.cache/zsad)/synthetic/seed<N>."""
    return Path(os.environ.get("ZSAD_CACHE", "~/.cache/zsad")).expanduser() / "synthetic" / f"seed{seed}"


def _checked_params(classes, seed, image_size, counts: dict) -> dict:
    """The generator's parameters as written to the manifest; ZsadError for a bad one."""
    classes = list(SYNTHETIC_CLASSES if classes is None else dict.fromkeys([classes] if isinstance(classes, str)
                                                                           else classes))
    for cls in classes:
        check_class(cls)
    seed, image_size = int(seed), int(image_size)
    if seed < 0:
        raise ZsadError(f"seed must be >= 0, got {seed}")
    if image_size < 32:
        raise ZsadError(f"image_size must be at least 32, got {image_size}")
    counts = {k: int(v) for k, v in counts.items()}
    if min(counts.values()) < 0 or counts["n_test_good"] + counts["n_test_defect"] == 0:
        raise ZsadError(f"image counts must be >= 0 and the test split non-empty, got {counts}")
    return {"generator": "zsad.data.synthetic", "version": GENERATOR_VERSION, "seed": seed,
            "image_size": image_size, **counts, "classes": classes}


def _claim_root(root: Path, params: dict, old: dict | None) -> None:
    """Replace what an earlier (possibly interrupted) run wrote; refuse to overwrite anything else."""
    classes = params["classes"]
    ours = set(old.get("classes", [])) if old is not None else set()
    for cls in classes:
        if (root / cls).exists() and cls not in ours:
            raise ZsadError(f"{root / cls} exists and was not written by zsad.data.synthetic; "
                            f"generate into an empty folder")
    for cls in sorted(ours & set(SYNTHETIC_CLASSES)):
        shutil.rmtree(root / cls, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    # Claim the class folders before writing them, so a run interrupted half-way can be redone.
    _write_manifest(root, {**params, "classes": sorted(set(classes) | ours), "complete": False})


def _write_sample(root: Path, cls: str, part: str, i: int, seed: int, image_size: int) -> SyntheticImage | None:
    """Render and save one image (and its mask); return it when it belongs on the preview sheet."""
    s = render_sample(cls, part, i, seed, image_size)
    folder = "good" if part != "test_defect" else s.defect
    _save_png(s.image, root / cls / part.split("_")[0] / folder / f"{s.stem}.png")
    if s.mask is not None:
        _save_png(s.mask.astype(np.uint8) * 255, root / cls / "ground_truth" / s.defect / f"{s.stem}_mask.png")
    keep = part != "train_good" and i < max(len(SYNTHETIC_DEFECTS[cls]), 1)
    return s if keep else None


def _write_images(root: Path, params: dict, progress: bool) -> tuple[dict, dict, int]:
    """Write every image of the set; returns the per-class counts, the preview tiles and the number of images."""
    from tqdm import tqdm

    classes, seed, image_size = params["classes"], params["seed"], params["image_size"]
    counts = {part: params[f"n_{part}"] for part in PARTS}
    jobs = [(cls, part, i) for cls in classes for part in PARTS for i in range(counts[part])]
    tiles: dict[str, list] = {c: [] for c in classes}
    per_class = {c: {"train_good": counts["train_good"], "test_good": counts["test_good"], "test_defect": {}}
                 for c in classes}
    # Threads: PNG encoding, PIL drawing and numpy release the GIL, and each image has its own RNG, so the
    # output does not depend on scheduling.
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(jobs), desc="synthetic data", unit="img", disable=not progress) as bar:
        # mypy miscounts a star-unpacked tuple inside a lambda (the same call outside one checks clean)
        written = pool.map(lambda job: _write_sample(root, *job, seed, image_size), jobs)  # type: ignore[call-arg]
        for (cls, part, i), s in zip(jobs, written, strict=True):
            bar.update()
            if part == "test_defect":
                d = per_class[cls]["test_defect"]
                kind = SYNTHETIC_DEFECTS[cls][i % len(SYNTHETIC_DEFECTS[cls])]
                d[kind] = d.get(kind, 0) + 1
            if s is not None and (part == "test_defect" or not tiles[cls]):
                tiles[cls].append((s.image, s.mask, s.defect))
    return per_class, tiles, len(jobs)


def generate(
    root,
    seed: int = 0,
    image_size: int = 256,
    n_train_good: int = 8,
    n_test_good: int = 8,
    n_test_defect: int = 16,
    classes: Iterable[str] | None = None,
    progress: bool = True,
) -> Path:
    """Write the synthetic set under ``root`` (MVTec layout) and return ``root``.

    Writes ``manifest.json`` (parameters + counts) last; if it already matches the parameters and the files are
    there, returns at once without rewriting anything. Class folders of an older synthetic set at ``root`` are
    replaced; folders that this generator did not write are never deleted (ZsadError instead).
    """
    root = Path(root).expanduser()
    params = _checked_params(classes, seed, image_size, {"n_train_good": n_train_good, "n_test_good": n_test_good,
                                                         "n_test_defect": n_test_defect})
    classes = params["classes"]
    if root.exists() and not root.is_dir():
        raise ZsadError(f"synthetic data root exists and is not a directory: {root}")
    files = _expected_files(classes, params["n_train_good"], params["n_test_good"], params["n_test_defect"])
    old = _read_manifest(root) if root.is_dir() else None
    if old is not None and old.get("complete") is True and all(old.get(k) == v for k, v in params.items()) and all(
            (root / f).is_file() for f in files):
        return root

    _claim_root(root, params, old)
    started = time.perf_counter()
    per_class, tiles, total = _write_images(root, params, progress)
    _preview(root, tiles, thumb=min(128, params["image_size"]))
    manifest = {
        **params,
        "layout": "mvtec",
        "train_classes": [c for c in SYNTHETIC_TRAIN_CLASSES if c in classes],
        "test_classes": [c for c in SYNTHETIC_TEST_CLASSES if c in classes],
        "counts": per_class,
        "n_images": total,
        "complete": True,
    }
    # Marked complete last: an interrupted run never leaves a manifest that would short-circuit.
    _write_manifest(root, manifest)
    if progress:
        print(f"wrote {total} images to {root} in {time.perf_counter() - started:.1f} s")
    return root


def _cli():
    """The click command behind ``python -m zsad.data.synthetic`` (built lazily: click is only needed here)."""
    import click

    @click.command(help="Generate the synthetic-defect data set (MVTec layout) into OUT.")
    @click.argument("out", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--seed", default=0, show_default=True, type=int)
    @click.option("--size", "image_size", default=256, show_default=True, type=int, help="Image side in pixels.")
    @click.option("--n-train-good", default=8, show_default=True, type=int)
    @click.option("--n-test-good", default=8, show_default=True, type=int)
    @click.option("--n-test-defect", default=16, show_default=True, type=int)
    @click.option("--classes", default=None, help=f"Comma-separated subset of: {','.join(SYNTHETIC_CLASSES)}.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    def cli(out, seed, image_size, n_train_good, n_test_good, n_test_defect, classes, quiet):
        try:
            generate(out, seed=seed, image_size=image_size, n_train_good=n_train_good, n_test_good=n_test_good,
                     n_test_defect=n_test_defect,
                     classes=None if classes is None else [c.strip() for c in classes.split(",") if c.strip()],
                     progress=not quiet)
        except ZsadError as err:
            raise click.ClickException(str(err)) from None

    return cli


if __name__ == "__main__":
    _cli()()
