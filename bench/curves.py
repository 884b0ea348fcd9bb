"""``zsad-bench --curves A.json B.json ...``: how the cost grows with the work, from earlier zsad-bench runs.

Runs nothing. From result files of one machine (any methods, image sizes, batches, backends, served sweeps) it draws
three panels and writes their points as a table:

1. p50 latency per image vs batch size, one line per (method, image size, backend);
2. p50 latency per image vs image size at batch 1, one line per (method, backend) timed at two sizes or more;
3. served images/s vs concurrency, one line per (method, image size, batching, OpenVINO hint).

Files: <date>-curves-<methods>.json / .csv / .md / .png in --out (numbered past earlier ones). Results from
different CPUs or GPUs are refused: a curve across machines would mix their speeds.
"""
from __future__ import annotations

import csv
import json
from datetime import date
from pathlib import Path

from zsad import ZsadError

FIELDS = ["panel", "model", "image_size", "backend", "precision", "batch", "concurrency", "dynamic_batching", "ov_hint",
          "p50_ms_per_image", "images_per_s", "p50_ms", "source"]


def curve_points(results: list[tuple[str, dict]]) -> list[dict]:
    """The points of the three panels from (file name, result) pairs: rows of status ok only."""
    points: list[dict] = []
    for source, data in results:
        for r in data["rows"]:
            if r.get("status") != "ok":
                continue
            common = {"model": r["model"], "image_size": r["image_size"], "backend": r["backend"],
                      "precision": r.get("precision"), "source": source}
            if r["backend"] == "served":
                points.append({**common, "panel": "served", "concurrency": r["concurrency"],
                               "dynamic_batching": r.get("dynamic_batching"), "ov_hint": r.get("ov_hint"),
                               "images_per_s": r["images_per_s"], "p50_ms": r["p50_ms"]})
            else:
                points.append({**common, "panel": "batch", "batch": r["batch"],
                               "p50_ms_per_image": r["p50_ms_per_image"], "images_per_s": r["images_per_s"]})
    sizes: dict[tuple, list[dict]] = {}
    for p in points:
        if p["panel"] == "batch" and p["batch"] == 1:
            sizes.setdefault((p["model"], p["backend"]), []).append(p)
    for group in sizes.values():
        if len({p["image_size"] for p in group}) > 1:
            points += [{**p, "panel": "size"} for p in group]
    return points


def _machine(data: dict) -> str:
    env = data["environment"]
    return f"{env.get('device_name')} ({env.get('device')})"


def load_results(paths: list[Path]) -> list[tuple[str, dict]]:
    """(file name, result) per path; one machine only (a one-line ZsadError otherwise)."""
    from zsad.bench.report import load_result

    results = [(Path(p).name, load_result(Path(p))) for p in paths]
    machines = {_machine(d) for _, d in results}
    if len(machines) > 1:
        raise ZsadError("--curves draws results of one machine; these come from " + "; ".join(sorted(machines)))
    return results


def write_curves(out_dir: Path, paths: list[Path]) -> dict[str, Path]:
    from zsad.bench.report import numbered_paths

    results = load_results(paths)
    points = curve_points(results)
    if not points:
        raise ZsadError("none of the given results has a timed row (status ok) to draw")
    models = "-".join(dict.fromkeys(d["model"] for _, d in results))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = numbered_paths(out_dir, f"{date.today().isoformat()}-curves-{models}", ("json", "csv", "md", "png"))
    machine = _machine(results[0][1])
    files["json"].write_text(json.dumps({"schema": "zsad-bench-curves/1", "machine": machine,
                                         "sources": [s for s, _ in results], "points": points}, indent=2))
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(points)
    files["md"].write_text(curves_markdown(points, machine, [s for s, _ in results]))
    fig = curves_figure(points, machine)
    if fig is None:
        files.pop("png")
    else:
        import matplotlib.pyplot as plt

        fig.savefig(files["png"], dpi=120)
        plt.close(fig)
    return files


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def curves_markdown(points: list[dict], machine: str, sources: list[str]) -> str:
    lines = [f"# Cost as the work grows ({machine})", "",
             "From the zsad-bench results " + ", ".join(f"`{s}`" for s in sources) + " (their .md files give each "
             "run's command, machine, versions and parity). p50 latency per image: a batch's p50 over its images.", ""]
    batch = [p for p in points if p["panel"] == "batch"]
    if batch:
        lines += ["## Latency per image vs batch", "", "| method | image size | backend | precision | batch | "
                  "p50 ms / image | images/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['model']} | {p['image_size']} | {p['backend']} | {p['precision']} | {p['batch']} | "
                  f"{_num(p['p50_ms_per_image'])} | {_num(p['images_per_s'], '{:.2f}')} |"
                  for p in sorted(batch, key=lambda p: (p["model"], p["image_size"], p["backend"], p["batch"]))]
        lines.append("")
    size = [p for p in points if p["panel"] == "size"]
    if size:
        lines += ["## Latency per image vs image size (batch 1)", "",
                  "| method | backend | image size | p50 ms / image |", "|---|---|---|---|"]
        lines += [f"| {p['model']} | {p['backend']} | {p['image_size']} | {_num(p['p50_ms_per_image'])} |"
                  for p in sorted(size, key=lambda p: (p["model"], p["backend"], p["image_size"]))]
        lines.append("")
    served = [p for p in points if p["panel"] == "served"]
    if served:
        lines += ["## Served throughput vs concurrency", "", "| method | image size | precision | dynamic batching | "
                  "OpenVINO hint | concurrency | images/s | p50 ms |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['model']} | {p['image_size']} | {p['precision']} | {p['dynamic_batching']} | "
                  f"{p['ov_hint'] or '-'} | {p['concurrency']} | {_num(p['images_per_s'], '{:.2f}')} | "
                  f"{_num(p['p50_ms'])} |"
                  for p in sorted(served, key=lambda p: (p["model"], p["image_size"], str(p["dynamic_batching"]),
                                                         str(p["ov_hint"]), p["concurrency"]))]
        lines.append("")
    return "\n".join(lines)


def curves_figure(points: list[dict], machine: str):
    """The three panels (those with points); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [name for name in ("batch", "size", "served") if any(p["panel"] == name for p in points)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        mine = [p for p in points if p["panel"] == name]
        if name == "batch":
            key, x, y = (lambda p: f"{p['model']} {p['image_size']}px {p['backend']}"), "batch", "p50_ms_per_image"
            ax.set(xlabel="batch size", ylabel="p50 latency per image (ms)", title="latency per image vs batch")
            ax.set_xscale("log", base=2)
        elif name == "size":
            key, x, y = (lambda p: f"{p['model']} {p['backend']}"), "image_size", "p50_ms_per_image"
            ax.set(xlabel="image size (px)", ylabel="p50 latency per image (ms)", title="vs image size, batch 1")
        else:
            def key(p):
                batching = "dyn. batching" if p["dynamic_batching"] else "no batching"
                return f"{p['model']} {p['image_size']}px {batching}" + (f" {p['ov_hint']}" if p["ov_hint"] else "")
            x, y = "concurrency", "images_per_s"
            ax.set(xlabel="requests in flight", ylabel="images/s", title="served throughput vs concurrency")
            ax.set_xscale("log", base=2)
        for label in dict.fromkeys(key(p) for p in mine):
            pts = sorted((p[x], p[y]) for p in mine if key(p) == label)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"zsad-bench: cost as the work grows, {machine}", fontsize=9)
    fig.tight_layout()
    return fig
