"""report.html of zsad-eval: one self-contained page to read an evaluation and choose a threshold.

The page holds the per-class table (ours beside the papers' numbers, sortable), the image-level ROC and PR curves
of every class (and the pixel-level ROC, PR and PRO ones where the class has masks) as inline SVG, a threshold
control that recomputes the image-level confusion counts, precision, recall and F1 in the page (and names the F1-max
threshold), and a score-sorted gallery per class with filters. No network: the data is one JSON blob in the page,
the script is inline, the thumbnails (overlay + ground-truth outline, small JPEGs) are files in ``report_files/``
beside it, referenced relatively and loaded lazily, one page of the gallery at a time.

Every curve point is computed here, in Python, from the labels and scores (and maps and masks) that
:func:`zsad.evaluate.evaluate` gave the metrics (its ``on_class`` hook): image level exactly as
``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` / ``precision_recall_curve`` (scikit-learn is not a
dependency; tests/test_eval_report.py checks the equality), pixel level at up to :data:`PIXEL_THRESHOLDS`
thresholds, each point a vertex of the exact pixel curve; the PRO curve is the one the AUPRO integrates
(:func:`zsad.metrics.pro_curve`, the 200-threshold modes; "mvtec" keeps none). The prediction rule is
zsad-infer's: anomalous (NG) when ``score >= threshold``.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from zsad.report_page import FILES_DIR, FILTERS_LABELLED, FILTERS_UNLABELLED, GALLERY_JS, gallery_html, page
from zsad.report_page import thumbnails as _write_thumbnails

PIXEL_THRESHOLDS = 256  # thresholds of the pixel-level curves (evenly spaced between the class's min and max)


# ------------------------------------------------------------------------------------------- the numbers
def _descending(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores, descending, with the true and false positives of ``score >= t`` at each."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return s[last], tps, fps


def roc_points(labels, scores) -> dict:
    """The image-level ROC curve: ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``
    (first point (0, 0) at threshold +inf, then one point per distinct score, descending)."""
    t, tps, fps = _descending(labels, scores)
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    return {"fpr": np.r_[0.0, fps / n_neg if n_neg else np.full(fps.size, np.nan)],
            "tpr": np.r_[0.0, tps / n_pos if n_pos else np.full(tps.size, np.nan)],
            "thresholds": np.r_[np.inf, t]}


def pr_points(labels, scores) -> dict:
    """The image-level precision-recall curve: one point per distinct score (descending), as
    ``sklearn.metrics.precision_recall_curve`` gives them (without its closing (recall 0, precision 1) point)."""
    t, tps, fps = _descending(labels, scores)
    n_pos = int(tps[-1])
    return {"recall": tps / n_pos if n_pos else np.full(tps.size, np.nan), "precision": tps / (tps + fps),
            "thresholds": t}


def confusion_at(labels, scores, threshold: float) -> dict:
    """Image-level counts at ``threshold`` (anomalous when ``score >= threshold``)."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    return {"tp": int(np.sum(pred & y)), "fp": int(np.sum(pred & ~y)), "tn": int(np.sum(~pred & ~y)),
            "fn": int(np.sum(~pred & y))}


def f1_max_threshold(labels, scores) -> tuple[float, float] | None:
    """(threshold, F1) of the highest F1 over every distinct score (``score >= t``); on a tie the highest such
    threshold (fewest NG). None without anomalous images."""
    t, tps, fps = _descending(labels, scores)
    n_pos = int(tps[-1])
    if n_pos == 0:
        return None
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))  # the first maximum: scores descend, so the highest threshold
    return float(t[best]), float(f1[best])


