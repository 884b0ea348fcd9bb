"""zsad-bench's browser pages, on the one report framework (zsad.report_page): the report of a run
(``<stem>.html`` beside its .json / .csv / .md / .png) and ``zsad-bench --compare A.json B.json`` (two earlier runs
side by side, the speed-up per configuration both timed; runs nothing).

The run page holds latency per image and throughput against batch per backend and precision (and the served
sweep against concurrency) as SVG plots drawn from the rows, the sortable table of the .md (the same cells:
``report.ours_cells``), the per-stage and per-op breakdowns, the papers' figures with the .md's verdict on whether
they are comparable (``report.papers_note``; a paper line in the plot only where they are), and the machine and
versions.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from zsad import ZsadError
from zsad.bench.report import load_result, numbered_paths
from zsad.report_page import page, table

ENV_KEYS = ["date", "device", "device_name", "driver", "torch", "cuda", "python", "platform", "onnxruntime", "triton",
            "tritonclient", "open_clip"]


# ------------------------------------------------------------------------------------------- the plots' data
def _axis(values: list[float], log: bool) -> tuple[float, float, list[float]]:
    """(low, high, ticks) of an axis holding ``values``: on a log axis 1-2-5 steps (only the powers of ten where those
    are many) inside, else 0 to max."""
    lo, hi = min(values), max(values)
    if not log:
        hi = hi * 1.05 or 1.0
        return 0.0, hi, [0.0, hi / 2, hi]
    lo, hi = lo / 1.3, hi * 1.3
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0 ** k for k in decades for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
    if len(ticks) > 8:
        ticks = [t for t in ticks if math.log10(t).is_integer()]
    return lo, hi, ticks or [lo, hi]


def _line_plot(plot_id: str, title: str, series: list[dict], xl: str, yl: str, logy: bool = True,
               hlines: list[dict] | None = None) -> dict | None:
    xs = [x for s in series for x in s["xs"]]
    ys = [y for s in series for y in s["ys"]] + [h["y"] for h in hlines or []]
    if not xs:
        return None
    xlo, xhi = min(xs) / 1.2, max(xs) * 1.2
    ylo, yhi, yticks = _axis(ys, logy)
    return {"id": plot_id, "title": title, "series": series,
            "o": {"xl": xl, "yl": yl, "logx": True, "logy": logy, "lo": [xlo, ylo], "hi": [xhi, yhi], "wide": True,
                  "xticks": sorted(set(xs)), "yticks": yticks, "hlines": hlines or []}}


def plots(data: dict) -> list[dict]:
    """The run page's plots: per backend and precision, p50 ms per image and images/s against the batch; the served
    sweep's images/s against concurrency. The papers' whole-model latency is a line only where comparable."""
    from zsad.bench.report import not_comparable, paper_setting

    rows = [r for r in data["rows"] if r["status"] == "ok"]
    timed = [r for r in rows if r["backend"] != "served" and r.get("p50_ms_per_image")]
    keys = list(dict.fromkeys((r["backend"], r["precision"]) for r in timed))

    def series(value: str) -> list[dict]:
        out = []
        for b, p in keys:
            pts = sorted((r["batch"], r[value]) for r in timed if (r["backend"], r["precision"]) == (b, p))
            out.append({"name": f"{b} ({p})", "xs": [x for x, _ in pts], "ys": [y for _, y in pts]})
        return out

    paper_name, paper_size = paper_setting(data["model"])
    latency = [p for p in data.get("paper", []) if p["method"] == paper_name and p["quantity"] == "latency_ms"
               and not p.get("component")]
    hlines = [] if not_comparable(data["rows"], paper_size) else [
        {"y": p["value"], "label": f"{p['method']} (paper) {p['value']} ms"} for p in latency]
    out = [_line_plot("latency", "p50 latency per image", series("p50_ms_per_image"), "batch", "ms / image",
                      hlines=hlines),
           _line_plot("throughput", "throughput", series("images_per_s"), "batch", "images / s")]
    served = [r for r in rows if r["backend"] == "served" and r.get("images_per_s") and r.get("concurrency")]
    sweep = []
    for dyn in (True, False):
        pts = sorted((r["concurrency"], r["images_per_s"]) for r in served if r.get("dynamic_batching") is dyn)
        if pts:
            sweep.append({"name": f"served, {'dyn. batching' if dyn else 'no batching'}", "xs": [x for x, _ in pts],
                          "ys": [y for _, y in pts]})
    out.append(_line_plot("served", "served throughput", sweep, "concurrent requests", "images / s"))
    return [p for p in out if p is not None]


# ------------------------------------------------------------------------------------------- the run page
def _env_table(envs: list[dict], names: list[str]) -> str:
    esc = html.escape
    keys = [k for k in ENV_KEYS if any(k in e for e in envs)] + sorted({k for e in envs for k in e} - set(ENV_KEYS))
    head = "".join(f"<th>{esc(n)}</th>" for n in ["", *names])
    body = "".join(f"<tr><td>{esc(k)}</td>" + "".join(f"<td>{esc(str(e.get(k, '-')))}</td>" for e in envs) + "</tr>"
                   for k in keys)
    return f'<table id="env"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _stage_tables(rows: list[dict]) -> str:
    """The per-stage and per-op breakdowns (as in the .md)."""
    from zsad.bench.report import cell_text

    out = []
    staged = [r for r in rows if r["status"] == "ok" and r.get("stage_ms")]
    if staged:
        stages = list(staged[0]["stage_ms"])
        out.append("<h2>Per stage</h2><p class=\"note\">p50 ms of each stage alone on its real inputs; the remainder "
                   "of the chain's p50 is the hand-over between stages.</p>")
        out.append(table("stages", ["backend", "batch", "chain p50 ms", *stages],
                         [[r["backend"], r["batch"], (cell_text(r["p50_ms"]), r["p50_ms"]),
                           *((cell_text(r["stage_ms"].get(s)), r["stage_ms"].get(s, "")) for s in stages)]
                          for r in staged]))
    profiled = [r for r in rows if r["status"] == "ok" and r.get("op_ms")]
    if profiled:
        out.append("<h2>Inside the stages</h2><p class=\"note\">OpenVINO's per-node counters (PERF_COUNT, the median "
                   "of three profiled runs of each stage on its real inputs): milliseconds per kind of executed node, "
                   "largest first.</p>")
        op_rows = []
        for r in profiled:
            for stage, kinds in r["op_ms"].items():
                total = sum(kinds.values())
                parts = "; ".join(f"{k} {v:.0f} ({100 * v / total:.0f}%)" for k, v in kinds.items()) if total else "-"
                op_rows.append([r["backend"], r["batch"], stage, (cell_text(total), total), parts])
        out.append(table("ops", ["backend", "batch", "stage", "profiled ms", "where it goes"], op_rows))
    return "\n".join(out)


def _paper_table(data: dict) -> str:
    rows = [[p["paper"], p["method"], p.get("component") or "-", p["quantity"], p["value"], p.get("image_size") or "-",
             p.get("hardware") or "not stated", (p.get("note") or "")[:120]] for p in data.get("paper", [])]
    return table("paper", ["paper", "method", "component", "quantity", "value", "image size", "hardware", "note"],
                 rows)


def bench_page(data: dict) -> str:
    """The run page of a zsad-bench result (the JSON's content)."""
    from zsad.bench.report import OURS_HEADERS, ours_cells, papers_note

    esc = html.escape
    rows = data["rows"]
    skipped = [r for r in rows if r["status"] != "ok"]
    flops = ", ".join(f"{k} {v:.2f}" for k, v in (data.get("gflops_per_image") or {}).items())
    body = (f'<div class="cmd">{esc(data.get("command") or "")}</div>'
            f"<p>{esc(data['model'])}, {esc(str(data['profile']))} profile, on "
            f"{esc(str(data['environment'].get('device_name')))}. GFLOPs per image (analytic): {esc(flops) or '-'}. "
            "Timings on a shared machine vary from run to run: compare runs made on the same machine.</p>"
            '<h2>Plots</h2><div class="plots" id="plots"></div>'
            "<h2>Ours (click a header to sort)</h2>"
            + table("bench", OURS_HEADERS, [ours_cells(r) for r in rows if r["status"] == "ok"])
            + _stage_tables(rows)
            + ("<h2>Skipped</h2><ul>" + "".join(f"<li>{esc(r['backend'])} (batch {r['batch']}): {esc(r['reason'])}"
                                                "</li>" for r in skipped) + "</ul>" if skipped else "")
            + f"<h2>The papers' figures</h2><p id=\"papers-note\">{esc(papers_note(data['model'], rows))}</p>"
            + _paper_table(data)
            + "<h2>Machine and versions</h2>" + _env_table([data["environment"]], ["this run"]))
    return page(f"zsad-bench: {data['model']} ({data['profile']} profile)", body, {"plots": plots(data)},
                [_PLOTS_JS])


_PLOTS_JS = r"""
for (const p of D.plots) $("plots").appendChild(plot(p.id, p.title, p.series, p.o));
"""


def write_page(json_path: Path) -> Path:
    """<stem>.html beside a result JSON (zsad-bench after a run, and --replot)."""
    json_path = Path(json_path)
    path = json_path.with_suffix(".html")
    path.write_text(bench_page(load_result(json_path)))
    return path


# ------------------------------------------------------------------------------------------- --compare
def _key(r: dict) -> tuple:
    """What makes two rows the same configuration."""
    return (r.get("profile"), r.get("image_size"), r["backend"], r["precision"], r["batch"], r.get("concurrency"),
            r.get("dynamic_batching"))


def compare(a: dict, b: dict) -> list[dict]:
    """The configurations timed in both runs, with B's speed-up over A (A's p50 ms per image / B's: above 1, B is
    faster), in A's order."""
    if a["model"] != b["model"]:
        raise ZsadError(f"the two results time different methods ({a['model']} and {b['model']}): compare runs of "
                        "one method")
    ok_b = {_key(r): r for r in b["rows"] if r["status"] == "ok" and r.get("p50_ms_per_image")}
    out = []
    for r in a["rows"]:
        other = ok_b.get(_key(r))
        if r["status"] != "ok" or not r.get("p50_ms_per_image") or other is None:
            continue
        out.append({"profile": r.get("profile"), "image_size": r.get("image_size"), "backend": r["backend"],
                    "precision": r["precision"], "batch": r["batch"], "concurrency": r.get("concurrency"),
                    "dynamic_batching": r.get("dynamic_batching"),
                    "a_ms_per_image": r["p50_ms_per_image"], "b_ms_per_image": other["p50_ms_per_image"],
                    "a_images_per_s": r.get("images_per_s"), "b_images_per_s": other.get("images_per_s"),
                    "speedup": r["p50_ms_per_image"] / other["p50_ms_per_image"]})
    if not out:
        raise ZsadError("the two results have no timed configuration in common (same profile, image size, backend, "
                        "precision, batch and concurrency)")
    return out


def _conc(r: dict) -> str:
    conc = r.get("concurrency") or "-"
    if r.get("dynamic_batching") is not None:
        conc = f"{conc} ({'dyn. batching' if r['dynamic_batching'] else 'no batching'})"
    return str(conc)


_COMPARE_HEADERS = ["backend", "precision", "batch", "conc.", "profile", "image size", "A p50 ms/image",
                    "B p50 ms/image", "A images/s", "B images/s", "speed-up B over A"]


def _compare_cells(c: dict) -> list[tuple[str, object]]:
    from zsad.bench.report import cell_text

    return [(c["backend"], c["backend"]), (c["precision"], c["precision"]), (str(c["batch"]), c["batch"]),
            (_conc(c), c.get("concurrency") or ""), (str(c["profile"]), str(c["profile"])),
            (str(c["image_size"]), c["image_size"]),
            (cell_text(c["a_ms_per_image"], "{:.3f}"), c["a_ms_per_image"]), (cell_text(c["b_ms_per_image"], "{:.3f}"),
                                                                      c["b_ms_per_image"]),
            (cell_text(c["a_images_per_s"]), c["a_images_per_s"] or ""),
            (cell_text(c["b_images_per_s"]), c["b_images_per_s"] or ""),
            (f"{c['speedup']:.3f}x", c["speedup"])]


def _unmatched(a: dict, b: dict) -> tuple[list[dict], list[dict]]:
    keys_a = {_key(r) for r in a["rows"] if r["status"] == "ok"}
    keys_b = {_key(r) for r in b["rows"] if r["status"] == "ok"}
    return ([r for r in a["rows"] if r["status"] == "ok" and _key(r) not in keys_b],
            [r for r in b["rows"] if r["status"] == "ok" and _key(r) not in keys_a])


def compare_markdown(a: dict, b: dict, names: tuple[str, str], rows: list[dict]) -> str:
    only_a, only_b = _unmatched(a, b)
    lines = [f"# zsad-bench --compare: {a['model']}", "", f"A: `{names[0]}` ({a['environment'].get('device_name')}, "
             f"torch {a['environment'].get('torch')}, {a['environment'].get('date')})",
             f"B: `{names[1]}` ({b['environment'].get('device_name')}, torch {b['environment'].get('torch')}, "
             f"{b['environment'].get('date')})", "",
             "Speed-up = A's p50 ms per image / B's (above 1: B is faster). Timings from two runs: a difference of a "
             "few percent is within run-to-run noise on a shared machine.", "",
             "| " + " | ".join(_COMPARE_HEADERS) + " |", "|---" * len(_COMPARE_HEADERS) + "|"]
    lines += ["| " + " | ".join(t for t, _ in _compare_cells(c)) + " |" for c in rows]
    for label, only in (("A", only_a), ("B", only_b)):
        if only:
            lines += ["", f"Timed only in {label}: " + "; ".join(
                f"{r['backend']} ({r['precision']}) batch {r['batch']} conc. {_conc(r)}" for r in only)]
    return "\n".join(lines) + "\n"


def compare_page(a: dict, b: dict, names: tuple[str, str], rows: list[dict]) -> str:
    esc = html.escape
    only_a, only_b = _unmatched(a, b)
    lists = "".join(f"<p>Timed only in {label}: " + esc("; ".join(
        f"{r['backend']} ({r['precision']}) batch {r['batch']} conc. {_conc(r)}" for r in only)) + "</p>"
        for label, only in (("A", only_a), ("B", only_b)) if only)
    body = (f"<p>A: <span class=\"cmd\">{esc(names[0])}</span><br>B: <span class=\"cmd\">{esc(names[1])}</span></p>"
            "<p>Speed-up = A's p50 ms per image / B's (above 1: B is faster). Timings from two runs: a difference of "
            "a few percent is within run-to-run noise on a shared machine. Click a header to sort.</p>"
            + table("compare", _COMPARE_HEADERS, [_compare_cells(c) for c in rows]) + lists
            + "<h2>Commands</h2>" + _env_table([{"command": a.get("command")}, {"command": b.get("command")}],
                                                ["A", "B"])
            + "<h2>Machine and versions</h2>" + _env_table([a["environment"], b["environment"]], ["A", "B"]))
    return page(f"zsad-bench --compare: {a['model']}", body, {"rows": rows}, [])


def write_compare(out_dir: Path, path_a: Path, path_b: Path) -> dict[str, Path]:
    """compare-<A>-vs-<B>.html / .md in ``out_dir`` (numbered when taken: nothing is overwritten)."""
    a, b = load_result(path_a), load_result(path_b)
    rows = compare(a, b)
    names = (str(path_a), str(path_b))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = numbered_paths(out_dir, f"compare-{Path(path_a).stem}-vs-{Path(path_b).stem}", ("html", "md"))
    paths["md"].write_text(compare_markdown(a, b, names, rows))
    paths["html"].write_text(compare_page(a, b, names, rows))
    return paths
