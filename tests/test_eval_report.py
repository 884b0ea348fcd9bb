"""zsad-eval's report.html (issue 24 items 1 and 4): the Python side against scikit-learn, and the page itself in
headless Chromium from file:// (no network): no console error, every image loads, the table sorts, the threshold
control gives scikit-learn's confusion counts, the F1-max threshold and the curves' points equal scikit-learn's.

The browser part needs the Debian ``chromium`` and ``chromium-driver`` packages and Selenium (the dev extra); where
they are missing it skips with the reason."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import chromium_driver, screenshot
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

import zsad.methods as M
from zsad import report_html as R
from zsad.checkpoint import save_checkpoint
from zsad.evaluate_cli import main as eval_cli
from zsad.metrics import f1_max
from zsad.report_page import THUMB, VIEW

CLASSES = "gravel,nut"


def _sklearn_f1max(labels, scores):
    """Independent F1-max threshold: every distinct score, sklearn's confusion counts; the highest on a tie."""
    best = None
    for t in sorted(set(scores.tolist()), reverse=True):
        tn, fp, fn, tp = confusion_matrix(labels, scores >= t, labels=[0, 1]).ravel()
        f1 = 2 * tp / (2 * tp + fp + fn)
        if best is None or f1 > best[1]:
            best = (t, f1)
    return best


# -- the Python side ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curves_f1max_counts_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 60
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(size=n) + labels, 1)  # rounded: many ties
    roc = R.roc_points(labels, scores)
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(roc["fpr"], fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(roc["tpr"], tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(roc["thresholds"][1:], thr[1:])
    pr = R.pr_points(labels, scores)
    precision, recall, pthr = precision_recall_curve(labels, scores)
    sk = {t: (p, r) for p, r, t in zip(precision[:-1], recall[:-1], pthr, strict=True)}
    ours = {t: (p, r) for p, r, t in zip(pr["precision"], pr["recall"], pr["thresholds"], strict=True)}
    assert set(sk) <= set(ours)  # sklearn may stop once full recall is reached
    for t, (p, r) in sk.items():
        assert ours[t] == pytest.approx((p, r), abs=1e-12)
    t, f1 = R.f1_max_threshold(labels, scores)
    assert (t, f1) == pytest.approx(_sklearn_f1max(labels, scores), abs=1e-12)
    assert f1 == pytest.approx(f1_max(labels, scores), abs=1e-12)  # the metric's F1-max, at that threshold
    for t in (scores.min(), np.median(scores), scores.max(), scores.max() + 1):
        tn, fp, fn, tp = confusion_matrix(labels, scores >= t, labels=[0, 1]).ravel()
        assert R.confusion_at(labels, scores, t) == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert R.f1_max_threshold(np.zeros(5), np.arange(5.0)) is None


@pytest.mark.parametrize("quantised", [False, True])
def test_pixel_curve_points_are_sklearn_vertices(quantised):
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 16, 16), bool)
    masks[1, 3:8, 4:9] = masks[2, 10:14, 0:5] = True
    maps = (rng.random((4, 16, 16)) + 0.8 * masks).astype(np.float32)
    if quantised:  # many ties, and data values on the thresholds
        maps = (np.round(maps * 5) / 5).astype(np.float32)
    c = R.pixel_curves(masks, maps, n_thresholds=9 if quantised else 40)
    fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel(), drop_intermediate=False)
    vertices = set(zip(np.round(fpr, 9), np.round(tpr, 9), strict=True))
    assert all((round(f, 9), round(t, 9)) in vertices for f, t in zip(c["fpr"], c["tpr"], strict=True))
    assert c["fpr"][0] == 0 and c["fpr"][-1] == 1 and np.all(np.diff(c["fpr"]) >= 0)
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    pr = set(zip(np.round(recall, 9), np.round(precision, 9), strict=True))
    assert all((round(r, 9), round(p, 9)) in pr for r, p in zip(c["recall"], c["precision"], strict=True))
    assert R.pixel_curves(np.zeros((1, 4, 4), bool), maps[:1, :4, :4]) is None


