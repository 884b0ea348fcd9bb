"""zsad-bench results: the speed-up column, the console summary, and the result files: JSON (everything), CSV (one
row per configuration), a markdown report with the papers' latency table beside ours, a PNG plot (latency per
image vs batch per backend; the papers' figure as a line only beside a comparable setting) and the browser report
(.html: zsad.bench.html_report, written from the JSON). ``replot`` redraws the PNG and the .md from the JSON."""
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
              "images_per_s", "speedup_vs_torch_fp32_b1", "speedup_vs_best_torch", "best_torch", "gflops_per_image",
              "achieved_tflops", "peak_tflops", "peak_isa", "efficiency", "peak_rss_mb", "worker_pid", "peak_vram_mb",
              "nvml_used_mb", "parity_score_max_rel", "parity_map_max_rel", "parity_rank_agreement",
              "parity_map_corr", "parity_score_spearman", "parity_score_swaps", "parity_selection_differing",
              "parity_ok", "stage_ms", "note"]


def add_speedups(rows: list[dict]) -> None:
    """Set on every timed row ``speedup_vs_torch_fp32_b1`` (torch-fp32 eager batch-1 time per image / the row's)
    and ``speedup_vs_best_torch`` (the fastest plain-torch row's time per image at the row's batch / the row's;
    ``best_torch`` names it). Plain torch: eager, autocast or torch.compile (``PLAIN_TORCH``), what a user gets
    from torch alone; only rows that passed their parity check compete."""
    from zsad.export.runtimes.python_torch import PLAIN_TORCH

    ok = [r for r in rows if r["status"] == "ok" and r.get("p50_ms_per_image")]
    base = next((r for r in ok if r["backend"] == "torch-fp32" and r["batch"] == 1), None)
    best: dict[int, dict] = {}
    for r in ok:
        if r["backend"] in PLAIN_TORCH and r.get("parity_ok", True) and (
                r["batch"] not in best or r["p50_ms_per_image"] < best[r["batch"]]["p50_ms_per_image"]):
            best[r["batch"]] = r
    for r in ok:
        if base:
            r["speedup_vs_torch_fp32_b1"] = base["p50_ms_per_image"] / r["p50_ms_per_image"]
        if r["batch"] in best:
            r["speedup_vs_best_torch"] = best[r["batch"]]["p50_ms_per_image"] / r["p50_ms_per_image"]
            r["best_torch"] = best[r["batch"]]["backend"]


def add_efficiency(rows: list[dict], cpu) -> None:
    """Set on every timed row with an achieved rate ``peak_tflops`` (``cpu``'s peak for the row's precision:
    physical cores x the rate one core sustains in its best ISA for it, measured or from the table, zsad.cpu),
    ``peak_isa`` and ``efficiency`` (achieved / peak)."""
    for r in rows:
        if r["status"] == "ok" and r.get("achieved_tflops") is not None:
            peak, isa = cpu.peak_tflops(r["precision"])
            r["peak_tflops"], r["peak_isa"] = peak, isa
            r["efficiency"] = r["achieved_tflops"] / peak if peak else None


