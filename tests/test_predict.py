"""zsad.Predictor and zsad-predict: local inference with exactly the served ensemble's pre- and post-processing."""
import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import png_bytes
from PIL import Image

import zsad
import zsad.methods as M
from zsad import ZsadError
from zsad.checkpoint import save_checkpoint
from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample
from zsad.predict import Predictor
from zsad.predict_cli import main

# OpenAI CLIP's published normalisation, typed in here independently of zsad.data
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _by_hand(arr: np.ndarray, size: int) -> np.ndarray:
    """The served preprocessing written out: PIL bicubic to size x size, /255, (x - mean) / std, CHW."""
    x = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC), np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def _map_back(m: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


@pytest.fixture(scope="module")
def method():
    return M.create("anomalyclip", "tiny").eval()


@pytest.fixture(scope="module")
def images():
    """Synthetic-defect images of three different sizes, one of them not square."""
    out = [render_sample(SYNTHETIC_TEST_CLASSES[i], "test_defect", i, image_size=s).image
           for i, s in enumerate((256, 200, 300))]
    out[2] = out[2][:, 40:260]  # 300 x 220
    return out


def test_predict_equals_eager_model_with_hand_preprocessing(method, images):
    size = method.image_size
    with torch.no_grad():
        ref = method(torch.from_numpy(np.stack([_by_hand(a, size) for a in images])))
    preds = Predictor(method, batch_size=2).predict(images)  # two batches: 2 + 1
    assert len(preds) == 3
    for i, (p, a) in enumerate(zip(preds, images, strict=True)):
        h, w = a.shape[:2]
        assert p.score == pytest.approx(float(ref.score[i]), rel=1e-5, abs=1e-7)
        assert p.anomaly_map.shape == (h, w) and p.anomaly_map.dtype == np.float32
        np.testing.assert_allclose(p.anomaly_map, _map_back(ref.anomaly_map[i].numpy(), h, w), rtol=1e-5,
                                   atol=1e-6 * float(ref.anomaly_map.abs().max()))


def test_paths_bytes_and_arrays_agree_and_grayscale_becomes_rgb(method, images, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(images[0]))
    gray = images[1][..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    # one image per forward pass: the same pixels then give the same bits on any CPU (in one batch, the slots of
    # identical images differed by 1e-7 on an AMD EPYC: BLAS rounds batch rows differently)
    pred = Predictor(method, batch_size=1)
    from_path, from_bytes, from_array, from_gray = pred.predict(
        [tmp_path / "a.png", png_bytes(images[0]), images[0], str(tmp_path / "g.png")])
    assert from_path.score == from_bytes.score == from_array.score
    np.testing.assert_array_equal(from_path.anomaly_map, from_bytes.anomaly_map)
    np.testing.assert_array_equal(from_path.anomaly_map, from_array.anomaly_map)
    assert from_path.source == str(tmp_path / "a.png")
    gray_rgb = pred.predict([np.repeat(gray[..., None], 3, axis=-1)])[0]
    assert from_gray.score == gray_rgb.score and from_gray.anomaly_map.shape == gray.shape
    np.testing.assert_array_equal(from_gray.anomaly_map, gray_rgb.anomaly_map)


def test_from_checkpoint_rebuilds_the_trained_method(method, images, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", method)
    a = Predictor.from_checkpoint(ckpt).predict(images[:1])[0]
    b = Predictor(method).predict(images[:1])[0]
    assert a.score == b.score
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert zsad.Predictor is Predictor  # exported from the package


def test_class_name_is_passed_and_required_where_the_method_uses_it(images):
    bayes = M.create("bayespfl", "tiny").eval()
    with torch.no_grad():
        ref = bayes(torch.from_numpy(_by_hand(images[0], bayes.image_size)[None]), class_names=["bottle"])
    pred = Predictor(bayes)
    assert pred.predict(images[:1], class_names="bottle")[0].score == pytest.approx(float(ref.score[0]), rel=1e-5)
    with pytest.raises(ZsadError, match="class name"):
        pred.predict(images[:1])
    with pytest.raises(ZsadError, match="2 class names for 1 images"):
        pred.predict(images[:1], class_names=["a", "b"])


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 4), np.uint8), r"\[H,W,3\]"),
    (b"not an image", "cannot decode"),
    ("/no/such/image.png", "not found"),
    (3, "expected a file path"),
])
def test_bad_inputs_are_user_errors(method, bad, match):
    with pytest.raises(ZsadError, match=match):
        Predictor(method).predict([bad])