@pytest.mark.parametrize("mode", ["anomalyclip", "sowa", "afclip", "mvtec"])
def test_pro_curve_is_the_curve_aupro_integrates(mode):
    from zsad.metrics import aupro, pro_curve

    rng = np.random.default_rng(4)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:9, 3:7] = masks[2, 12:20, 10:13] = masks[2, 1:4, 1:4] = True
    maps = (rng.random((3, 24, 24)) + 0.6 * masks).astype(np.float32)
    curve = pro_curve(masks, maps, mode)
    if mode == "mvtec":
        assert curve is None
        return
    f, p = curve
    assert np.all(np.diff(f) >= 0) and f[0] >= 0 and f[-1] == pytest.approx(1.0)
    assert float(np.sum(np.diff(f) * (p[1:] + p[:-1]) / 2)) == aupro(masks, maps, mode)
    assert pro_curve(np.zeros_like(masks), maps, mode) is None and math.isnan(aupro(np.zeros_like(masks), maps, mode))


def test_collector_class_without_anomalies_or_masks(tmp_path):
    """A class of normal images only (no masks): no F1-max, no pixel or PRO curve, and the page says why."""
    from PIL import Image

    from zsad.data.readers import Sample

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 30), (10 * i, 0, 0)).save(paths[-1])
    samples = [Sample(p, None, 0, "tubes", "good") for p in paths]
    col = R.ReportCollector(tmp_path / "out", 32, progress=False)
    col("tubes", samples, np.zeros(3), np.array([0.1, 0.5, 0.2]), np.zeros((3, 32, 32), bool),
        np.random.default_rng(0).random((3, 32, 32), dtype=np.float32), True)
    e = col.classes["tubes"]
    assert e["f1max"] is None and e["pixel"] is None and e["pro"] is None
    assert e["pixel_note"] == "no ground-truth masks" and e["pro_note"] == "no ground-truth masks"
    assert [it["score"] for it in e["images"]] == [0.1, 0.5, 0.2]
    assert all((tmp_path / "out" / it["src"]).is_file() for it in e["images"])
    report = {"method": "bagclip", "per_class": {"tubes": {"image_auroc": float("nan")}}, "mean": {},
              "counts": {"tubes": {"images": 3, "anomalous": 0}}}
    page = col.write(report, R.model_status("random", 0), {"command": None, "note": "n"}).read_text()
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)

    def refuse(name):
        raise ValueError(f"{name} is not JSON (JSON.parse fails on it)")

    json.loads(blob, parse_constant=refuse)
    assert "UNTRAINED" in page and "<td data-v=\"\">n/a</td>" in page


def test_model_status_never_claims_accuracy_untrained():
    assert R.model_status("random", 3)["untrained"] and not R.model_status("random", 3)["trained"]
    assert R.model_status("openai", 0)["untrained"]
    assert R.model_status("openai", 5)["trained"]
    s = R.model_status("openai", None)
    assert not s["trained"] and not s["untrained"]


# -- zsad-eval --report / --no-report ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, synthetic):
    base = tmp_path_factory.mktemp("eval_report")
    save_checkpoint(base / "ckpt", M.create("bagclip", "tiny"), epochs=0)
    args = ["--checkpoint", str(base / "ckpt"), "--data", str(synthetic), "--classes", CLASSES, "--heatmaps", "1",
            "--no-progress", "--device", "cpu"]
    res = CliRunner().invoke(eval_cli, args + ["--out", str(base / "with")])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    plain = CliRunner().invoke(eval_cli, args + ["--out", str(base / "without"), "--no-report"])
    assert plain.exit_code == 0, plain.output
    return base, res.output, plain.output


def _page_data(out: Path) -> dict:
    text = (out / "report.html").read_text()
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)
    return json.loads(blob.replace("<\\/", "</"))


@pytest.mark.slow
def test_no_report_writes_exactly_the_previous_outputs(evaluated):
    base, out_with, out_without = evaluated
    files = {d: sorted(p.relative_to(base / d).as_posix() for p in (base / d).rglob("*") if p.is_file())
             for d in ("with", "without")}
    assert "report.html" not in files["without"] and not any(f.startswith("report_files") for f in files["without"])
    assert [f for f in files["with"] if f != "report.html" and not f.startswith("report_files/")] == files["without"]
    a, b = (json.loads((base / d / "metrics.json").read_text()) for d in ("with", "without"))
    a.pop("seconds"), b.pop("seconds"), a.pop("checkpoint"), b.pop("checkpoint")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True).replace("/without", "/with")
    assert (base / "with" / "metrics.csv").read_bytes() == (base / "without" / "metrics.csv").read_bytes()
    assert "report.html" not in out_without


