"""The one page framework of zsad's browser reports (zsad-eval, zsad-predict / zsad-infer, zsad-bench).

Each report is one self-contained HTML file: no network, no CDN, works from file://. The data is one JSON blob in
the page (:func:`page`), the scripts are inline, images are small JPEG files beside the page referenced relatively.
Shared here: the page shell and its CSS, sortable tables (any ``table.sortable`` whose header cells carry
``data-col`` and body cells ``data-v``), the SVG line-plot helper ``plot()`` (linear or log axes), and the
score-sorted gallery with its threshold control (:data:`GALLERY_HTML`, ``GALLERY_JS``) and a larger view of an image
on click. The prediction rule everywhere is zsad-infer's: NG (anomalous) when ``score >= threshold``.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

THUMB = 128  # gallery thumbnail side in pixels
VIEW = 256  # side of the larger view shown on click (the overlay's cost grows with its area)
FILES_DIR = "report_files"


def clean(x):
    """JSON-safe: numpy to lists, NaN / inf to None (JSON has neither)."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def thumbnails(image, anomaly_map: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None,
               folder: Path, stem: str) -> tuple[str, str]:
    """Write ``stem.jpg`` (THUMB px) and ``stem_v.jpg`` (VIEW px): the image (a path or a PIL image) with its map on
    the colour scale [vmin, vmax] and the mask's outline (drawn at each size: one pixel wide in both); returns the
    two file names."""
    from PIL import Image

    from zsad.data import read_image
    from zsad.visualize import overlay

    img = read_image(str(image)) if isinstance(image, (str, Path)) else image.convert("RGB")
    img = img.resize((VIEW, VIEW), Image.Resampling.BICUBIC)  # the full image resized once: the thumbnail from this
    amap = Image.fromarray(np.asarray(anomaly_map, np.float32))
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255) if mask is not None and mask.any() else None
    names = []
    for side, name in ((THUMB, f"{stem}.jpg"), (VIEW, f"{stem}_v.jpg")):
        size = (side, side)
        m = np.asarray(mask_img.resize(size, Image.Resampling.NEAREST)) > 127 if mask_img is not None else None
        overlay(np.asarray(img.resize(size, Image.Resampling.BICUBIC)),
                np.asarray(amap.resize(size, Image.Resampling.BILINEAR)), vmin, vmax, m).save(folder / name,
                                                                                             quality=85)
        names.append(name)
    return names[0], names[1]