def test_cli_writes_scores_and_heatmaps(method, images, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", method)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, a in enumerate(images):
        (folder / ("sub" if i == 2 else "") / f"img{i}.png").write_bytes(png_bytes(a))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(folder), "--checkpoint", str(ckpt), "--out", str(out), "--batch-size", "2",
                                    "--threshold", "0.5", "--no-progress"])
    assert res.exit_code == 1, res.output  # the broken file is reported; the others are scored
    assert "broken.png" in res.output and "Traceback" not in res.output
    with open(out / "scores.csv") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert len(rows) == 4 and rows[str(folder / "broken.png")]["error"].startswith("cannot decode")
    expected = Predictor(method).predict(images)
    for i, e in enumerate(expected):
        r = rows[str(folder / ("sub" if i == 2 else "") / f"img{i}.png")]
        assert float(r["score"]) == pytest.approx(e.score, abs=1e-6)
        assert r["decision"] == ("NG" if float(r["score"]) >= 0.5 else "OK")
        assert (int(r["height"]), int(r["width"])) == images[i].shape[:2]
        panel = Image.open(out / "heatmaps" / f"img{i}.png")
        assert panel.size == (2 * images[i].shape[1] + 4, images[i].shape[0])  # input | overlay


@pytest.mark.parametrize("args, match", [
    (["--checkpoint", "/no/such/ckpt"], "not a zsad checkpoint"),
    (["--checkpoint", "CKPT", "--batch-size", "0"], "--batch-size"),
    (["--checkpoint", "CKPT", "--device", "cuda:7"], "CUDA is not available"),
])
def test_cli_user_errors_are_one_line(method, images, tmp_path, args, match):
    if torch.cuda.is_available() and "cuda:7" in args:
        pytest.skip("this machine has CUDA")
    ckpt = save_checkpoint(tmp_path / "ckpt", method)
    (tmp_path / "a.png").write_bytes(png_bytes(images[0]))
    args = [str(ckpt) if a == "CKPT" else a for a in args]
    res = CliRunner().invoke(main, [str(tmp_path / "a.png"), *args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.output


def test_console_scripts_point_at_click_commands():
    import importlib
    import tomllib
    from pathlib import Path

    import click

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("zsad-eval", "zsad-predict", "zsad-train"):
        module, attr = scripts[name].split(":")
        assert isinstance(getattr(importlib.import_module(module), attr), click.Command), name


@pytest.mark.server
def test_predict_equals_the_served_answer(method, images, tmp_path):
    """The same tiny model exported with --resize-to-input and served by a real tritonserver answers the same."""
    from zsad.export.exporter import ExportOptions, export_model
    from zsad.serve.client import AnomalyClient
    from zsad.serve.server import TritonServer

    ckpt = save_checkpoint(tmp_path / "ckpt", method)
    export_model(ExportOptions(checkpoint=str(ckpt), backend="python-ort", out=tmp_path / "repo", max_batch=4,
                               parity_images=2, resize_to_input=True, max_pixels=1_000_000), log=lambda *a: None)
    local = Predictor.from_checkpoint(ckpt).predict([png_bytes(a) for a in images])
    with TritonServer(tmp_path / "repo") as srv:
        served = AnomalyClient(srv.http_url, "anomalyclip").infer([png_bytes(a) for a in images])
    for lp, sp in zip(local, served, strict=True):
        assert lp.score == pytest.approx(sp.score, rel=1e-4, abs=1e-6)  # ONNX Runtime vs torch: float rounding
        assert lp.anomaly_map.shape == sp.anomaly_map.shape
        np.testing.assert_allclose(lp.anomaly_map, sp.anomaly_map, rtol=1e-4, atol=1e-4 * np.abs(sp.anomaly_map).max())