@pytest.mark.slow
def test_report_data_is_the_metrics(evaluated):
    base, _, _ = evaluated
    out = base / "with"
    metrics = json.loads((out / "metrics.json").read_text())
    data = _page_data(out)
    assert [c["name"] for c in data["classes"]] == CLASSES.split(",") + ["(all classes)"]
    assert data["status"]["untrained"] and "UNTRAINED" in (out / "report.html").read_text()
    for c in data["classes"][:-1]:
        labels = np.array([it["label"] for it in c["images"]])
        scores = np.array([it["score"] for it in c["images"]])
        assert len(labels) == metrics["counts"][c["name"]]["images"]
        assert roc_auc_score(labels, scores) == pytest.approx(metrics["per_class"][c["name"]]["image_auroc"],
                                                              abs=1e-12)
        assert c["f1max"]["f1"] == pytest.approx(metrics["per_class"][c["name"]]["image_f1max"], abs=1e-12)
        assert c["pixel"] is not None
        # the PRO curve drawn is the one the AUPRO integrated: its trapezoidal area is the metric
        f, p = np.array(c["pro"]["fpr"]), np.array(c["pro"]["pro"])
        assert float(np.sum(np.diff(f) * (p[1:] + p[:-1]) / 2)) == pytest.approx(
            metrics["per_class"][c["name"]]["pixel_aupro"], abs=1e-12)
        assert all((out / it["src"]).is_file() for it in c["images"])


# -- the page in a real browser ----------------------------------------------------------------------------------
def _points(driver, svg_id):
    pts = driver.execute_script(f"return document.querySelector('#{svg_id} polyline.pts').getAttribute('points')")
    return np.array([[float(v) for v in p.split(",")] for p in pts.split()])


