"""The offline synthetic-defect data set: determinism, exact masks, MVTec layout, manifest short-circuit."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad import ZsadError
from zsad.data import detect_layout, guess_dataset_name, load_samples, read_image, read_mask
from zsad.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_DEFECTS,
    SYNTHETIC_TEST_CLASSES,
    SYNTHETIC_TRAIN_CLASSES,
    generate,
    render_sample,
    sample_pngs,
)

SMALL = dict(image_size=64, n_train_good=1, n_test_good=2, n_test_defect=5, progress=False)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "set", seed=0, **SMALL)


def test_class_lists_are_disjoint_and_complete():
    assert set(SYNTHETIC_TRAIN_CLASSES).isdisjoint(SYNTHETIC_TEST_CLASSES)
    assert set(SYNTHETIC_TRAIN_CLASSES) | set(SYNTHETIC_TEST_CLASSES) == set(SYNTHETIC_CLASSES)
    assert 6 <= len(SYNTHETIC_CLASSES) <= 8
    assert set(SYNTHETIC_DEFECTS) == set(SYNTHETIC_CLASSES)
    # Both sides hold textures and objects, as in cross-data-set zero-shot training.
    for side in (SYNTHETIC_TRAIN_CLASSES, SYNTHETIC_TEST_CLASSES):
        assert any("missing" in SYNTHETIC_DEFECTS[c] for c in side)
        assert any("missing" not in SYNTHETIC_DEFECTS[c] for c in side)


def test_layout_and_read_back(small_set):
    root = small_set
    assert detect_layout(root) == "mvtec"
    assert guess_dataset_name(root) is None
    test = load_samples(root, "test")
    assert len(test) == len(SYNTHETIC_CLASSES) * (2 + 5)
    assert len(load_samples(root, "train")) == len(SYNTHETIC_CLASSES)
    assert len(load_samples(root, "test", classes=SYNTHETIC_TRAIN_CLASSES)) == 4 * 7
    for s in test:
        img = read_image(s.image)
        assert img.size == (64, 64)
        if s.label == 0:
            assert s.defect == "good" and s.mask is None
        else:
            assert s.defect in SYNTHETIC_DEFECTS[s.cls]
            m = read_mask(s.mask)
            assert m.shape == (64, 64) and m.any()
    # Round-robin defect types: 5 defect images cover every type of a 5-type class.
    nut = {s.defect for s in test if s.cls == "nut" and s.label}
    assert nut == set(SYNTHETIC_DEFECTS["nut"])
    assert not any((root / c / "ground_truth" / "good").exists() for c in SYNTHETIC_CLASSES)

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["image_size"] == 64 and manifest["classes"] == list(SYNTHETIC_CLASSES)
    assert manifest["train_classes"] == list(SYNTHETIC_TRAIN_CLASSES)
    assert manifest["n_images"] == len(SYNTHETIC_CLASSES) * 8
    assert sum(manifest["counts"]["nut"]["test_defect"].values()) == 5
    with Image.open(root / "preview.png") as preview:
        assert preview.size[0] >= 64 * 2 and preview.size[1] == 64 * len(SYNTHETIC_CLASSES)


def test_files_match_render_and_masks_are_exact(small_set):
    """Written files are the rendered ones, and the mask is exactly where the defect changed the clean twin."""
    for cls in SYNTHETIC_CLASSES:
        for i in range(5):
            s = render_sample(cls, "test_defect", i, seed=0, image_size=64)
            path = small_set / cls / "test" / s.defect / f"{s.stem}.png"
            mask_path = small_set / cls / "ground_truth" / s.defect / f"{s.stem}_mask.png"
            np.testing.assert_array_equal(np.asarray(Image.open(path)), s.image)
            np.testing.assert_array_equal(read_mask(mask_path), s.mask)
            changed = (s.image != s.clean).any(axis=-1)
            np.testing.assert_array_equal(changed, s.mask)
            assert s.mask.mean() >= 0.002
            # Visible: every mask pixel changed by >= 10 grey levels and the defect core by a lot more.
            delta = np.abs(s.image.astype(int) - s.clean.astype(int)).max(axis=-1)
            assert delta[s.mask].min() >= 10 and np.percentile(delta[s.mask], 90) >= 40
        good = render_sample(cls, "test_good", 0, seed=0, image_size=64)
        assert good.mask is None and good.defect == "good"
        np.testing.assert_array_equal(np.asarray(Image.open(small_set / cls / "test" / "good" / "000.png")), good.image)


def test_defect_sizes_in_range():
    fractions = [render_sample(c, "test_defect", i, seed=3, image_size=128).mask.mean()
                 for c in SYNTHETIC_CLASSES for i in range(6)]
    assert min(fractions) >= 0.002 and max(fractions) <= 0.09
    assert max(fractions) / min(fractions) > 5  # varied, not one size


def test_normal_images_vary_and_classes_are_independent():
    a = render_sample("washer", "train_good", 0, seed=0, image_size=64).image
    b = render_sample("washer", "train_good", 1, seed=0, image_size=64).image
    assert not np.array_equal(a, b)
    # A class renders the same whether or not other classes are generated alongside it.
    np.testing.assert_array_equal(a, render_sample("washer", "train_good", 0, seed=0, image_size=64).image)


def test_same_seed_identical_different_seed_differs(tmp_path, small_set):
    params = dict(SMALL, classes=["brick", "nut"])
    a = _hashes(generate(tmp_path / "a", seed=0, **params))
    b = _hashes(generate(tmp_path / "b", seed=0, **params))
    c = _hashes(generate(tmp_path / "c", seed=1, **params))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png") and k != "preview.png"]
    assert all(a[k] != c[k] for k in images if "/train/" in k or "/test/" in k)
    # Classes are independent: the full set has the same brick/nut bytes as the two-class set.
    full = _hashes(small_set)
    assert all(full[k] == v for k, v in a.items() if k.startswith(("brick/", "nut/")))


def test_manifest_short_circuit_and_regeneration(tmp_path):
    params = dict(SMALL, classes=["grass", "capsule"])
    root = generate(tmp_path / "s", seed=0, **params)
    files = [p for p in root.rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert generate(root, seed=0, **params) == root
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # A deleted file is noticed and the set is rewritten.
    victim = root / "capsule" / "test" / "good" / "001.png"
    victim.unlink()
    generate(root, seed=0, **params)
    assert victim.is_file()

    # An interrupted run (manifest not marked complete) is redone, not refused.
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    stale = root / "grass" / "test" / "crack" / "999.png"
    stale.write_bytes(b"half-written")
    generate(root, seed=0, **params)
    assert not stale.exists() and json.loads((root / "manifest.json").read_text())["complete"] is True

    # Different parameters: regenerated, and stale files of the old run are gone.
    generate(root, seed=0, **dict(params, n_test_defect=2))
    assert len(load_samples(root, "test", classes=["capsule"])) == 2 + 2
    assert json.loads((root / "manifest.json").read_text())["n_test_defect"] == 2


def test_refuses_foreign_folders_and_bad_arguments(tmp_path):
    root = tmp_path / "mine"
    (root / "brick").mkdir(parents=True)
    (root / "brick" / "keep.txt").write_text("user data")
    with pytest.raises(ZsadError) as err:
        generate(root, classes=["brick"], **dict(SMALL))
    assert str(root / "brick") in str(err.value)
    assert (root / "brick" / "keep.txt").is_file()
    with pytest.raises(ZsadError) as err:
        generate(tmp_path / "x", classes=["toaster"], progress=False)
    assert "toaster" in str(err.value)
    with pytest.raises(ZsadError):
        generate(tmp_path / "x", image_size=8, progress=False)


def test_cli(tmp_path):
    from click.testing import CliRunner

    from zsad.data.synthetic import _cli

    out = tmp_path / "cli"
    res = CliRunner().invoke(_cli(), [str(out), "--size", "48", "--n-train-good", "1", "--n-test-good", "1",
                                      "--n-test-defect", "2", "--classes", "gravel,plate", "--quiet"])
    assert res.exit_code == 0, res.output
    assert len(load_samples(out, "test")) == 2 * 3
    res = CliRunner().invoke(_cli(), [str(tmp_path / "y"), "--classes", "toaster", "--quiet"])
    assert res.exit_code != 0 and "toaster" in res.output


def test_sample_pngs_decode_to_the_rendered_images():
    """PNG bytes for clients: image i is defect image i of test class i % 4; with_good makes every third good."""
    for with_good in (False, True):
        pngs = sample_pngs(5, image_size=48, seed=1, with_good=with_good)
        assert len(pngs) == 5
        for i, data in enumerate(pngs):
            assert data.startswith(b"\x89PNG")
            decoded = np.asarray(Image.open(io.BytesIO(data)))
            part = "test_good" if with_good and i == 2 else "test_defect"
            expected = render_sample(SYNTHETIC_TEST_CLASSES[i % 4], part, i, seed=1, image_size=48).image
            np.testing.assert_array_equal(decoded, expected)
    assert sample_pngs(2, image_size=48, classes=["nut"]) != sample_pngs(2, image_size=48)