def page(title: str, body: str, data: dict, scripts: Sequence[str]) -> str:
    """The whole HTML file: ``body`` under an ``h1`` title, ``data`` as the JSON blob ``D`` the scripts read."""
    blob = json.dumps(clean(data), separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    title = html.escape(title)
    rest, parts = _SHELL, []
    for key, value in (("{{TITLE}}", title), ("{{TITLE}}", title), ("{{BODY}}", body), ("{{DATA}}", blob),
                       ("{{SCRIPT}}", "\n".join([BASE_JS, *scripts]))):  # in order: no value is searched again
        head, rest = rest.split(key, 1)
        parts += [head, value]
    return "".join([*parts, rest])


def table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence], foot: str = "") -> str:
    """A sortable table: each cell a ``(text, sort value)`` pair or a plain value (its own sort value); a sort value
    of "" (n/a) sorts last either way."""
    esc = html.escape
    head = "".join(f'<th data-col="{i}">{esc(h)}</th>' for i, h in enumerate(headers))

    def cell(c) -> str:
        text, v = c if isinstance(c, tuple) else (c, c)
        return f'<td data-v="{esc(str(v))}">{esc(str(text))}</td>'

    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return (f'<table id="{esc(table_id)}" class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            + (f"<tfoot>{foot}</tfoot>" if foot else "") + "</table>")


_SHELL = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em}
#status{padding:.5em .8em;margin:.6em 0;border-radius:4px}
.untrained{background:#fde2e1;border:1px solid #c0392b}.trained{background:#e3f4e1;border:1px solid #2e7d32}
.unknown{background:#fff4d6;border:1px solid #b7950b}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
table.sortable th{cursor:pointer;user-select:none}
th.asc:after{content:" \\25B2"}th.desc:after{content:" \\25BC"}tfoot td{font-weight:600}
tr.note td{font-weight:400;color:#666}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{width:230px}.plot svg{width:230px;height:230px;background:#fafafa}
.plot.wide{width:380px}.plot.wide svg{width:380px;height:300px}
.plot .lbl{font-size:12px;color:#444}.note{color:#666;font-size:12px}
.legend{font-size:11px;color:#444}.legend span{display:inline-block;margin-right:8px}
.legend i{display:inline-block;width:14px;height:3px;margin-right:3px;vertical-align:middle}
#counts td{text-align:right}.cmd{font-family:monospace;background:#f3f3f3;padding:4px 6px;display:inline-block}
#gallery{display:flex;flex-wrap:wrap;gap:6px;margin-top:.5em}
.card{width:132px;font-size:11px;border:2px solid #ccc;padding:1px}
.card img{width:128px;height:128px;display:block;cursor:zoom-in}
.card.anom,.card.ng{border-color:#c0392b}.card.fp{outline:3px solid #e67e22}.card.fn{outline:3px solid #8e44ad}
.card .n{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#view{position:fixed;inset:0;background:rgba(0,0,0,.8);display:none;align-items:center;justify-content:center;
flex-direction:column;color:#fff;cursor:zoom-out;z-index:9}
#view img{width:min(80vh,90vw);height:min(80vh,90vw);image-rendering:auto}
</style></head><body>
<h1>{{TITLE}}</h1>
{{BODY}}
<script type="application/json" id="data">{{DATA}}</script>
<script>{{SCRIPT}}</script>
</body></html>
"""

# The gallery and its threshold control; the page around it adds what it counts (eval: the confusion counts).
GALLERY_HTML = """<div><input type="range" id="thr-range" step="any" style="width:320px">
<input type="number" id="thr" step="any" style="width:12em"> {{EXTRA}}</div>
{{COUNTS}}
<p id="infer-line"></p>
<h3>Gallery (sorted by score, highest first)</h3>
<div>show <select id="filter">{{FILTERS}}</select>
<button id="prev">&lt; previous</button> <span id="page-info"></span> <button id="next">next &gt;</button></div>
<p class="note">{{LEGEND}} Click an image for a larger view.</p>
<div id="gallery"></div>
<div id="view"><img id="view-img" alt=""><div id="view-cap"></div></div>
"""

FILTERS_LABELLED = ('<option value="all">all</option><option value="normal">normal</option>'
                    '<option value="anomalous">anomalous</option><option value="fp">false positives</option>'
                    '<option value="fn">false negatives</option>')
FILTERS_UNLABELLED = ('<option value="all">all</option><option value="ng">NG (score &ge; threshold)</option>'
                      '<option value="ok">OK (score &lt; threshold)</option>')


def gallery_html(filters: str, legend: str, counts: str, extra: str = "") -> str:
    return (GALLERY_HTML.replace("{{FILTERS}}", filters).replace("{{LEGEND}}", legend)
            .replace("{{COUNTS}}", counts).replace("{{EXTRA}}", extra))


BASE_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || isNaN(x)) ? "n/a" : x.toFixed(4);
const COLORS = ["#c0392b", "#2471a3", "#229954", "#d68910", "#7d3c98", "#17a589", "#5d6d7e", "#a04000", "#1f618d"];

function sortTable(table, th) {
  const col = +th.dataset.col, body = table.tBodies[0];
  const asc = !th.classList.contains("asc");
  table.querySelectorAll("th").forEach((h) => h.classList.remove("asc", "desc"));
  th.classList.add(asc ? "asc" : "desc");
  const key = (r) => r.cells[col].dataset.v;
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === "" || y === "") return (x === "") - (y === "");  // n/a last either way
    const nx = Number(x), ny = Number(y);
    const c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
    return asc ? c : -c;
  });
  rows.forEach((r) => body.appendChild(r));
}
document.querySelectorAll("table.sortable").forEach((t) =>
  t.querySelectorAll("thead th[data-col]").forEach((th) => th.addEventListener("click", () => sortTable(t, th))));

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// An SVG line plot. series: [{name, xs, ys, dash}]; o: {xl, yl, lo: [x, y], hi: [x, y], logx, logy, diag, wide,
// xticks, yticks, hlines: [{y, label}]}. Points are drawn in the unit square, y up: each axis maps [lo, hi] (log10 of
// them on a log axis) to [0, 1], so on the default [0, 1] axes a point's coordinates are its data values.
function plot(id, title, series, o) {
  const lo = o.lo || [0, 0], hi = o.hi || [1, 1];
  const f = (v, log) => log ? Math.log10(v) : v;
  const ux = (x) => (f(x, o.logx) - f(lo[0], o.logx)) / ((f(hi[0], o.logx) - f(lo[0], o.logx)) || 1);
  const uy = (y) => (f(y, o.logy) - f(lo[1], o.logy)) / ((f(hi[1], o.logy) - f(lo[1], o.logy)) || 1);
  const box = document.createElement("div");
  box.className = "plot" + (o.wide ? " wide" : "");
  const svg = svgEl("svg", {viewBox: "-0.2 -0.06 1.26 1.22", id: id});
  const g = svgEl("g", {transform: "translate(0,1) scale(1,-1)"});  // unit coordinates: y up
  const ns = {"vector-effect": "non-scaling-stroke"};
  g.appendChild(svgEl("rect", {x: 0, y: 0, width: 1, height: 1, fill: "none", stroke: "#999", ...ns}));
  if (o.diag) g.appendChild(svgEl("line", {x1: 0, y1: 0, x2: 1, y2: 1, stroke: "#ccc", ...ns}));
  for (const h of o.hlines || []) {
    g.appendChild(svgEl("line", {x1: 0, y1: uy(h.y), x2: 1, y2: uy(h.y), stroke: "#777", "stroke-dasharray": "2 2",
                                 class: "hline", ...ns}));
  }
  series.forEach((s, k) => {
    const pts = [];
    for (let i = 0; i < s.xs.length; i++)
      if (s.xs[i] !== null && s.ys[i] !== null) pts.push(ux(s.xs[i]).toFixed(6) + "," + uy(s.ys[i]).toFixed(6));
    g.appendChild(svgEl("polyline", {points: pts.join(" "), fill: "none", stroke: s.color || COLORS[k % COLORS.length],
                                     "stroke-width": 2, class: "pts", "data-name": s.name || "",
                                     "stroke-dasharray": s.dash ? "6 3" : "none", ...ns}));
  });
  svg.appendChild(g);
  const text = (x, y, t, anchor) => {
    const tx = svgEl("text", {x: x, y: y, "font-size": 0.045, "text-anchor": anchor});
    tx.textContent = t;
    svg.appendChild(tx);
  };
  const short = (v) => (Math.abs(v) >= 1e4 || (v && Math.abs(v) < 0.01)) ? v.toExponential(0)
    : String(+v.toPrecision(3));
  for (const v of o.xticks || [lo[0], hi[0]]) text(ux(v), 1.06, short(v), "middle");
  for (const v of o.yticks || [lo[1], hi[1]]) text(-0.02, 1 - uy(v) + 0.015, short(v), "end");
  for (const h of o.hlines || []) text(0.01, 1 - uy(h.y) - 0.01, h.label, "start");
  text(0.5, 1.14, o.xl, "middle");
  const lbl = document.createElement("div");
  lbl.className = "lbl";
  lbl.textContent = title + " (x: " + o.xl + ", y: " + o.yl + ")";
  box.append(lbl, svg);
  if (series.length > 1 || (series.length && series[0].name)) {
    const leg = document.createElement("div");
    leg.className = "legend";
    series.forEach((s, k) => {
      const sp = document.createElement("span"), sw = document.createElement("i");
      sw.style.background = s.color || COLORS[k % COLORS.length];
      sp.append(sw, s.name);
      leg.appendChild(sp);
    });
    box.appendChild(leg);
  }
  return box;
}
"""

# The gallery: G.items are the current images ({src, view, name, score, label?, defect?, cls?}), G.thr the
# threshold. A page sets G.onThreshold (what else changes with the threshold) and calls setItems / setThreshold.
# The page's decision arithmetic, apart from the DOM (tests run it in node too).
COUNT_JS = r"""
const isNG = (it, t) => it.score >= t;  // zsad-infer's rule: NG (anomalous) at or above the threshold

function ngCount(items, t) {
  let n = 0;
  for (const it of items) if (isNG(it, t)) n++;
  return n;
}
"""

GALLERY_JS = COUNT_JS + r"""
const PAGE = 48;
const G = {items: [], thr: 0, page: 0, onThreshold: null};

function keep(it, f) {
  const ng = isNG(it, G.thr);
  return f === "all" || (f === "normal" && !it.label) || (f === "anomalous" && it.label === 1) ||
    (f === "fp" && ng && !it.label) || (f === "fn" && !ng && it.label === 1) || (f === "ng" && ng) ||
    (f === "ok" && !ng);
}

const itemTitle = (it) => (it.cls ? it.cls + "/" : "") + (it.defect ? it.defect + "/" : "") + it.name;

function drawGallery() {
  const f = $("filter").value;
  const items = G.items.filter((it) => keep(it, f)).sort((a, b) => b.score - a.score);
  const pages = Math.max(1, Math.ceil(items.length / PAGE));
  G.page = Math.min(Math.max(G.page, 0), pages - 1);
  $("page-info").textContent = "page " + (G.page + 1) + " / " + pages + " (" + items.length + " images)";
  const gal = $("gallery");
  gal.textContent = "";
  for (const it of items.slice(G.page * PAGE, (G.page + 1) * PAGE)) {
    const ng = isNG(it, G.thr), labelled = it.label !== undefined;
    const card = document.createElement("div");
    card.className = "card" + (labelled ? (it.label ? " anom" : "") + (ng && !it.label ? " fp" : "") +
      (!ng && it.label ? " fn" : "") : (ng ? " ng" : ""));
    const img = document.createElement("img");
    img.loading = "lazy";
    img.src = it.src;
    img.alt = it.name;
    img.title = itemTitle(it);
    img.addEventListener("click", () => showView(it));
    const cap = document.createElement("div");
    cap.className = "n";
    cap.textContent = it.score.toPrecision(5) + " " + (labelled ? (it.label ? "anomalous " : "normal ") +
      it.defect : (ng ? "NG " : "OK ") + it.name);
    card.append(img, cap);
    gal.appendChild(card);
  }
}

function showView(it) {
  $("view-img").src = it.view || it.src;
  $("view-img").alt = it.name;
  $("view-cap").textContent = itemTitle(it) + "  score " + it.score.toPrecision(6);
  $("view").style.display = "flex";
}

function setItems(items) {
  G.items = items;
  let lo = Infinity, hi = -Infinity;  // a loop: Math.min(...scores) overflows the stack on large runs
  for (const it of items) { lo = Math.min(lo, it.score); hi = Math.max(hi, it.score); }
  $("thr-range").min = lo; $("thr-range").max = hi;
  return [lo, hi];
}

function setThreshold(t, from) {
  if (!isFinite(t)) return;
  G.thr = t;
  if (from !== "range") $("thr-range").value = t;
  if (from !== "number") $("thr").value = t;
  if (G.onThreshold) G.onThreshold(t);
  const line = $("infer-line");
  if (!D.infer || !D.infer.command) {
    line.textContent = (D.infer && D.infer.note) || "";
  } else {
    line.textContent = "";
    const c = document.createElement("span");
    c.className = "cmd";
    c.id = "infer-cmd";
    const cls = G.items.length && G.items[0].cls ? "CLASS" : (G.name || "CLASS");  // the pooled view: no one class
    c.textContent = D.infer.command.replace("{T}", String(t)).replace("{CLASS}", cls);
    line.append("Copy: ", c);
    if (D.infer.note) line.append(" " + D.infer.note);
  }
  G.page = 0;
  drawGallery();
}

$("thr-range").addEventListener("input", (e) => setThreshold(+e.target.value, "range"));
$("thr").addEventListener("change", (e) => setThreshold(+e.target.value, "number"));
$("filter").addEventListener("change", () => { G.page = 0; drawGallery(); });
$("prev").addEventListener("click", () => { G.page--; drawGallery(); });
$("next").addEventListener("click", () => { G.page++; drawGallery(); });
$("view").addEventListener("click", () => { $("view").style.display = "none"; });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("view").style.display = "none"; });
"""