def pixel_curves(masks, maps, n_thresholds: int = PIXEL_THRESHOLDS) -> dict | None:
    """Pixel-level ROC and PR points at ``n_thresholds`` thresholds evenly spaced over [min, max) of the maps
    (pixel anomalous when ``map >= t``), plus (0, 0) above the maximum: each a vertex of the exact curve.
    None when the class has no anomalous or no normal pixel."""
    y = np.asarray(masks).astype(bool).reshape(-1)
    m = np.asarray(maps).reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    lo, hi = float(m.min()), float(m.max())
    n_bins = max(int(n_thresholds), 2) if hi > lo else 1
    # numpy's uniform-bin histogram (no sort) bins [e_j, e_j+1) exactly against its own edges (the last bin closed;
    # the same edges for both calls): the number of values >= e_j is the sum of bins j.., for every edge but the
    # last (the maximum, left out).

    def at_or_above(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # values >= each edge, the edges
        hist, bin_edges = np.histogram(values, bins=n_bins, range=(lo, hi if hi > lo else lo + 1.0))
        return np.cumsum(hist[::-1])[::-1], bin_edges[:-1]

    tps, edges = at_or_above(m[y])
    fps, _ = at_or_above(m[~y])
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tps / (tps + fps)
    keep = (tps + fps) > 0
    return {"thresholds": edges, "fpr": np.r_[fps / n_neg, 0.0][::-1], "tpr": np.r_[tps / n_pos, 0.0][::-1],
            "recall": (tps / n_pos)[keep][::-1], "precision": precision[keep][::-1]}


def model_status(clip_weights: str | None, epochs) -> dict:
    """Whether the numbers can speak of accuracy: not with random CLIP weights nor with untrained prompts/heads."""
    reasons = []
    if clip_weights == "random":
        reasons.append("the CLIP backbone has random weights")
    if epochs == 0:
        reasons.append("the checkpoint was trained for 0 epochs (random prompts / heads)")
    known = clip_weights is not None and epochs is not None
    return {"trained": not reasons and known, "untrained": bool(reasons), "reasons": reasons,
            "clip_weights": clip_weights, "epochs": epochs}


# ------------------------------------------------------------------------------------------- collection
class ReportCollector:
    """The ``on_class`` hook of :func:`zsad.evaluate.evaluate`: per class, the curve points, the F1-max threshold,
    one thumbnail per image and the per-image scores and labels (nothing else is kept: the maps are dropped)."""

    def __init__(self, out_dir: Path, image_size: int, progress: bool = True, aupro_mode: str = "anomalyclip"):
        self.out_dir = Path(out_dir)
        self.aupro_mode = aupro_mode
        self.image_size = image_size
        self.progress = progress
        self.classes: dict[str, dict] = {}

    def __call__(self, cls: str, samples, labels, scores, masks, maps, pixel: bool) -> None:
        labels = np.asarray(labels).astype(np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        entry: dict = {"roc": roc_points(labels, scores), "pr": pr_points(labels, scores),
                       "f1max": f1_max_threshold(labels, scores)}
        has_masks = any(getattr(s, "mask", None) for s in samples)
        entry["pixel"] = pixel_curves(masks, maps) if pixel and has_masks else None
        entry["pixel_note"] = (None if entry["pixel"] is not None else
                               "no pixel metrics under this protocol" if not pixel else
                               "no ground-truth masks" if not has_masks else "no anomalous (or no normal) pixel")
        entry["pro"] = None
        if entry["pixel"] is not None:
            from zsad.metrics import pro_curve

            curve = pro_curve(masks, maps, self.aupro_mode)
            entry["pro"] = None if curve is None else {"fpr": curve[0], "pro": curve[1]}
        entry["pro_note"] = (None if entry["pro"] is not None else
                             f"the {self.aupro_mode} AUPRO keeps no curve (an exact curve over every score)"
                             if self.aupro_mode == "mvtec" and entry["pixel"] is not None else
                             "AUPRO undefined for this class" if entry["pixel"] is not None else entry["pixel_note"])
        folder = self.out_dir / FILES_DIR / f"{len(self.classes):03d}"
        entry["images"] = self._thumbnails(folder, cls, samples, labels, scores, masks if has_masks else None, maps)
        self.classes[cls] = entry

    def _thumbnails(self, folder: Path, cls, samples, labels, scores, masks, maps) -> list[dict]:
        from tqdm import tqdm

        folder.mkdir(parents=True, exist_ok=True)
        vmin, vmax = float(maps.min()), float(maps.max())  # one colour scale per class, as the heatmap panels
        rel = folder.relative_to(self.out_dir).as_posix()
        items = []
        for i, s in enumerate(tqdm(samples, desc=f"report {cls}", disable=not self.progress, leave=False,
                                   dynamic_ncols=True)):
            mask = masks[i] if masks is not None else None
            small, big = _write_thumbnails(s.image, maps[i], vmin, vmax, mask, folder, f"{i:05d}")
            items.append({"src": f"{rel}/{small}", "view": f"{rel}/{big}", "name": Path(s.image).name,
                          "defect": s.defect, "score": float(scores[i]), "label": int(labels[i])})
        return items

    # ------------------------------------------------------------------------------------- the page
    def write(self, report: dict, status: dict, infer_hint: dict) -> Path:
        """Write OUT/report.html from the metrics.json content ``report`` and what was collected."""
        data: dict = {"meta": {k: report.get(k) for k in ("method", "profile", "dataset", "protocol", "aupro_mode",
                                                     "split", "image_size", "checkpoint", "device")},
                "status": status, "infer": infer_hint,
                "paper": {k: v.get("value") for k, v in (report.get("paper") or {}).items()},
                "classes": [_class_data(cls, e) for cls, e in self.classes.items()]}
        pooled = _pooled(self.classes)
        if pooled is not None:
            data["classes"] = [*data["classes"], pooled]
        path = self.out_dir / "report.html"
        path.write_text(_page(report, status, data))
        return path


def _class_data(cls: str, e: dict) -> dict:
    f1 = e["f1max"]
    return {"name": cls, "images": e["images"], "f1max": None if f1 is None else {"threshold": f1[0], "f1": f1[1]},
            "roc": {"fpr": e["roc"]["fpr"], "tpr": e["roc"]["tpr"]},
            "pr": {"recall": e["pr"]["recall"], "precision": e["pr"]["precision"]},
            "pixel": None if e["pixel"] is None else {k: e["pixel"][k] for k in ("fpr", "tpr", "recall", "precision")},
            "pixel_note": e["pixel_note"], "pro": e.get("pro"), "pro_note": e.get("pro_note")}


def _pooled(classes: dict) -> dict | None:
    """All classes' images together (one threshold for the whole line), when there is more than one class."""
    if len(classes) < 2:
        return None
    items = [dict(it, cls=c) for c, e in classes.items() for it in e["images"]]
    labels = np.array([it["label"] for it in items])
    scores = np.array([it["score"] for it in items])
    entry = {"roc": roc_points(labels, scores), "pr": pr_points(labels, scores),
             "f1max": f1_max_threshold(labels, scores), "pixel": None,
             "pixel_note": "pixel curves are per class", "pro_note": "PRO curves are per class", "images": items}
    return _class_data("(all classes)", entry)


_COLUMNS = [("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("image_f1max", "I-F1max"), ("pixel_auroc", "P-AUROC"),
            ("pixel_ap", "P-AP"), ("pixel_f1max", "P-F1max"), ("pixel_aupro", "P-AUPRO")]


def _pct(v) -> tuple[str, str]:
    """(shown text, sort value) of a metric fraction."""
    if v is None or v != v:
        return "n/a", ""
    return f"{100 * v:.1f}", repr(float(v))


def _table(report: dict) -> str:
    from zsad.report_page import table

    rows = []
    for cls, m in report["per_class"].items():
        c = report["counts"][cls]
        rows.append([cls, c["images"], c["anomalous"], *(_pct(m.get(k)) for k, _ in _COLUMNS)])
    n_img = sum(c["images"] for c in report["counts"].values())
    n_bad = sum(c["anomalous"] for c in report["counts"].values())
    foot = (f'<tr class="mean"><td>mean (ours)</td><td>{n_img}</td><td>{n_bad}</td>'
            + "".join(f"<td>{_pct(report['mean'].get(k))[0]}</td>" for k, _ in _COLUMNS) + "</tr>")
    paper = report.get("paper") or {}
    if paper:
        esc = html.escape
        first = next(iter(paper.values()))
        foot += ('<tr class="paper"><td>paper</td><td></td><td></td>'
                 + "".join(f"<td>{paper[k]['value']:.1f}</td>" if k in paper else "<td>-</td>" for k, _ in _COLUMNS)
                 + "</tr>")
        foot += (f'<tr class="note"><td colspan="{3 + len(_COLUMNS)}">paper numbers: {esc(str(first["paper"]))} '
                 f'paper, {esc(str(first["table"]))} (a mean over the data set; the papers print no per-class '
                 f"rows here)</td></tr>")
    return table("metrics", ["class", "images", "anomalous", *(h for _, h in _COLUMNS)], rows, foot)


def _status_html(status: dict) -> str:
    esc = html.escape
    if status["untrained"]:
        return ('<div id="status" class="untrained"><b>Model status: UNTRAINED</b> ('
                + esc("; ".join(status["reasons"])) + "). The numbers and curves below show that the pipeline "
                "runs; they say nothing about how well the method detects anomalies.</div>")
    if status["trained"]:
        return (f'<div id="status" class="trained"><b>Model status: trained</b> ({status["epochs"]} epochs, CLIP '
                f'weights: {esc(str(status["clip_weights"]))}).</div>')
    return ('<div id="status" class="unknown"><b>Model status: not recorded</b> (CLIP weights: '
            f'{esc(str(status["clip_weights"]))}, epochs: {esc(str(status["epochs"]))}).</div>')


def _page(report: dict, status: dict, data: dict) -> str:
    esc = html.escape
    title = f"zsad-eval: {report.get('method')} on {report.get('dataset') or report.get('data_path')}"
    sub = (f"{esc(str(report.get('method')))} ({esc(str(report.get('profile')))}) on "
           f"{esc(str(report.get('dataset') or report.get('data_path')))}, split {esc(str(report.get('split')))}, "
           f"protocol {esc(str(report.get('protocol')))}, AUPRO mode {esc(str(report.get('aupro_mode')))}, image size "
           f"{esc(str(report.get('image_size')))}")
    caption = ("Per-class metrics (%; click a header to sort)" if not status["untrained"] else
               "Per-class metrics (%; click a header to sort) &mdash; untrained model: not a measure of accuracy")
    gallery = gallery_html(FILTERS_LABELLED, _LEGEND, _COUNTS, '<button id="use-f1">use F1-max</button>')
    body = (f"<div>{sub}</div>\n{_status_html(status)}\n<h2>{caption}</h2>\n{_table(report)}\n"
            + _BODY.replace("{{GALLERY}}", gallery))
    return page(title, body, data, [GALLERY_JS, _SCRIPT])


_LEGEND = ("Each thumbnail: the image with its anomaly map (one colour scale per class, blue low, red high) and the "
           "ground-truth outline in white. Border: red = anomalous, grey = normal; orange ring = false positive, "
           "purple ring = false negative at the threshold.")

_COUNTS = """<p>F1-max threshold: <b id="f1max-t"></b> (F1 <span id="f1max-f1"></span>, computed in Python);
the page computes <span id="f1max-page"></span> <span id="f1max-agree"></span></p>
<table id="counts"><tr><th>TP</th><th>FP</th><th>TN</th><th>FN</th><th>precision</th><th>recall</th><th>F1</th></tr>
<tr><td id="tp"></td><td id="fp"></td><td id="tn"></td><td id="fn"></td><td id="precision"></td><td id="recall"></td>
<td id="f1"></td></tr></table>"""

_BODY = """<h2>Class <select id="cls"></select></h2>
<h3>Curves</h3>
<div class="plots" id="curves"></div>
<p class="note" id="curve-notes"></p>
<h3>Threshold (image level: anomalous when score &ge; threshold)</h3>
{{GALLERY}}"""

_SCRIPT = r"""
let cur = null;

function curve(id, title, xs, ys, xl, yl, diag) {
  return plot(id, title, [{xs: xs, ys: ys}], {xl: xl, yl: yl, diag: diag});
}

function drawCurves(c) {
  const box = $("curves");
  box.textContent = "";
  box.appendChild(curve("image-roc", "image ROC", c.roc.fpr, c.roc.tpr, "FPR", "TPR", true));
  box.appendChild(curve("image-pr", "image PR", c.pr.recall, c.pr.precision, "recall", "precision", false));
  const notes = [];
  if (c.pixel) {
    box.appendChild(curve("pixel-roc", "pixel ROC", c.pixel.fpr, c.pixel.tpr, "FPR", "TPR", true));
    box.appendChild(curve("pixel-pr", "pixel PR", c.pixel.recall, c.pixel.precision, "recall", "precision", false));
  } else {
    notes.push("Pixel curves not drawn: " + c.pixel_note + ".");
  }
  if (c.pro) {
    box.appendChild(curve("pixel-pro", "pixel PRO (" + D.meta.aupro_mode + ")", c.pro.fpr, c.pro.pro,
                          "FPR<0.3 rescaled", "PRO", false));
  } else {
    notes.push("PRO curve not drawn: " + (c.pro_note || "no PRO curve") + ".");
  }
  $("curve-notes").textContent = notes.join(" ");
}

// Image-level counts at t: anomalous when score >= t (zsad-infer's NG rule).
function counts(c, t) {
  const k = {tp: 0, fp: 0, tn: 0, fn: 0};
  for (const it of c.images) {
    const ng = isNG(it, t);
    if (ng) { if (it.label) k.tp++; else k.fp++; } else { if (it.label) k.fn++; else k.tn++; }
  }
  return k;
}

// The page's own F1-max: every distinct score, descending; a tie keeps the higher threshold.
function pageF1max(c) {
  const s = c.images.map((it) => [it.score, it.label]).sort((a, b) => b[0] - a[0]);
  const pos = s.reduce((n, x) => n + x[1], 0);
  if (!pos) return null;
  let tp = 0, fp = 0, best = null;
  for (let i = 0; i < s.length; i++) {
    if (s[i][1]) tp++; else fp++;
    if (i + 1 < s.length && s[i + 1][0] === s[i][0]) continue;
    const f = 2 * tp / (tp + fp + pos);
    if (best === null || f > best.f1) best = {threshold: s[i][0], f1: f};
  }
  return best;
}

G.onThreshold = (t) => {
  const k = counts(cur, t);
  for (const n of ["tp", "fp", "tn", "fn"]) $(n).textContent = k[n];
  const p = (k.tp + k.fp) ? k.tp / (k.tp + k.fp) : null;
  const r = (k.tp + k.fn) ? k.tp / (k.tp + k.fn) : null;
  const f = (2 * k.tp + k.fp + k.fn) ? 2 * k.tp / (2 * k.tp + k.fp + k.fn) : null;
  $("precision").textContent = fmt(p);
  $("recall").textContent = fmt(r);
  $("f1").textContent = fmt(f);
};

function selectClass(i) {
  cur = D.classes[i];
  G.name = cur.name;
  drawCurves(cur);
  const [lo, hi] = setItems(cur.images);
  const py = cur.f1max, mine = pageF1max(cur);
  $("f1max-t").textContent = py ? String(py.threshold) : "n/a (no anomalous image)";
  $("f1max-f1").textContent = py ? py.f1.toFixed(4) : "n/a";
  $("f1max-page").textContent = mine ? String(mine.threshold) : "n/a";
  const agree = (!py && !mine) || (py && mine && py.threshold === mine.threshold && py.f1 === mine.f1);
  $("f1max-agree").textContent = agree ? "(agrees)" : "(DISAGREES)";
  if (!agree) console.error("F1-max: the page and Python disagree");
  setThreshold(py ? py.threshold : (lo + hi) / 2);
}

D.classes.forEach((c, i) => {
  const o = document.createElement("option");
  o.value = i; o.textContent = c.name + " (" + c.images.length + ")";
  $("cls").appendChild(o);
});
$("cls").addEventListener("change", (e) => selectClass(+e.target.value));
$("use-f1").addEventListener("click", () => cur.f1max && setThreshold(cur.f1max.threshold));
if (D.classes.length) selectClass(0);
"""


# ------------------------------------------------------------------------------------------- unlabelled images
def write_scores_report(out_dir: Path, outcomes, threshold: float | None, title: str, command: str | None) -> Path:
    """OUT/report.html of zsad-predict / zsad-infer: the score-sorted gallery of the scored images (one colour scale
    for the run, as the heatmap panels) with a threshold control that counts NG and OK in the page; no metrics (no
    labels). ``outcomes`` are ``(path, prediction or ZsadError)``; ``command`` the command line to rerun with a
    threshold (``{T}`` marks it)."""
    from tqdm import tqdm

    from zsad import ZsadError

    out_dir = Path(out_dir)
    scored = [(p, pred) for p, pred in outcomes if not isinstance(pred, ZsadError)]
    failed = [(p, str(err)) for p, err in outcomes if isinstance(err, ZsadError)]
    folder = out_dir / FILES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    if scored:
        vmin = float(min(pred.anomaly_map.min() for _, pred in scored))
        vmax = float(max(pred.anomaly_map.max() for _, pred in scored))
        for i, (path, pred) in enumerate(tqdm(scored, desc="report", leave=False, disable=len(scored) < 50)):
            small, big = _write_thumbnails(path, pred.anomaly_map, vmin, vmax, None, folder, f"{i:05d}")
            items.append({"src": f"{FILES_DIR}/{small}", "view": f"{FILES_DIR}/{big}", "name": Path(path).name,
                          "path": str(path), "score": float(pred.score)})
    data = {"images": items, "threshold": threshold, "failed": [{"image": str(p), "error": e} for p, e in failed],
            "infer": {"command": command, "note": None}}
    esc = html.escape
    sub = (f"{len(items)} images scored" + (f", {len(failed)} could not be scored (listed below)" if failed else "")
           + (f"; the run's threshold: {threshold}" if threshold is not None else
              "; no --threshold given: the control starts half-way between the lowest and the highest score")
           + ". No labels: the page counts decisions, it measures no accuracy.")
    counts = ('<p id="ngok">At this threshold: <b id="ng"></b> NG, <b id="ok"></b> OK '
              '(of <span id="n-scored"></span> scored images).</p>')
    legend = ("Each thumbnail: the image with its anomaly map (one colour scale for the run, blue low, red high). "
              "Red border = NG at the threshold.")
    errors = ("<h3>Not scored</h3><ul>" + "".join(f"<li>{esc(str(p))}: {esc(e)}</li>" for p, e in failed) + "</ul>"
              if failed else "")
    body = (f"<div>{esc(sub)}</div>\n<h3>Threshold (NG when score &ge; threshold)</h3>\n"
            '<div class="plots" id="score-plot"></div>\n' + gallery_html(FILTERS_UNLABELLED, legend, counts) + errors)
    path = out_dir / "report.html"
    path.write_text(page(title, body, data, [GALLERY_JS, _SCORES_SCRIPT]))
    return path


_SCORES_SCRIPT = r"""
const ranked = D.images.map((it) => it.score).sort((a, b) => b - a);

// The scores, highest first, with the threshold across them: where it cuts is how many are NG.
function drawScores(t) {
  const box = $("score-plot");
  box.textContent = "";
  if (!ranked.length) return;
  box.appendChild(plot("scores", "scores, highest first", [{xs: ranked.map((_, i) => i + 1), ys: ranked}],
                       {xl: "rank", yl: "score", lo: [1, ranked[ranked.length - 1]], hi: [ranked.length, ranked[0]],
                        wide: true, hlines: [{y: Math.min(Math.max(t, ranked[ranked.length - 1]), ranked[0]),
                                              label: "threshold"}]}));
}

G.onThreshold = (t) => {
  const ng = ngCount(G.items, t);
  $("ng").textContent = ng;
  $("ok").textContent = G.items.length - ng;
  $("n-scored").textContent = G.items.length;
  drawScores(t);
};
const [lo, hi] = setItems(D.images);
setThreshold(D.threshold !== null ? D.threshold : (D.images.length ? (lo + hi) / 2 : 0));
"""
