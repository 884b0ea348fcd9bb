"""Readers, image/mask decoding, CLIP pre-processing and the torch Dataset, on tiny fake data set trees."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsad import ZsadError
from zsad.data import (
    CLIP_MEAN,
    CLIP_STD,
    Sample,
    detect_layout,
    guess_dataset_name,
    list_classes,
    load_samples,
    preprocess,
    preprocess_mask,
    read_image,
    read_mask,
)
from zsad.data.dataset import AnomalyDataset

# ------------------------------------------------------------------------------------------------ helpers


def _write(path: Path, arr, fmt: str | None = None, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(np.asarray(arr))
    if mode is not None:
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def _rgb(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def _mask_with_pixel(y: int, x: int, size: int = 8) -> np.ndarray:
    """A mask whose single defect pixel identifies which file it is."""
    m = np.zeros((size, size), dtype=np.uint8)
    m[y, x] = 255
    return m


def _make_mvtec(root: Path, classes=("bottle", "screw")) -> dict[Path, tuple[int, int]]:
    """MVTec-layout tree; returns {mask path: defect pixel} so pairing can be checked by content."""
    pixels = {}
    for ci, cls in enumerate(classes):
        _write(root / cls / "train" / "good" / "000.png", _rgb(10))
        _write(root / cls / "train" / "good" / "001.png", _rgb(11))
        _write(root / cls / "test" / "good" / "000.png", _rgb(20))
        for di, defect in enumerate(("crack", "scratch")):
            for i in range(2):
                _write(root / cls / "test" / defect / f"{i:03d}.png", _rgb(100 + 10 * di + i))
                yx = (ci * 2 + i, di + 4)
                m = _write(root / cls / "ground_truth" / defect / f"{i:03d}_mask.png", _mask_with_pixel(*yx))
                pixels[m] = yx
    (root / "readme.txt").write_text("not a class")
    (root / classes[0] / "test" / "good" / "notes.txt").write_text("not an image")
    return pixels


# ------------------------------------------------------------------------------------------------- MVTec


def test_mvtec_layout_samples_and_mask_pairing(tmp_path):
    root = tmp_path / "mvtec_anomaly_detection"
    pixels = _make_mvtec(root)
    assert detect_layout(root) == "mvtec"
    assert list_classes(root) == ["bottle", "screw"]
    assert guess_dataset_name(root) == "MVTec AD"

    test = load_samples(root, "test")
    assert len(test) == 2 * (1 + 4)
    assert test == sorted(test, key=lambda s: (s.cls, str(s.image)))
    assert load_samples(root, "test") == test  # deterministic
    good = [s for s in test if s.label == 0]
    bad = [s for s in test if s.label == 1]
    assert {s.defect for s in good} == {"good"} and all(s.mask is None for s in good)
    assert {s.defect for s in bad} == {"crack", "scratch"}
    for s in bad:
        assert s.mask == root / s.cls / "ground_truth" / s.defect / f"{s.image.stem}_mask.png"
        m = read_mask(s.mask)
        assert m.sum() == 1 and tuple(np.argwhere(m)[0]) == pixels[s.mask]
        assert s.image.parent.name == s.defect and s.image.parent.parent.parent.name == s.cls

    train = load_samples(root, split="train")
    assert len(train) == 4 and all(s.label == 0 and s.defect == "good" and s.mask is None for s in train)


def test_class_filtering(tmp_path):
    root = tmp_path / "mvtec"
    _make_mvtec(root)
    only = load_samples(root, "test", classes=["screw"])
    assert {s.cls for s in only} == {"screw"} and len(only) == 5
    assert load_samples(root, "test", classes="screw") == only
    assert load_samples(root, "test", classes=["screw", "bottle"]) == load_samples(root, "test")


@pytest.mark.parametrize("name", ["mvtec", "MVTec-AD", "mvtec_anomaly_detection", "MVTecAD"])
def test_guess_mvtec_names(tmp_path, name):
    root = tmp_path / name
    _make_mvtec(root, classes=("widget",))
    assert guess_dataset_name(root) == "MVTec AD"


def test_mpdd_named_mvtec_layout(tmp_path):
    root = tmp_path / "MPDD"
    _make_mvtec(root, classes=("bracket_black", "tubes"))
    assert detect_layout(root) == "mvtec"
    assert guess_dataset_name(root) == "MPDD"
    assert len(load_samples(root, "test", layout="mpdd")) == 10
    named = tmp_path / "mpdd"
    _make_mvtec(named, classes=("widget",))
    assert guess_dataset_name(named) == "MPDD"
    # Unnamed folders are recognised by their class names; unknown ones are not guessed.
    unnamed = tmp_path / "data1"
    _make_mvtec(unnamed, classes=("bracket_black", "tubes"))
    assert guess_dataset_name(unnamed) == "MPDD"
    mv = tmp_path / "data2"
    _make_mvtec(mv, classes=("bottle", "zipper"))
    assert guess_dataset_name(mv) == "MVTec AD"
    other = tmp_path / "data3"
    _make_mvtec(other, classes=("widget",))
    assert guess_dataset_name(other) is None
    assert guess_dataset_name(tmp_path / "missing") is None


# --------------------------------------------------------------------------------------------------- VisA


def _make_visa(root: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for cls in ("candle", "pcb1"):
        for i in range(2):
            rel = f"{cls}/Data/Images/Normal/{i:04d}.JPG"
            _write(root / rel, _rgb(30 + i), fmt="JPEG")
            rows.append(f"{cls},{'train' if i == 0 else 'test'},normal,{rel},")
        for i in range(2):
            rel = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
            _write(root / rel, _rgb(150 + i), fmt="JPEG")
            # VisA masks are small integers, not 255: "any nonzero is defect" matters here.
            m = np.zeros((8, 8), np.uint8)
            m[i, 3 if cls == "candle" else 6] = 1
            _write(root / mrel, m)
            rows.append(f"{cls},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


def test_visa_layout(tmp_path):
    root = tmp_path / "VisA_20220922"
    _make_visa(root)
    assert detect_layout(root) == "visa"
    assert guess_dataset_name(root) == "VisA"
    assert list_classes(root) == ["candle", "pcb1"]
    test = load_samples(root, "test")
    assert len(test) == 6
    assert [s.label for s in test if s.cls == "candle"] == [1, 1, 0]  # sorted by path: Anomaly < Normal
    for s in test:
        if s.label:
            assert s.defect == "anomaly" and s.mask.name == s.image.stem + ".png"
            m = read_mask(s.mask)
            assert m.sum() == 1 and np.argwhere(m)[0][0] == int(s.image.stem)
            assert np.argwhere(m)[0][1] == (3 if s.cls == "candle" else 6)
        else:
            assert s.mask is None and s.defect == "good"
    train = load_samples(root, "train", classes=["pcb1"])
    assert len(train) == 1 and train[0].image.name == "0000.JPG"


def test_visa_missing_listed_image_and_mask(tmp_path):
    root = tmp_path / "visa"
    _make_visa(root)
    img = root / "candle/Data/Images/Normal/0001.JPG"
    img.unlink()
    with pytest.raises(ZsadError) as err:
        load_samples(root, "test")
    assert str(img) in str(err.value)
    _write(img, _rgb(1), fmt="JPEG")
    mask = root / "pcb1/Data/Masks/Anomaly/001.png"
    mask.unlink()
    with pytest.raises(ZsadError) as err:
        load_samples(root, "test")
    assert str(mask) in str(err.value) and "001.JPG" in str(err.value)


# --------------------------------------------------------------------------------------------------- BTAD


def test_btad_mixed_mask_extensions(tmp_path):
    root = tmp_path / "BTech_Dataset_transformed"
    exts = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
    fmt = {".bmp": "BMP", ".png": "PNG"}
    pixels = {}
    for ci, (cls, (iext, mext)) in enumerate(exts.items()):
        _write(root / cls / "train" / "ok" / f"0000{iext}", _rgb(5))
        _write(root / cls / "test" / "ok" / f"0000{iext}", _rgb(6))
        for i in range(3):
            _write(root / cls / "test" / "ko" / f"{i:04d}{iext}", _rgb(200 + i), fmt=fmt[iext])
            m = _write(root / cls / "ground_truth" / "ko" / f"{i:04d}{mext}", _mask_with_pixel(i, ci), fmt=fmt[mext])
            pixels[m] = (i, ci)
    assert detect_layout(root) == "btad"
    assert guess_dataset_name(root) == "BTAD"
    assert list_classes(root) == ["01", "02", "03"]
    test = load_samples(root, "test")
    assert len(test) == 12
    for s in test:
        if s.label:
            assert s.defect == "ko" and s.mask.stem == s.image.stem
            assert s.mask.suffix == exts[s.cls][1] and s.image.suffix == exts[s.cls][0]
            m = read_mask(s.mask)
            assert m.sum() == 1 and tuple(np.argwhere(m)[0]) == pixels[s.mask]
        else:
            assert s.defect == "good" and s.mask is None
    assert len(load_samples(root, "train")) == 3

    missing = root / "03" / "ground_truth" / "ko" / "0002.bmp"
    missing.unlink()
    with pytest.raises(ZsadError) as err:
        load_samples(root, "test", classes=["03"])
    assert str(root / "03" / "test" / "ko" / "0002.bmp") in str(err.value)
    assert str(root / "03" / "ground_truth" / "ko" / "0002") in str(err.value)


# --------------------------------------------------------------------------------------------------- meta


def test_meta_json_wins_and_reads(tmp_path):
    root = tmp_path / "mvtec"
    pixels = _make_mvtec(root)
    meta = {"train": {}, "test": {}}
    for cls in ("bottle", "screw"):
        items = [{"img_path": f"{cls}/test/good/000.png", "mask_path": "", "cls_name": cls,
                  "specie_name": "good", "anomaly": 0}]
        items.append({"img_path": f"{cls}/test/crack/001.png", "mask_path": f"{cls}/ground_truth/crack/001_mask.png",
                      "cls_name": cls, "specie_name": "crack", "anomaly": 1})
        meta["test"][cls] = items
    meta["train"]["bottle"] = [{"img_path": "bottle/train/good/000.png", "mask_path": "", "cls_name": "bottle",
                                "specie_name": "good", "anomaly": 0}]
    (root / "meta.json").write_text(json.dumps(meta))

    assert detect_layout(root) == "meta"
    assert guess_dataset_name(root) == "MVTec AD"
    test = load_samples(root, "test")
    assert len(test) == 4
    bad = [s for s in test if s.label == 1]
    assert [(s.cls, s.defect) for s in bad] == [("bottle", "crack"), ("screw", "crack")]
    for s in bad:
        assert tuple(np.argwhere(read_mask(s.mask))[0]) == pixels[s.mask]
    assert [s.cls for s in load_samples(root, "train")] == ["bottle"]
    # The folder layout is still readable when asked for explicitly.
    assert len(load_samples(root, "test", layout="mvtec")) == 10

    meta["test"]["screw"].append({"img_path": "screw/test/crack/009.png", "mask_path": "x.png", "cls_name": "screw",
                                  "specie_name": "crack", "anomaly": 1})
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ZsadError) as err:
        load_samples(root, "test")
    assert str(root / "screw/test/crack/009.png") in str(err.value)


# ------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    for fn in (lambda: load_samples(missing), lambda: detect_layout(missing), lambda: list_classes(missing)):
        with pytest.raises(ZsadError) as err:
            fn()
        assert str(missing) in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("x")
    with pytest.raises(ZsadError) as err:
        detect_layout(empty)
    msg = str(err.value)
    assert str(empty) in msg and "meta.json" in msg and "1cls.csv" in msg
    assert all(name in msg for name in ("mvtec", "visa", "btad", "meta"))

    root = tmp_path / "mvtec"
    _make_mvtec(root)
    with pytest.raises(ZsadError) as err:
        load_samples(root, layout="kitti")
    assert "kitti" in str(err.value)
    with pytest.raises(ZsadError) as err:
        load_samples(root, "test", classes=["bottle", "toaster"])
    msg = str(err.value)
    assert "toaster" in msg and "bottle, screw" in msg and str(root) in msg

    (root / "cable" / "train" / "good").mkdir(parents=True)
    _write(root / "cable" / "train" / "good" / "000.png", _rgb(1))
    (root / "cable" / "test" / "good").mkdir(parents=True)
    with pytest.raises(ZsadError) as err:
        load_samples(root, "test")
    assert str(root / "cable" / "test") in str(err.value)
    assert len(load_samples(root, "train", classes=["cable"])) == 1

    mask = root / "screw" / "ground_truth" / "scratch" / "001_mask.png"
    mask.unlink()
    with pytest.raises(ZsadError) as err:
        load_samples(root, "test", classes=["screw"])
    assert str(root / "screw" / "test" / "scratch" / "001.png") in str(err.value)
    assert str(mask) in str(err.value)


def test_corrupt_and_non_image_files(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    text = tmp_path / "text.png"
    text.write_text("hello")
    for path in (bad, text):
        for fn in (read_image, read_mask):
            with pytest.raises(ZsadError) as err:
                fn(path)
            assert str(path) in str(err.value)
    truncated = tmp_path / "trunc.png"
    _write(truncated, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ZsadError) as err:
        read_image(truncated)
    assert str(truncated) in str(err.value)
    with pytest.raises(ZsadError) as err:
        read_image(tmp_path / "absent.png")
    assert str(tmp_path / "absent.png") in str(err.value)


# ---------------------------------------------------------------------------------------------- decoding


def test_read_image_modes(tmp_path):
    gray = _write(tmp_path / "g.png", np.array([[0, 77], [200, 255]], np.uint8))
    out = np.asarray(read_image(gray))
    assert read_image(gray).mode == "RGB" and out.shape == (2, 2, 3)
    assert (out == np.array([[0, 77], [200, 255]], np.uint8)[..., None]).all()

    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 128]]], np.uint8)
    out = np.asarray(read_image(_write(tmp_path / "a.png", rgba)))
    assert out.tolist() == [[[10, 20, 30], [200, 100, 50]]]  # alpha dropped, not composited on black

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.putpixel((0, 0), 1)
    pal.putpixel((1, 0), 2)
    assert np.asarray(read_image(_write(tmp_path / "p.png", pal))).tolist() == [[[255, 0, 0], [0, 255, 0]]]

    for suffix in (".png", ".tif"):
        sixteen = np.array([[65535, 32896, 0, 257]], np.uint16)
        path = _write(tmp_path / f"d16{suffix}", sixteen)
        assert Image.open(path).mode.startswith("I")
        out = np.asarray(read_image(path))
        assert out[..., 0].tolist() == [[255, 128, 0, 1]] and (out == out[..., :1]).all()

    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    assert np.asarray(read_image(_write(tmp_path / "c.tif", cmyk))).tolist() == [[[255, 255, 255]]]
    one = Image.fromarray(np.array([[True, False]]))
    assert np.asarray(read_image(_write(tmp_path / "b.png", one)))[..., 0].tolist() == [[255, 0]]

    bmp = _write(tmp_path / "x.BMP", _rgb(42, 3), fmt="BMP")
    assert (np.asarray(read_image(bmp)) == 42).all()


def test_read_mask_modes(tmp_path):
    expect = np.array([[False, True, True], [False, False, True]])
    gray = np.array([[0, 1, 255], [0, 0, 7]], np.uint8)
    assert (read_mask(_write(tmp_path / "l.png", gray)) == expect).all()
    assert read_mask(_write(tmp_path / "l.png", gray)).dtype == bool
    assert (read_mask(_write(tmp_path / "one.png", Image.fromarray(expect))) == expect).all()
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1, 1] = 9  # green only
    rgb[0, 2, 2] = 255
    rgb[1, 2, 0] = 1
    assert (read_mask(_write(tmp_path / "rgb.png", rgb)) == expect).all()
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 255, np.uint8)], axis=-1)  # opaque everywhere
    assert (read_mask(_write(tmp_path / "rgba.png", rgba)) == expect).all()
    alpha_only = np.zeros((2, 3, 4), np.uint8)
    alpha_only[..., 3] = expect * 255
    assert (read_mask(_write(tmp_path / "alpha.png", alpha_only)) == expect).all()
    sixteen = (expect * np.array([[0, 1, 65535], [0, 0, 300]])).astype(np.uint16)
    assert (read_mask(_write(tmp_path / "m16.png", sixteen)) == expect).all()
    pal = Image.new("P", (3, 2))
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * (256 * 3 - 6))
    for y, x in np.argwhere(expect):
        pal.putpixel((int(x), int(y)), 1)
    assert (read_mask(_write(tmp_path / "pal.png", pal)) == expect).all()


# -------------------------------------------------------------------------------------------- transforms


def test_preprocess_constant_image_matches_hand_computation():
    colour = (200, 100, 50)
    img = Image.new("RGB", (2, 2), colour)
    for size in (2, 5, 7):
        out = preprocess(img, size)
        assert out.dtype == np.float32 and out.shape == (3, size, size)
        for c in range(3):
            expected = (colour[c] / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
            np.testing.assert_allclose(out[c], np.full((size, size), expected), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(preprocess(np.asarray(img), size), out)
    gray = np.full((2, 2), 90, np.uint8)
    np.testing.assert_array_equal(preprocess(gray, 3), preprocess(Image.new("RGB", (2, 2), (90, 90, 90)), 3))
    out = preprocess(img, 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(out[:, 0, 0], [(v / 255 - 0.5) / 0.5 for v in colour], atol=1e-6)


def test_preprocess_layout_is_chw_without_resize():
    arr = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)  # [y, x, c]
    out = preprocess(arr, 2)
    for y in range(2):
        for x in range(2):
            for c in range(3):
                expected = (arr[y, x, c] / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
                assert abs(out[c, y, x] - expected) < 1e-6
    with pytest.raises(ZsadError):
        preprocess(arr.astype(np.float32), 2)
    with pytest.raises(ZsadError):
        preprocess(np.zeros((2, 2, 5), np.uint8), 2)


def test_preprocess_mask_threshold():
    half = np.array([[True, False], [True, False]])
    assert preprocess_mask(half, 1).tolist() == [[0.0]]  # bilinear mean is exactly 0.5: not > 0.5
    three = np.array([[True, True], [True, False]])
    assert preprocess_mask(three, 1).tolist() == [[1.0]]  # 0.75
    left = np.zeros((4, 4), bool)
    left[:, :2] = True
    out = preprocess_mask(left, 2)
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    single = np.zeros((3, 3), bool)
    single[0, 2] = True
    assert preprocess_mask(single, 3).tolist() == single.astype(np.float32).tolist()
    assert preprocess_mask(np.zeros((5, 5), np.uint8), 9).sum() == 0
    big = np.zeros((8, 8), bool)
    big[2:6, 2:6] = True
    up = preprocess_mask(big, 16)
    assert up.shape == (16, 16) and set(np.unique(up)) == {0.0, 1.0} and up.sum() == 64


# ------------------------------------------------------------------------------------------------ dataset


def test_anomaly_dataset_items_and_batching(tmp_path):
    root = tmp_path / "mvtec"
    _make_mvtec(root)
    samples = load_samples(root, "test")
    ds = AnomalyDataset(samples, 16)
    assert len(ds) == len(samples)
    for i, s in enumerate(samples):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
        assert item["mask"].dtype == torch.float32 and item["mask"].shape == (16, 16)
        assert item["label"].dtype == torch.int64 and int(item["label"]) == s.label
        assert item["cls"] == s.cls and item["path"] == str(s.image)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        if s.label == 0:
            assert item["mask"].sum() == 0
        else:  # one pixel of 8x8 -> a 2x2 block at 16x16
            y, x = np.argwhere(read_mask(s.mask))[0]
            assert item["mask"].sum() == 4 and item["mask"][2 * y:2 * y + 2, 2 * x:2 * x + 2].all()
        expected = preprocess(read_image(s.image), 16)
        np.testing.assert_array_equal(item["image"].numpy(), expected)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 16, 16)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert batch["cls"] == [s.cls for s in samples[:4]] and len(batch["path"]) == 4


def test_sample_is_frozen():
    s = Sample(Path("a.png"), None, 0, "c", "good")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.label = 1  # type: ignore[misc]


def test_anomaly_dataset_refuses_a_mask_of_another_size(tmp_path):
    img, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    _write(img, _rgb(7, 8))
    small = np.zeros((4, 4), np.uint8)
    small[1, 2] = 255
    _write(mask, small)
    sample = Sample(img, mask, 1, "c", "hole")
    with pytest.raises(ZsadError) as err:
        AnomalyDataset([sample], 8)[0]
    assert str(mask) in str(err.value) and "is 4x4 but its image" in str(err.value)
    # resize_masks: nearest to the 8x8 image first (pixel (1,2) -> block rows 2-3, cols 4-5), then to 8
    got = AnomalyDataset([sample], 8, resize_masks=True)[0]["mask"].numpy()
    want = np.zeros((8, 8), np.float32)
    want[2:4, 4:6] = 1
    np.testing.assert_array_equal(got, want)


def test_image_paths_expands_files_folders_and_globs(tmp_path):
    """zsad-predict / zsad-infer inputs: folders recursively and sorted, globs, files; duplicates once, in order."""
    from zsad.data.io import image_paths

    for rel in ("d/b.png", "d/a.jpg", "d/sub/c.PNG", "d/notes.txt", "e/x.bmp", "e/y.tif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    got = image_paths([tmp_path / "e" / "y.tif", tmp_path / "d", str(tmp_path / "e" / "*"), tmp_path / "d" / "a.jpg"])
    assert got == [tmp_path / "e" / "y.tif", tmp_path / "d" / "a.jpg", tmp_path / "d" / "b.png",
                   tmp_path / "d" / "sub" / "c.PNG", tmp_path / "e" / "x.bmp"]
    with pytest.raises(ZsadError, match="no such file, folder or glob match"):
        image_paths([tmp_path / "missing.png"])