@pytest.mark.slow
def test_report_in_headless_chromium(evaluated):
    base, _, _ = evaluated
    out = base / "with"
    data = _page_data(out)
    driver = chromium_driver()  # skips without selenium or chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    try:
        driver.get((out / "report.html").as_uri())
        assert "UNTRAINED" in driver.find_element(By.ID, "status").text

        # every image of the first gallery page loads (scrolled into view: they load lazily)
        imgs = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
        assert imgs and all(i.get_attribute("loading") == "lazy" for i in imgs)
        for i in imgs:
            driver.execute_script("arguments[0].scrollIntoView()", i)
        driver.set_script_timeout(20)
        widths = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const imgs = Array.from(document.querySelectorAll('#gallery img'));
            Promise.all(imgs.map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })))
              .then(() => done(imgs.map(i => i.naturalWidth)));""")
        assert len(widths) == len(imgs) and all(w > 0 for w in widths), widths
        screenshot(driver, "report-eval", height=1900)  # down to the threshold control and the gallery

        # a click on a thumbnail opens its larger view (the VIEW-px file), a click on the view closes it
        imgs[0].click()
        view = driver.find_element(By.ID, "view")
        assert view.is_displayed()
        big = driver.execute_async_script("""
            const done = arguments[arguments.length - 1], i = document.getElementById('view-img');
            if (i.complete) done(i.naturalWidth); else { i.onload = i.onerror = () => done(i.naturalWidth); }""")
        assert big == VIEW
        view.click()
        assert not view.is_displayed()

        # clicking a header sorts the table (ascending, then descending)
        header = driver.find_element(By.CSS_SELECTOR, "#metrics th[data-col='1']")  # images
        header.click()
        col = [int(c.text) for c in driver.find_elements(By.CSS_SELECTOR, "#metrics tbody tr td:nth-child(2)")]
        assert col == sorted(col)
        header = driver.find_element(By.CSS_SELECTOR, "#metrics th[data-col='0']")
        header.click()
        header.click()
        names = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#metrics tbody tr td:nth-child(1)")]
        assert names == sorted(CLASSES.split(","), reverse=True)

        for index in (0, len(data["classes"]) - 1):  # one class and the pooled view
            Select(driver.find_element(By.ID, "cls")).select_by_index(index)
            c = data["classes"][index]
            labels = np.array([it["label"] for it in c["images"]])
            scores = np.array([it["score"] for it in c["images"]])

            # the F1-max threshold: Python's (shown), the page's own and sklearn's agree exactly
            t_sk, f1_sk = _sklearn_f1max(labels, scores)
            assert float(driver.find_element(By.ID, "f1max-t").text) == t_sk
            assert float(driver.find_element(By.ID, "f1max-page").text) == t_sk
            assert driver.find_element(By.ID, "f1max-agree").text == "(agrees)"
            assert float(driver.find_element(By.ID, "f1").text) == pytest.approx(f1_sk, abs=5e-5)

            # typing a threshold gives sklearn's confusion counts at it
            for t in (float(np.median(scores)), float(np.quantile(scores, 0.8)), t_sk):
                box = driver.find_element(By.ID, "thr")
                box.clear()
                box.send_keys(repr(t) + "\n")
                driver.execute_script("document.getElementById('thr').dispatchEvent(new Event('change'))")
                tn, fp, fn, tp = confusion_matrix(labels, scores >= t, labels=[0, 1]).ravel()
                got = {k: int(driver.find_element(By.ID, k).text) for k in ("tp", "fp", "tn", "fn")}
                assert got == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}, t
                cmd = driver.find_element(By.ID, "infer-cmd").text
                assert cmd.startswith("zsad-infer --model bagclip --threshold ") and float(cmd.split()[4]) == t
                # the false-positive filter shows exactly the false positives
                Select(driver.find_element(By.ID, "filter")).select_by_value("fp")
                info = driver.find_element(By.ID, "page-info").text
                assert f"({fp} images)" in info
                Select(driver.find_element(By.ID, "filter")).select_by_value("all")

            # the curves' points are sklearn's
            fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
            got = _points(driver, "image-roc")
            np.testing.assert_allclose(got, np.c_[fpr, tpr], atol=1e-6)
            precision, recall, _ = precision_recall_curve(labels, scores)
            got = {(round(x, 5), round(y, 5)) for x, y in _points(driver, "image-pr")}
            assert {(round(r, 5), round(p, 5)) for r, p in zip(recall[:-1], precision[:-1], strict=True)} <= got
            if c["pixel"] is not None:
                assert len(_points(driver, "pixel-roc")) == len(c["pixel"]["fpr"])
                np.testing.assert_allclose(_points(driver, "pixel-pro"), np.c_[c["pro"]["fpr"], c["pro"]["pro"]],
                                           atol=1e-6)

        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


@pytest.mark.slow
def test_report_page_counts_many_images_fast(tmp_path):
    """A 10,000-image run (synthetic scores, one shared thumbnail): the page opens and the gallery draws one page."""
    import time

    from PIL import Image

    rng = np.random.default_rng(0)
    out = tmp_path
    (out / R.FILES_DIR).mkdir()
    Image.new("RGB", (THUMB, THUMB), (90, 90, 90)).save(out / R.FILES_DIR / "t.jpg")
    col = R.ReportCollector(out, 224, progress=False)
    n = 10_000
    for k, cls in enumerate(("a", "b")):
        labels = rng.integers(0, 2, n // 2)
        scores = rng.normal(size=n // 2) + labels
        col.classes[cls] = {"roc": R.roc_points(labels, scores), "pr": R.pr_points(labels, scores),
                            "f1max": R.f1_max_threshold(labels, scores), "pixel": None, "pixel_note": "none",
                            "images": [{"src": f"{R.FILES_DIR}/t.jpg", "name": f"{k}_{i}.png", "defect": "d",
                                        "score": float(s), "label": int(y)}
                                       for i, (s, y) in enumerate(zip(scores, labels, strict=True))]}
    report = {"method": "bagclip", "per_class": {c: {} for c in "ab"}, "mean": {},
              "counts": {c: {"images": n // 2, "anomalous": 0} for c in "ab"}}
    col.write(report, R.model_status("random", 0), {"command": "zsad-infer --threshold {T} X", "note": None})
    driver = chromium_driver()
    from selenium.webdriver.common.by import By

    try:
        t0 = time.perf_counter()
        driver.get((out / "report.html").as_uri())
        seconds = time.perf_counter() - t0
        assert driver.find_element(By.ID, "page-info").text.endswith(f"({n // 2} images)")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery img")) == 48
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        print(f"report.html with {n} images opened in {seconds:.2f} s")
        assert seconds < 2.0
    finally:
        driver.quit()

