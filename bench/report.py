"""zsad-bench results: the speed-up column, the console summary, and the result files: JSON (everything), CSV (one
row per configuration), a markdown report with the papers' latency table beside ours, and a PNG plot (latency per
image vs batch per backend; the papers' figure as a line only beside a comparable setting). ``replot`` redraws a
PNG from its JSON."""
from __future__ import annotations

import csv
import itertools
import json
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

CSV_FIELDS = ["model", "profile", "backend", "precision", "batch", "concurrency", "dynamic_batching", "image_size",
              "device", "status", "reason", "iters", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "p50_ms_per_image",
              "images_per_s", "speedup_vs_torch_fp32_b1", "gflops_per_image", "achieved_tflops",
              "peak_vram_mb", "nvml_used_mb", "parity_score_max_rel", "parity_map_max_rel", "parity_rank_agreement",
              "parity_map_corr", "parity_score_spearman", "parity_score_swaps", "parity_selection_differing",
              "parity_ok", "stage_ms", "note"]


def add_speedups(rows: list[dict]) -> None:
    """Set ``speedup_vs_torch_fp32_b1`` on every timed row: torch-fp32 batch-1 time per image / the row's."""
    base = next((r for r in rows if r["backend"] == "torch-fp32" and r["batch"] == 1 and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok" and r.get("p50_ms_per_image"):
            r["speedup_vs_torch_fp32_b1"] = base["p50_ms_per_image"] / r["p50_ms_per_image"]


def summary_table(model: str, rows: list[dict]) -> str:
    """The console summary of one model's rows."""
    lines = [f"{model}: {'backend':<14}{'prec':<6}{'batch':>6}{'conc':>6}{'p50 ms':>10}{'ms/img':>10}{'img/s':>9}"
             f"{'x fp32':>8}  parity"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{'':<{len(model) + 2}}{r['backend']:<14}skipped: {r['reason'][:90]}")
            continue
        conc = r.get("concurrency") or ""
        if r.get("dynamic_batching") is False:
            conc = f"{conc}n"
        lines.append(f"{'':<{len(model) + 2}}{r['backend']:<14}{r['precision']:<6}{r['batch']:>6}{conc!s:>6}"
                     f"{r['p50_ms']:>10.2f}{r['p50_ms_per_image']:>10.2f}{r['images_per_s']:>9.2f}"
                     f"{r.get('speedup_vs_torch_fp32_b1', float('nan')):>8.2f}  "
                     + ("ok" if r.get("parity_ok", True) else "FAIL") + f" ({r.get('parity_map_max_rel', 0):.1e})")
    return "\n".join(lines)


def paper_rows() -> list[dict]:
    """The papers' per-method speed figures (variants in brackets, e.g. Bayes-PFL's R sweep, are left out)."""
    from zsad.methods import METHODS
    from zsad.reference import efficiency_rows

    names = {cls.paper_name for cls in METHODS.values() if cls.paper_name}
    return [p for p in efficiency_rows() if p["quantity"] in ("latency_ms", "fps", "it_per_s") and p["method"] in names]


def paper_setting(model: str) -> tuple[str | None, int | None]:
    """(the papers' name of ``model``, their image size for it: the paper profile's), or (None, None) for a method
    in none of the papers. A paper figure is comparable only at that image size."""
    import zsad.methods as M

    paper_name = M.METHODS[model].paper_name if model in M.METHODS else ""
    if not paper_name:
        return None, None
    return paper_name, M.resolve_config(model, "paper").backbone.image_size


def replot(json_path: Path) -> Path:
    """Redraw the PNG and rewrite the .md beside a result JSON from its rows, paper figures and command (as
    ``write_results`` writes them now)."""
    from zsad import ZsadError

    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        raise ZsadError(f"cannot read bench results {json_path}: {err}") from None
    if not isinstance(data, dict) or data.get("schema") != "zsad-bench/1":
        raise ZsadError(f"{json_path} is not a zsad-bench result file (schema zsad-bench/1)")
    paper_name, paper_size = paper_setting(data["model"])
    json_path.with_suffix(".md").write_text(markdown(data["model"], data["profile"], data["rows"], data["environment"],
                                                     data["paper"], data["gflops_per_image"], data["command"]))
    png = json_path.with_suffix(".png")
    if not plot(png, data["model"], data["rows"], [p for p in data["paper"] if p["method"] == paper_name],
                paper_size):
        raise ZsadError("replotting needs matplotlib (pip install matplotlib)")
    return png


def environment(device: str) -> dict:
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "platform": platform.platform(),
           "device": device, "device_name": _device_name(device), "driver": None}
    for mod, dists in (("onnxruntime", ("onnxruntime", "onnxruntime-gpu")), ("triton", ("triton",)),
                       ("tritonclient", ("tritonclient",)), ("open_clip", ("open_clip_torch",))):
        env[mod] = next((v for v in map(_dist_version, dists) if v), None)
    if device.startswith("cuda"):
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            env["driver"] = None
    return env


def _dist_version(dist: str) -> str | None:
    """An installed distribution's version, without importing it (importing open_clip needs torchvision fixed up)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model or platform.processor()} ({torch.get_num_threads()} threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def result_stem(model: str, env: dict, profile: str = "paper") -> str:
    """<date>-<model>-<device>-torch<major.minor>; a non-paper profile is named after the model so runs do not
    overwrite each other."""
    dev = "cpu" if env["device"] == "cpu" else _slug(env["device_name"])
    name = model if profile == "paper" else f"{model}-{_slug(Path(profile).stem)}"
    torch_version = ".".join(env["torch"].split("+")[0].split(".")[:2])
    return f"{env['date'][:10]}-{name}-{dev}-torch{torch_version}"


def write_results(out_dir: Path, model: str, profile: str, rows: list[dict], env: dict, paper: list[dict],
                  flops: dict, command: str, plot_method: str | None = None,
                  paper_image_size: int | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(model, env, profile)
    for n in itertools.count(1):  # an earlier run's files (same day, model, device) are kept: number this run
        name = stem if n == 1 else f"{stem}-{n}"
        paths = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "csv", "md", "png")}
        if not any(p.exists() for p in paths.values()):
            break
    payload = {"schema": "zsad-bench/1", "model": model, "profile": profile, "command": command, "environment": env,
               "gflops_per_image": flops, "rows": rows, "paper": paper}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + ["environment"], extrasaction="ignore")
        w.writeheader()
        envtxt = "; ".join(f"{k}={v}" for k, v in env.items() if k not in ("date",))
        for r in rows:
            w.writerow({**{k: _cell(r.get(k)) for k in CSV_FIELDS}, "environment": envtxt})
    paths["md"].write_text(markdown(model, profile, rows, env, paper, flops, command))
    if not plot(paths["png"], model, rows, [p for p in paper if p["method"] == plot_method], paper_image_size):
        paths.pop("png")
    return paths


def _cell(v):
    """A CSV cell: per-stage dicts as 'stage=value; ...'."""
    return "; ".join(f"{k}={x:.3f}" for k, x in v.items()) if isinstance(v, dict) else v


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(model: str, profile: str, rows: list[dict], env: dict, paper: list[dict], flops: dict,
             command: str) -> str:
    lines = [f"# zsad-bench: {model} ({profile} profile)", "",
             f"`{command}`", "",
             f"Device: {env['device_name']}; driver {env.get('driver') or '-'}; torch {env['torch']} (CUDA "
             f"{env.get('cuda') or '-'}); onnxruntime {env.get('onnxruntime') or '-'}; triton "
             f"{env.get('triton') or '-'}; {env['date']}.", "",
             "GFLOPs per image (analytic, from the stage shapes): "
             + ", ".join(f"{k} {v:.2f}" for k, v in flops.items()), "",
             "## Ours", "",
             "| backend | precision | batch | conc. | p50 ms/batch | p90 | p99 | p50 ms/image | images/s | "
             "speed-up vs torch-fp32 b1 | TFLOP/s | peak VRAM MB | parity (score / map max rel, rank) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            continue
        parity = (f"{_f(r.get('parity_score_max_rel'), '{:.1e}')} / {_f(r.get('parity_map_max_rel'), '{:.1e}')}, "
                  f"{_f(r.get('parity_rank_agreement'), '{:.2f}')}" + ("" if r.get("parity_ok", True) else " FAIL"))
        conc = r.get("concurrency") or "-"
        if r.get("dynamic_batching") is not None:
            conc = f"{conc} ({'dyn. batching' if r['dynamic_batching'] else 'no batching'})"
        lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | {conc} | {_f(r.get('p50_ms'))} | "
                     f"{_f(r.get('p90_ms'))} | {_f(r.get('p99_ms'))} | {_f(r.get('p50_ms_per_image'))} | "
                     f"{_f(r.get('images_per_s'))} | {_f(r.get('speedup_vs_torch_fp32_b1'), '{:.2f}x')} | "
                     f"{_f(r.get('achieved_tflops'), '{:.3f}')} | {_f(r.get('peak_vram_mb'), '{:.0f}')} | {parity} |")
    staged = [r for r in rows if r["status"] == "ok" and r.get("stage_ms")]
    if staged:
        lines += ["", "Per-stage p50 ms (each stage alone on its real inputs; the remainder of the chain's p50 is "
                  "the hand-over between stages):", "",
                  "| backend | batch | chain p50 ms | " + " | ".join(staged[0]["stage_ms"]) + " |",
                  "|---|---|---|" + "---|" * len(staged[0]["stage_ms"])]
        for r in staged:
            lines.append(f"| {r['backend']} | {r['batch']} | {_f(r['p50_ms'])} | "
                         + " | ".join(_f(v) for v in r["stage_ms"].values()) + " |")
    profiled = [r for r in rows if r["status"] == "ok" and r.get("op_ms")]
    if profiled:
        lines += ["", "Inside the stages (OpenVINO's per-node counters, PERF_COUNT, one profiled run of each stage on "
                  "its real inputs): milliseconds per kind of executed node, largest first. \"attention\" is the "
                  "fused attention kernel; FullyConnected the linear layers; the kernel name says the precision.", "",
                  "| backend | batch | stage | profiled ms | where it goes |", "|---|---|---|---|---|"]
        for r in profiled:
            for stage, kinds in r["op_ms"].items():
                total = sum(kinds.values())
                parts = "; ".join(f"{k} {v:.0f} ({100 * v / total:.0f}%)" for k, v in kinds.items()) if total else "-"
                lines.append(f"| {r['backend']} | {r['batch']} | {stage} | {_f(total)} | {parts} |")
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {r['backend']} (batch {r['batch']}): {r['reason']}" for r in skipped]
    why = not_comparable(rows, paper_setting(model)[1])
    lines += ["", "## The papers' figures", "",
              "As printed: single-image latency, batch 1, fp32 PyTorch on the authors' own GPU (often not stated); "
              + (f"not comparable with the rows above ({why})." if why else
                 "our batch-1 torch-fp32 row is the comparable setting."), "",
              "| paper | method | component | quantity | value | image size | hardware | note |",
              "|---|---|---|---|---|---|---|---|"]
    for p in paper:
        lines.append(f"| {p['paper']} | {p['method']} | {p.get('component') or '-'} | {p['quantity']} | {p['value']} "
                     f"| {p.get('image_size') or '-'} | {p.get('hardware') or 'not stated'} "
                     f"| {(p.get('note') or '')[:90]} |")
    return "\n".join(lines) + "\n"


def not_comparable(rows: list[dict], paper_image_size: int | None) -> str:
    """Why our timed rows are not the papers' setting (the paper profile at the papers' image size on a GPU), or
    "" when they are. The papers' latency figures are fp32 single-image times on the authors' GPUs."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "no timed rows"
    why = sorted({f"{r.get('profile')} profile" for r in ok if r.get("profile") != "paper"})
    why += sorted({f"{r.get('image_size')} px" for r in ok
                   if paper_image_size is None or r.get("image_size") != paper_image_size})
    if any(not str(r.get("device", "")).startswith("cuda") for r in ok):
        why.append("CPU")
    return ", ".join(why)


def plot(path: Path, model: str, rows: list[dict], paper: list[dict], paper_image_size: int | None = None) -> bool:
    fig = plot_figure(model, rows, paper, paper_image_size)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_figure(model: str, rows: list[dict], paper: list[dict], paper_image_size: int | None = None):
    """Latency per image vs batch per backend; the papers' whole-model latency as a line only where our rows are
    their setting (``not_comparable``), else named in the title as not comparable. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    timed = [r for r in rows if r["status"] == "ok" and r["backend"] != "served"]
    for backend in dict.fromkeys(r["backend"] for r in timed):
        pts = sorted((r["batch"], r["p50_ms_per_image"]) for r in timed if r["backend"] == backend)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
    served = [r for r in rows if r["status"] == "ok" and r["backend"] == "served" and r.get("images_per_s")]
    for dyn in (True, False):
        pts = sorted((r["concurrency"], 1000.0 / r["images_per_s"]) for r in served if r["dynamic_batching"] is dyn)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", linestyle="--",
                    label=f"served ({'dyn. batching' if dyn else 'no batching'}), x = concurrency, 1/throughput")
    title = f"zsad-bench: {model}"
    paper_latency = [p for p in paper if p["quantity"] == "latency_ms" and not p.get("component")]
    why = not_comparable(rows, paper_image_size) if paper_latency else ""
    if why:
        shown = ", ".join(f"{p['value']} ms" for p in paper_latency)
        title += f"\npaper latency ({shown}, GPU) not comparable: ours is {why}"
    for p in [] if why else paper_latency:  # a paper line only beside our comparable rows
        ax.axhline(p["value"], color="grey", linewidth=0.8, linestyle=":", gid="paper")
        ax.text(1, p["value"], f" {p['method']} (paper) {p['value']} ms", fontsize=7, va="bottom", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency per image (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