def summary_table(model: str, rows: list[dict]) -> str:
    """The console summary of one model's rows."""
    lines = [f"{model}: {'backend':<14}{'prec':<6}{'batch':>6}{'conc':>6}{'p50 ms':>10}{'ms/img':>10}{'img/s':>9}"
             f"{'x fp32':>8}{'x torch':>8}{'RSS MB':>8}  parity"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{'':<{len(model) + 2}}{r['backend']:<14}skipped: {r['reason'][:90]}")
            continue
        conc = r.get("concurrency") or ""
        if r.get("dynamic_batching") is False:
            conc = f"{conc}n"
        lines.append(f"{'':<{len(model) + 2}}{r['backend']:<14}{r['precision']:<6}{r['batch']:>6}{conc!s:>6}"
                     f"{r['p50_ms']:>10.2f}{r['p50_ms_per_image']:>10.2f}{r['images_per_s']:>9.2f}"
                     f"{r.get('speedup_vs_torch_fp32_b1', float('nan')):>8.2f}"
                     f"{r.get('speedup_vs_best_torch', float('nan')):>8.2f}"
                     f"{r.get('peak_rss_mb') or float('nan'):>8.0f}  "
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


def load_result(path: Path) -> dict:
    """A zsad-bench result JSON (schema zsad-bench/1), or a one-line ZsadError saying why not."""
    from zsad import ZsadError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ZsadError(f"cannot read bench results {path}: {err}") from None
    if not isinstance(data, dict) or data.get("schema") != "zsad-bench/1" or not isinstance(data.get("rows"), list):
        raise ZsadError(f"{path} is not a zsad-bench result file (schema zsad-bench/1; a forecast or another "
                        "file cannot be compared)")
    return data


def replot(json_path: Path) -> Path:
    """Redraw the PNG and rewrite the .md beside a result JSON from its rows, paper figures and command (as
    ``write_results`` writes them now; the .html: ``zsad.bench.html_report.write_page``)."""
    from zsad import ZsadError

    json_path = Path(json_path)
    data = load_result(json_path)
    paper_name, paper_size = paper_setting(data["model"])
    json_path.with_suffix(".md").write_text(markdown(data["model"], data["profile"], data["rows"], data["environment"],
                                                     data["paper"], data["gflops_per_image"], data["command"]))
    png = json_path.with_suffix(".png")
    if not plot(png, data["model"], data["rows"], [p for p in data["paper"] if p["method"] == paper_name],
                paper_size):
        raise ZsadError("replotting needs matplotlib (pip install matplotlib)")
    return png


def environment(device: str) -> dict:
    from zsad.cpu import read_cpu

    cpu = read_cpu(measure=not device.startswith("cuda"))
    env: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "platform": platform.platform(),
           "device": device, "device_name": _device_name(device, cpu), "driver": None}
    for mod, dists in (("onnxruntime", ("onnxruntime", "onnxruntime-gpu")), ("triton", ("triton",)),
                       ("tritonclient", ("tritonclient",)), ("open_clip", ("open_clip_torch",))):
        env[mod] = next((v for v in map(_dist_version, dists) if v), None)
    if not device.startswith("cuda"):
        env["cpu"] = cpu.summary()  # ISA, cores, clock and the peaks the efficiency column divides by
    else:
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


def _device_name(device: str, cpu) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = cpu.model
    return f"CPU {model if model != 'unknown' else platform.processor()} ({torch.get_num_threads()} threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def numbered_paths(out_dir: Path, stem: str, exts: tuple[str, ...]) -> dict[str, Path]:
    """{ext: out_dir/<stem>.<ext>}, or <stem>-2, -3, ...: the first number none of whose files exist, so an earlier
    run's files (same day, same name) are kept, never overwritten."""
    for n in itertools.count(1):
        name = stem if n == 1 else f"{stem}-{n}"
        paths = {ext: out_dir / f"{name}.{ext}" for ext in exts}
        if not any(p.exists() for p in paths.values()):
            return paths
    raise AssertionError("unreachable")


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
    """<stem>.json / .csv / .md / .png in ``out_dir``, numbered past an earlier run's files (its .html included,
    which ``zsad.bench.html_report.write_page`` writes from the JSON)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = numbered_paths(out_dir, result_stem(model, env, profile), ("json", "csv", "md", "png", "html"))
    paths.pop("html")  # kept free for zsad.bench.html_report.write_page
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


def cell_text(v, fmt="{:.2f}") -> str:
    """A table cell (the .md and the .html): the value formatted, or - where there is none."""
    return "-" if v is None else fmt.format(v)


def _pct(v):
    return None if v is None else 100.0 * v


def _cpu_lines(env: dict) -> list[str]:
    """The CPU the rows ran on and the peaks the "% of peak" column divides by (zsad.cpu), for a CPU run."""
    cpu = env.get("cpu")
    if not cpu:
        return []
    how = cpu.get("peak_measured", {})
    peaks = ", ".join(f"{p} {cpu['peak_tflops'][p]:.3f} ({cpu['peak_isa'][p]}, {'measured' if how.get(p) else 'table'})"
                      for p in cpu["peak_tflops"])
    return [f"CPU: {cpu['model']} ({cpu['vendor']}), {cpu['physical_cores']} physical cores at {cpu['mhz']:.0f} MHz "
            f"({cpu['mhz_source']}); ISA flags {' '.join(cpu['isa_flags']) or 'none of note'}"
            + (f" ({cpu['isa_cap']})" if cpu.get("isa_cap") else "") + ". Peak TFLOP/s "
            f"(physical cores x what one core sustains in the best ISA for the precision with every core busy: "
            f"measured by zsad/cpu_probe.py, or clock x zsad/cpu.py's operations per cycle, an upper bound; "
            f"int8-bf16 against int8): {peaks}. Speed-ups against the best plain-torch row (eager, autocast "
            f"or torch.compile) compare rows of the same batch.", ""]


OURS_HEADERS = ["backend", "precision", "batch", "conc.", "p50 ms/batch", "p90", "p99", "p50 ms/image", "images/s",
                "speed-up vs torch-fp32 b1", "vs best plain torch", "TFLOP/s", "% of peak (ISA)", "peak VRAM MB",
                "worker peak RSS MB", "parity (score / map max rel, rank)"]


def ours_cells(r: dict) -> list[tuple[str, object]]:
    """One timed row as (shown text, sort value) per column of OURS_HEADERS (the .md and the .html's table)."""
    parity = (f"{cell_text(r.get('parity_score_max_rel'), '{:.1e}')} / "
              f"{cell_text(r.get('parity_map_max_rel'), '{:.1e}')}, "
              f"{cell_text(r.get('parity_rank_agreement'), '{:.2f}')}" + ("" if r.get("parity_ok", True) else " FAIL"))
    conc = r.get("concurrency") or "-"
    if r.get("dynamic_batching") is not None:
        conc = f"{conc} ({'dyn. batching' if r['dynamic_batching'] else 'no batching'})"

    def num(key, fmt="{:.2f}"):
        v = r.get(key)
        return cell_text(v, fmt), "" if v is None else v

    return [(r["backend"], r["backend"]), (r["precision"], r["precision"]), (str(r["batch"]), r["batch"]),
            (str(conc), r.get("concurrency") or ""), num("p50_ms"), num("p90_ms"), num("p99_ms"),
            num("p50_ms_per_image"), num("images_per_s"), num("speedup_vs_torch_fp32_b1", "{:.2f}x"),
            (f"{cell_text(r.get('speedup_vs_best_torch'), '{:.2f}x')} {r.get('best_torch') or ''}".rstrip(),
             "" if r.get("speedup_vs_best_torch") is None else r["speedup_vs_best_torch"]),
            num("achieved_tflops", "{:.3f}"),
            (f"{cell_text(_pct(r.get('efficiency')), '{:.1f}%')} {r.get('peak_isa') or ''}".rstrip(),
             "" if r.get("efficiency") is None else r["efficiency"]),
            num("peak_vram_mb", "{:.0f}"), num("peak_rss_mb", "{:.0f}"),
            (parity, r.get("parity_map_max_rel") if r.get("parity_map_max_rel") is not None else "")]


def papers_note(model: str, rows: list[dict]) -> str:
    """What the papers' figures are and whether our rows are their setting (``not_comparable``)."""
    why = not_comparable(rows, paper_setting(model)[1])
    return ("As printed: single-image latency, batch 1, fp32 PyTorch on the authors' own GPU (often not stated); "
            + (f"not comparable with the rows above ({why})." if why else
               "our batch-1 torch-fp32 row is the comparable setting."))


def markdown(model: str, profile: str, rows: list[dict], env: dict, paper: list[dict], flops: dict,
             command: str) -> str:
    lines = [f"# zsad-bench: {model} ({profile} profile)", "",
             f"`{command}`", "",
             f"Device: {env['device_name']}; driver {env.get('driver') or '-'}; torch {env['torch']} (CUDA "
             f"{env.get('cuda') or '-'}); onnxruntime {env.get('onnxruntime') or '-'}; triton "
             f"{env.get('triton') or '-'}; {env['date']}.", "",
             "GFLOPs per image (analytic, from the stage shapes): "
             + ", ".join(f"{k} {v:.2f}" for k, v in flops.items()), "", *_cpu_lines(env),
             "## Ours", "",
             "| " + " | ".join(OURS_HEADERS) + " |", "|---" * len(OURS_HEADERS) + "|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append("| " + " | ".join(text for text, _ in ours_cells(r)) + " |")
    staged = [r for r in rows if r["status"] == "ok" and r.get("stage_ms")]
    if staged:
        lines += ["", "Per-stage p50 ms (each stage alone on its real inputs; the remainder of the chain's p50 is "
                  "the hand-over between stages):", "",
                  "| backend | batch | chain p50 ms | " + " | ".join(staged[0]["stage_ms"]) + " |",
                  "|---|---|---|" + "---|" * len(staged[0]["stage_ms"])]
        for r in staged:
            lines.append(f"| {r['backend']} | {r['batch']} | {cell_text(r['p50_ms'])} | "
                         + " | ".join(cell_text(v) for v in r["stage_ms"].values()) + " |")
    profiled = [r for r in rows if r["status"] == "ok" and r.get("op_ms")]
    if profiled:
        lines += ["", "Inside the stages (OpenVINO's per-node counters, PERF_COUNT, the median of three profiled runs "
                  "of each stage on its real inputs): milliseconds per kind of executed node, largest first. "
                  "\"attention\" is the fused attention kernel; FullyConnected the linear layers; the kernel name "
                  "says the precision.", "",
                  "| backend | batch | stage | profiled ms | where it goes |", "|---|---|---|---|---|"]
        for r in profiled:
            for stage, kinds in r["op_ms"].items():
                total = sum(kinds.values())
                parts = "; ".join(f"{k} {v:.0f} ({100 * v / total:.0f}%)" for k, v in kinds.items()) if total else "-"
                lines.append(f"| {r['backend']} | {r['batch']} | {stage} | {cell_text(total)} | {parts} |")
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {r['backend']} (batch {r['batch']}): {r['reason']}" for r in skipped]
    lines += ["", "## The papers' figures", "", papers_note(model, rows), "",
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


# == the roofline forecast (zsad-bench --forecast; zsad.bench.forecast) ===========================================
def write_forecast(out_dir: Path, payload: dict, command: str, env: dict) -> dict[str, Path]:
    """<date>-forecast-<profile>-<models>.json / .md / .png (numbered like ``write_results`` when taken); the
    models part is "all" when every registered method is in it."""
    from zsad.methods import METHODS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(payload["methods"])
    name = "all" if set(models) == set(METHODS) else "-".join(models)
    paths = numbered_paths(out_dir, f"{env['date'][:10]}-forecast-{_slug(payload['profile'])}-{name}",
                           ("json", "md", "png"))
    head = {"schema": payload["schema"], "label": payload["label"], "command": command, "environment": env}
    payload = {**head, **payload}  # the command first, as in the .md
    # one row per line: the stage table has a row per (model, GPU, precision, batch, stage)
    paths["json"].write_text("{\n" + ",\n".join(
        f"{json.dumps(k)}: " + ("[\n" + ",\n".join(json.dumps(_sig(r), default=str) for r in v) + "\n]"
                                if isinstance(v, list) and v and isinstance(v[0], dict) else json.dumps(v, default=str))
        for k, v in payload.items()) + "\n}\n")
    paths["md"].write_text(forecast_markdown(payload))
    fig = forecast_figure(payload)
    if fig is None:
        paths.pop("png")
    else:
        import matplotlib.pyplot as plt

        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
    return paths


def _sig(row: dict) -> dict:
    """A row's floats at 6 significant digits (the JSON stays readable; the inputs are not that exact)."""
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3g}" if v < 10 else f"{v:.1f}"


def forecast_markdown(payload: dict) -> str:
    from zsad.bench.forecast import GPUS, LABEL, PRECISIONS

    gpus, env = payload["gpus"], payload["environment"]
    models = list(payload["methods"])
    lines = [f"# zsad-bench roofline forecast: {', '.join(models)} ({payload['profile']} profile): {LABEL.upper()}",
             "", f"`{payload['command']}`", "",
             f"**{LABEL.capitalize()}.** Every time here is a lower bound (every images/s an upper bound) from the "
             "FLOPs and bytes each stage must move (counted on fake tensors, no weights run) and NVIDIA's published "
             "peaks: max(FLOPs / peak, bytes / bandwidth) per stage, summed over the chain. Nothing ran on a GPU. "
             f"Counted on {env.get('device_name')}, torch {env.get('torch')}, {env.get('date')}.", "",
             "## GPUs: published dense peaks", "",
             "| key | GPU (variant) | FP32 TFLOPS | TF32 | FP16 | BF16 | INT8 TOPS | DRAM GB/s | source | as printed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    shown = list(dict.fromkeys([*gpus, *(c["gpu"] for c in payload.get("paper_chains", []))]))
    for g in shown:
        gpu = GPUS[g]
        lines.append(f"| {g} | {gpu.name} | " + " | ".join(f"{gpu.peak_tflops[p]:g}" for p in PRECISIONS)
                     + f" | {gpu.bandwidth_gbs:g} | {gpu.source} | {gpu.printed} |")
    lines += ["", "## Byte model", "",
              "- weights read once per batch (the parameters / buffers each stage touches; a gathered table counts "
              "its rows gathered) at " + ", ".join(f"{p} {b} B" for p, b in payload["byte_model"]["weight_bytes"]
                                                   .items()) + ";",
              "- the stage's declared inputs and outputs at " + ", ".join(
                  f"{p} {b} B" for p, b in payload["byte_model"]["activation_bytes"].items())
              + " (integer tensors at their own size);",
              "- **fused** = those two (the bound); **unfused** adds the score intermediates a fused kernel keeps on "
              "chip: attention scores and probabilities [B, heads, N, M] x 4 passes per SDPA call, and explicit "
              "similarity matrices (QK^T, BAG-CLIP's kNN similarity) with every element-wise pass up to their softmax "
              "or top-k, as the eager code runs them;",
              "- not counted: other intermediates (linear outputs, LayerNorm / GELU passes), launches, host copies. "
              "Full statement: `zsad/bench/forecast.py` (bench/forecast.py) docstring.", ""]
    lines += _forecast_goals_md(payload)
    for model in models:
        lines += _forecast_chain_md(payload, model)
    lines += _forecast_stage_md(payload)
    lines += _forecast_paper_md(payload)
    lines += _forecast_measured_md(payload)
    lines += ["", "Build and count time per method (s): " + "; ".join(
        f"{m} build {t['build']}, count {t['count']}" for m, t in payload["timing_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def _forecast_goals_md(payload: dict) -> list[str]:
    from zsad.bench.forecast import PRECISIONS

    goals = payload["goals"]
    if not goals:
        return ["## The GPU goals (bench/gpu_check.py)", "",
                f"Not set beside this forecast: the goals are for the paper profile at its image size (this is the "
                f"{payload['profile']} profile, {', '.join(str(m['image_size']) for m in payload['methods'].values())}"
                " px).", ""]
    lines = ["## The GPU goals (bench/gpu_check.py) beside the forecast", "",
             "Per precision: the forecast bound, then 'ruled out' where the bound misses the goal, else the fraction "
             "of the roofline an implementation must reach to meet it (bound / goal for latency, goal / bound for "
             "images/s at the best listed batch; a throughput goal is ruled out when even the ceiling over all batch "
             "sizes misses it). The goals are set for an H100 / H200.", "",
             "| goal | target | GPU | " + " | ".join(PRECISIONS) + " |", "|---|---|---|" + "---|" * len(PRECISIONS)]
    keys = list(dict.fromkeys((g["goal"], g["target"], g["gpu"]) for g in goals))
    for goal, target, gpu in keys:
        cells = []
        for p in PRECISIONS:
            g = next((x for x in goals if (x["goal"], x["gpu"], x["precision"]) == (goal, gpu, p)), None)
            if g is None:
                cells.append("-")
                continue
            value = (f"{_ms(g['forecast'])} ms" if "ms" in goal
                     else f"{g['forecast']:.0f}/s at b{g['best_batch']} (ceiling {g['ceiling']:.0f})")
            cells.append(f"{value}: **ruled out**" if g["verdict"] == "ruled out"
                         else f"{value}: needs {100 * g['roofline_fraction_needed']:.0f}%")
        lines.append(f"| {goal} | {target} | {gpu} | " + " | ".join(cells) + " |")
    return lines + [""]


def _forecast_chain_md(payload: dict, model: str) -> list[str]:
    from zsad.bench.forecast import PRECISIONS

    chains = [c for c in payload["chains"] if c["model"] == model]
    ceilings = [c for c in payload["ceilings"] if c["model"] == model]
    info = payload["methods"][model]
    lines = [f"## {model}: the chain ({' -> '.join(info['stages'])}, {info['image_size']} px)", "",
             "Lower bound ms per batch (upper bound images/s); the last column is fp16 with the attention / kNN score "
             "intermediates written out (no fused kernels).", "",
             "| GPU | batch | " + " | ".join(PRECISIONS) + " | fp16 unfused |",
             "|---|---|" + "---|" * (len(PRECISIONS) + 1)]
    for gpu in payload["gpus"]:
        for b in sorted({c["batch"] for c in chains}):
            row = {c["precision"]: c for c in chains if c["gpu"] == gpu and c["batch"] == b}
            if not row:
                continue
            lines.append(f"| {gpu} | {b} | " + " | ".join(
                f"{_ms(row[p]['bound_ms'])} ({row[p]['images_per_s']:.0f}/s)" for p in PRECISIONS)
                + f" | {_ms(row['fp16']['bound_unfused_ms'])} ({row['fp16']['images_per_s_unfused']:.0f}/s) |")
        ceil = {c["precision"]: c for c in ceilings if c["gpu"] == gpu}
        lines.append(f"| {gpu} | ceiling (any batch) | " + " | ".join(
            f"{ceil[p]['images_per_s']:.0f}/s ({ceil[p]['limit']})" for p in PRECISIONS) + " | |")
    return lines + [""]


def _forecast_stage_md(payload: dict) -> list[str]:
    gpus = payload["gpus"]
    lines = ["## Per stage (fp32 and fp16; bf16 moves the bytes of fp16 and has its peaks on these GPUs, tf32 the "
             "bytes of fp32; JSON: every precision)", "",
             "Bound ms (c: compute-bound, m: memory-bound) / unfused bound ms. GFLOP, MB and FLOP/B at that batch.", "",
             "| model | stage | batch | prec. | GFLOP | MB fused | MB unfused | FLOP/B fused | "
             + " | ".join(gpus) + " |", "|---|---|---|---|---|---|---|---|" + "---|" * len(gpus)]
    rows = [r for r in payload["stages"] if r["precision"] in ("fp32", "fp16")]
    index = {(r["model"], r["stage"], r["batch"], r["precision"], r["gpu"]): r for r in rows}
    for key in dict.fromkeys((r["model"], r["stage"], r["batch"], r["precision"]) for r in rows):
        first = index[key + (gpus[0],)]
        cells = []
        for g in gpus:
            r = index[key + (g,)]
            cells.append(f"{_ms(r['bound_ms'])} {r['limit'][0]} / {_ms(r['bound_unfused_ms'])}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {first['flops'] / 1e9:.2f} | "
                     f"{first['bytes_fused'] / 1e6:.1f} | {first['bytes_unfused'] / 1e6:.1f} | "
                     f"{cell_text(first['intensity_fused'], '{:.0f}')} | " + " | ".join(cells) + " |")
    return lines + [""]


def _forecast_paper_md(payload: dict) -> list[str]:
    from zsad.bench.forecast import GPUS

    gpus = payload["gpus"]
    own: dict[str, list[str]] = {}
    for c in payload.get("paper_chains", []):
        if c["precision"] == "fp32":
            own.setdefault(c["model"], []).append(f"{c['gpu']} ({GPUS[c['gpu']].name}): {_ms(c['bound_ms'])}")
    lines = ["## The papers' figures", "",
             "As printed (mostly batch-1 fp32 PyTorch on the authors' GPU, often not stated), beside our chain's fp32 "
             "batch-1 lower bound on the GPUs above and on the paper's own GPU where the peak table has it. A paper "
             "figure is a measurement of the authors' code; the bound is what no implementation of our paper-profile "
             "chain can beat on that GPU. Bracketed paper rows are variants: compare the one with our profile's "
             "setting (the method's spec in zsad/methods says which).", "",
             "| model | " + " | ".join(f"{g} fp32 b1 bound ms" for g in gpus) + " | on the paper's GPU, fp32 b1 ms |",
             "|---|" + "---|" * (len(gpus) + 1)]
    for model in payload["methods"]:
        b1 = {c["gpu"]: c for c in payload["chains"] if c["model"] == model and c["batch"] == 1
              and c["precision"] == "fp32"}
        lines.append(f"| {model} | " + " | ".join(_ms(b1[g]["bound_ms"]) if g in b1 else "-" for g in gpus)
                     + f" | {'; '.join(own.get(model, [])) or '-'} |")
    lines += ["", "| paper | method | component | quantity | value | image size | hardware | note |",
              "|---|---|---|---|---|---|---|---|"]
    for p in payload["paper"]:
        lines.append(f"| {p['paper']} | {p['method']} | {p.get('component') or '-'} | {p['quantity']} | {p['value']} "
                     f"| {p.get('image_size') or '-'} | {p.get('hardware') or 'not stated'} "
                     f"| {(p.get('note') or '')[:90]} |")
    return lines + [""]


def _forecast_measured_md(payload: dict) -> list[str]:
    rows = payload.get("measured") or []
    if not rows:
        return ["## Measured / forecast", "",
                "No GPU result given (`--measured RESULT.json`, a zsad-bench run with device cuda): nothing measured "
                "to set beside the forecast.", ""]
    lines = ["## Measured / forecast", "",
             "Measured p50 (zsad-bench on the GPU) over the forecast lower bound at the same precision and batch; "
             "a ratio below 1 means the byte / FLOP model or a peak is wrong.", "",
             "| source | GPU | backend | precision | batch | stage | measured ms | forecast ms (unfused) | "
             "measured / forecast |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['source']).name} | {r['gpu']} | {r['backend']} | {r['precision']} | {r['batch']} | "
                     f"{r['stage']} | {_ms(r['measured_ms'])} | {_ms(r['forecast_ms'])} "
                     f"({_ms(r['forecast_unfused_ms'])}) | {r['ratio']:.2f}"
                     + (" **below the bound**" if r["below_bound"] else "") + " |")
    return lines + [""]


_STAGE_MARKERS = {"encoder": "o", "graph": "D", "head": "s", "prompt_head": "v", "text_encoder": "^",
                  "postprocess": "P"}


def forecast_figure(payload: dict):
    """Roofline per GPU: attainable TFLOP/s against arithmetic intensity (FLOP/byte), one roof per precision, each
    stage a point on its fp16 roof (colour: method, marker: stage; hollow: batch 1, filled: the largest batch; x: the
    same stage with its score intermediates written out), measured stages (FLOPs / measured time) as stars. None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    from zsad.bench.forecast import GPUS, LABEL

    gpus = payload["gpus"]
    cols = min(2, len(gpus))
    nrows = (len(gpus) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7.5 * cols, 5.2 * nrows), squeeze=False)
    models = list(payload["methods"])
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(models)}
    big = max(r["batch"] for r in payload["stages"])
    x = np.logspace(0, 5, 200)
    for ax, g in zip(axes.flat, gpus, strict=False):
        gpu = GPUS[g]
        bw = gpu.bandwidth_gbs * 1e9
        for p, style in (("fp32", ":"), ("tf32", "-."), ("fp16", "-"), ("int8", "--")):
            label = "fp16 / bf16" if p == "fp16" else p
            ax.plot(x, np.minimum(gpu.peak_tflops[p], x * bw / 1e12), style, color="grey", linewidth=1)
            ax.text(x[-1], gpu.peak_tflops[p], f" {label} {gpu.peak_tflops[p]:g}", fontsize=6, va="bottom",
                    ha="right", color="grey")
        for r in payload["stages"]:
            if r["gpu"] != g or r["precision"] != "fp16" or r["batch"] not in (1, big) or not r["flops"]:
                continue
            color, marker = colors[r["model"]], _STAGE_MARKERS.get(r["stage"], "h")
            ai = r["intensity_fused"]
            ax.scatter([ai], [min(gpu.peak_tflops["fp16"], ai * bw / 1e12)], marker=marker, s=30, zorder=3,
                       facecolors=color if r["batch"] == big else "none", edgecolors=color, alpha=0.85)
            if r["bytes_unfused"] > r["bytes_fused"]:
                ai = r["intensity_unfused"]
                ax.scatter([ai], [min(gpu.peak_tflops["fp16"], ai * bw / 1e12)], marker="x", s=22, color=color,
                           alpha=0.85, zorder=3)
        for m in payload.get("measured") or []:
            if m["gpu"] != g or not m["flops"] or m["stage"] == "chain (p50)":
                continue
            f = next(r for r in payload["stages"] if (r["model"], r["gpu"], r["precision"], r["batch"], r["stage"])
                     == (m["model"], g, m["forecast_precision"], m["batch"], m["stage"]))
            ax.scatter([f["intensity_fused"]], [m["flops"] / (m["measured_ms"] * 1e-3) / 1e12], marker="*", s=70,
                       color=colors[m["model"]], edgecolor="black", linewidth=0.5, zorder=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(1, x[-1])
        ax.set_ylim(gpu.peak_tflops["fp32"] / 100, gpu.peak_tflops["int8"] * 2)
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("attainable TFLOP/s")
        ax.set_title(f"{gpu.name}: {LABEL}", fontsize=9)
        ax.grid(True, which="both", alpha=0.2)
    for ax in list(axes.flat)[len(gpus):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colors[m], label=m) for m in models]
    stages = dict.fromkeys(r["stage"] for r in payload["stages"])
    handles += [plt.Line2D([], [], marker=_STAGE_MARKERS.get(st, "h"), linestyle="", color="black", label=st)
                for st in stages]
    handles += [plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="black",
                           label="batch 1 (fused bytes)")]
    if big > 1:
        handles.append(plt.Line2D([], [], marker="o", linestyle="", color="black", label=f"batch {big} (fused bytes)"))
    handles += [plt.Line2D([], [], marker="x", linestyle="", color="black", label="unfused (score intermediates)"),
                plt.Line2D([], [], marker="*", linestyle="", color="black", label="measured (FLOPs / measured ms)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7)
    fig.suptitle(f"zsad-bench roofline, {payload['profile']} profile, stages at fp16: {LABEL.upper()}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig
