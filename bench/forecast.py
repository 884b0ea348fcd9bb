"""Roofline forecast: the lower-bound latency and the throughput ceiling of every stage of a method's chain on a
named GPU, from the FLOPs and bytes each stage must move and the GPU's published peaks. FORECAST, NOT MEASURED.

    zsad-bench --forecast h100,h200,a100,l4 --model bagclip,anomalyclip,afclip,bayespfl,sowa --profile paper \\
               --batch 1,8,32 [--measured RESULT.json ...]

Nothing runs on a GPU and no weights are needed: each method is built with random weights (``pretrained=None``)
and every stage is called once per batch size on fake tensors (``zsad.bench.flops.stage_count``), which counts
FLOPs (one multiply-add = 2 FLOPs; matmuls, convolutions and attention; element-wise ops are not counted) and the
tensors the byte model below needs.

Roofline, per stage s, GPU g and precision p::

    t_compute = FLOPs_s / peak_g[p]          t_memory = bytes_s[p] / bandwidth_g
    bound     = max(t_compute, t_memory)     (ms; a lower bound on the stage's time)

The chain's bound is the sum over its stages (they run one after another on one batch); throughput at batch B is
B / chain bound. The ceiling is the throughput no batch size can exceed: per image, each stage's
max(FLOPs per image / peak, activation bytes per image / bandwidth), summed, inverted (weights amortise away as B
grows; per-image quantities are the difference between the counts at batch 2 and batch 1).

Byte model (bytes a stage must move between DRAM and the chip; every count is at the precision p):

- **Weights, read once per batch**: every parameter and buffer the stage's forward touches (found by identity on
  the fake-tensor pass, so a method's shared modules count only in the stages that use them; the dual-stream
  encoder's shared weights count once). A table read only through a gather (embedding, index_select, index,
  gather) counts the elements gathered, not the table. Floating weights at WEIGHT_BYTES[p]: fp32 / tf32 4,
  fp16 / bf16 2, int8 1; integer buffers at their own size.
- **Activations, in and out per stage**: the stage's declared inputs and outputs (Stage.inputs / Stage.outputs at
  batch B), floating tensors at ACT_BYTES[p]: fp32 / tf32 4, fp16 / bf16 2, int8 2 (an int8 engine quantises the
  GEMM operands inside the stage and keeps stage inputs and outputs, softmax and LayerNorm in fp16, as TensorRT
  does); integer tensors (knn_index, token ids) at their own size (int64: 8).
- ``bytes_fused`` = weights + activations in/out: what a stage fused into one kernel pass with every intermediate
  kept on chip would move. This is the roofline's lower bound (``bound_ms``).
- ``bytes_unfused`` = bytes_fused + the **score intermediates** a fused kernel avoids: (a) inside every fused
  attention op (SDPA; FlashAttention on a GPU) the scores S = QK^T and probabilities P, [B, heads, N, M] each, at
  4 passes (S written, read by the softmax, P written, read by PV: SDPA_SCORE_PASSES); (b) an explicit
  contraction output (a similarity matrix, QK^T written by bmm) that reaches a softmax or a selection (topk, sort,
  max, ...) through element-wise ops, counted as the eager code runs it: one write plus one read per op that reads
  it, and the same for each tensor of that element-wise chain (BAG-CLIP's kNN: the 1369x1369 similarity, its
  self-masked copy, the tie masks and the topk keys; SOWA's window attention; Bayes-PFL's cross-attention), at
  ACT_BYTES[p] (bool / integer masks at their own size). ``bound_unfused_ms`` uses these bytes.
- Not counted, in either column: the other intermediates of an unfused stage (each linear layer's output written
  and read back, LayerNorm / GELU passes), caches, launch overheads and host-device copies. Both columns are lower
  bounds; their difference isolates what the fused attention / kNN kernels save.

Compute: every counted FLOP at the GPU's dense peak for p (fp32: the CUDA-core FP32 peak; tf32 / fp16 / bf16 /
int8: the dense Tensor Core peak, i.e. the datasheet's "with sparsity" figure halved). At int8 all FLOPs,
attention included, are taken at the int8 peak: a lower bound, not what an int8 engine with fp16 attention reaches.

Peaks (GPUS) are the published figures of NVIDIA's datasheets, each entry naming its variant and source; bandwidth
in 10^9 B/s as printed (3.35 TB/s = 3350 GB/s). A GPU run of zsad-bench (result JSON, device cuda) given with
``--measured`` is set beside the forecast: measured / forecast per stage (rows with ``stage_ms``) and for the whole
chain (p50); a ratio below 1 means the model or a peak is wrong, never that the GPU beat its roofline.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from zsad import ZsadError

LABEL = "forecast, not measured"
SCHEMA = "zsad-bench-forecast/1"
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8")
WEIGHT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "int8": 1}
ACT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "int8": 2}
# zsad-bench row precision -> the forecast precision it is compared with
MEASURED_PRECISION = {"fp32": "fp32", "tf32": "tf32", "fp16": "fp16", "bf16": "bf16", "int8": "int8",
                      "int8-bf16": "int8"}


@dataclass(frozen=True)
class GPU:
    """One GPU's published peaks. ``peak_tflops``: dense, 10^12 FLOP/s (int8: 10^12 op/s), per precision;
    ``bandwidth_gbs``: DRAM bandwidth, 10^9 B/s; ``printed``: the datasheet's own figures this entry is made from."""

    key: str
    name: str
    bandwidth_gbs: float
    peak_tflops: dict
    source: str
    printed: str
    device_pattern: str  # regex on torch.cuda.get_device_name() (upper case) that identifies this GPU

    def ridge(self, precision: str) -> float:
        """Arithmetic intensity (FLOP/byte) where the roof turns from memory-bound to compute-bound."""
        return self.peak_tflops[precision] * 1e12 / (self.bandwidth_gbs * 1e9)


_H100_SOURCE = ("NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/), specifications table; "
                "'* With sparsity': dense = half the starred figures")
GPUS: dict[str, GPU] = {g.key: g for g in (
    GPU("h100", "NVIDIA H100 SXM5 80GB (HBM3)", 3350.0,
        {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "bf16": 989.5, "int8": 1979.0}, _H100_SOURCE,
        "H100 SXM: FP32 67 TFLOPS; TF32 Tensor Core 989 TFLOPS*; BF16 / FP16 Tensor Core 1,979 TFLOPS*; "
        "INT8 Tensor Core 3,958 TOPS*; GPU memory bandwidth 3.35 TB/s",
        r"H100(?!.*(PCIE|NVL))"),
    GPU("h100-pcie", "NVIDIA H100 PCIe 80GB (HBM2e)", 2000.0,
        {"fp32": 51.0, "tf32": 378.0, "fp16": 756.5, "bf16": 756.5, "int8": 1513.0}, _H100_SOURCE,
        "H100 PCIe: FP32 51 TFLOPS; TF32 Tensor Core 756 TFLOPS*; BF16 / FP16 Tensor Core 1,513 TFLOPS*; "
        "INT8 Tensor Core 3,026 TOPS*; GPU memory bandwidth 2 TB/s",
        r"H100.*PCIE"),
    GPU("h200", "NVIDIA H200 SXM 141GB (HBM3e)", 4800.0,
        {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "bf16": 989.5, "int8": 1979.0},
        "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200/), specifications table, H200 SXM "
        "column; '* With sparsity': dense = half the starred figures",
        "H200 SXM: FP32 67 TFLOPS; TF32 Tensor Core 989 TFLOPS*; BF16 / FP16 Tensor Core 1,979 TFLOPS*; "
        "INT8 Tensor Core 3,958 TOPS*; GPU memory bandwidth 4.8 TB/s",
        r"H200(?!.*NVL)"),
    GPU("a100", "NVIDIA A100 SXM4 80GB (HBM2e)", 2039.0,
        {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "int8": 624.0},
        "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100/), specifications table, A100 "
        "80GB SXM column; dense figures printed before the '|' (sparse after)",
        "A100 80GB SXM: FP32 19.5 TFLOPS; TF32 Tensor Core 156 TFLOPS | 312*; BF16 / FP16 Tensor Core 312 TFLOPS | "
        "624*; INT8 Tensor Core 624 TOPS | 1,248*; GPU memory bandwidth 2,039 GB/s",
        r"A100.*SXM.*80"),
    GPU("l4", "NVIDIA L4 24GB (GDDR6)", 300.0,
        {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0, "int8": 242.5},
        "NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/l4/), specifications table; "
        "'* Shown with sparsity': dense = half the starred figures",
        "L4: FP32 30.3 TFLOPS; TF32 Tensor Core 120 TFLOPS*; FP16 / BF16 Tensor Core 242 TFLOPS*; "
        "INT8 Tensor Core 485 TOPS*; GPU memory bandwidth 300 GB/s",
        r"\bL4\b"),
    GPU("rtx3090", "NVIDIA GeForce RTX 3090 24GB (GDDR6X)", 936.0,
        {"fp32": 35.6, "tf32": 35.6, "fp16": 71.0, "bf16": 71.0, "int8": 284.0},
        "NVIDIA Ampere GA102 GPU Architecture whitepaper v2.0, Appendix A, GeForce RTX 3090 specifications; dense "
        "figures before the '/', fp16 / bf16 with FP32 accumulate (what autocast uses)",
        "RTX 3090: peak FP32 35.6 TFLOPS; peak TF32 Tensor 35.6/71 TFLOPS; peak FP16 Tensor with FP32 accumulate "
        "71/142 TFLOPS (142/284 with FP16 accumulate); peak BF16 Tensor 71/142; peak INT8 Tensor 284/568 TOPS; "
        "memory bandwidth 936 GB/s",
        r"RTX 3090(?! TI)"),
)}


def parse_gpus(text: str) -> list[str]:
    """The GPU keys of a comma-separated --forecast list (case-insensitive); a one-line error names the known."""
    keys = [k.strip().lower() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in GPUS]
    if unknown or not keys:
        raise ZsadError(f"unknown GPU {', '.join(repr(k) for k in unknown) or '(none given)'} for --forecast; "
                        f"known: {', '.join(GPUS)}")
    return list(dict.fromkeys(keys))


def gpu_for_device(device_name: str) -> str | None:
    """The GPUS key of a CUDA device name (torch.cuda.get_device_name, or a paper's hardware line), or None."""
    upper = device_name.upper()
    return next((g.key for g in GPUS.values() if re.search(g.device_pattern, upper)), None)


# == the byte model and the roofline =============================================================================
def stage_bytes(count, precision: str) -> tuple[int, int]:
    """(bytes_fused, bytes_unfused) of a ``zsad.bench.flops.StageCount`` at ``precision`` (module docstring)."""
    fused = (count.weight_elems * WEIGHT_BYTES[precision] + count.weight_bytes
             + count.io_elems * ACT_BYTES[precision] + count.io_bytes)
    return fused, fused + count.score_elems * ACT_BYTES[precision] + count.score_bytes


def roofline(flops: float, nbytes: float, gpu: GPU, precision: str) -> dict:
    """Times in ms at ``gpu``'s peaks: compute, memory, their max (the bound), and which one limits."""
    t_compute = flops / (gpu.peak_tflops[precision] * 1e12) * 1e3
    t_memory = nbytes / (gpu.bandwidth_gbs * 1e9) * 1e3
    return {"t_compute_ms": t_compute, "t_memory_ms": t_memory, "bound_ms": max(t_compute, t_memory),
            "limit": "compute" if t_compute >= t_memory else "memory"}


def count_method(method, batches: list[int]) -> dict[int, list]:
    """{batch: [StageCount per stage]} at every batch in ``batches`` plus 1 and 2 (the ceiling's per-image terms)."""
    from zsad.bench.flops import stage_count

    stages = method.eval().stages()
    return {b: [stage_count(st, b) for st in stages] for b in sorted({1, 2, *batches})}


def stage_rows(model: str, counts: dict[int, list], gpus: list[str], batches: list[int]) -> list[dict]:
    """One row per (GPU, precision, batch, stage): FLOPs, bytes, intensity, compute / memory times and bounds."""
    rows = []
    for g in gpus:
        gpu = GPUS[g]
        for p in PRECISIONS:
            for b in batches:
                for c in counts[b]:
                    fused, unfused = stage_bytes(c, p)
                    r = roofline(c.flops, fused, gpu, p)
                    rows.append({"model": model, "gpu": g, "precision": p, "batch": b, "stage": c.name,
                                 "flops": c.flops, "bytes_fused": fused, "bytes_unfused": unfused,
                                 "intensity_fused": c.flops / fused if fused else None,
                                 "intensity_unfused": c.flops / unfused if unfused else None, **r,
                                 "bound_unfused_ms": roofline(c.flops, unfused, gpu, p)["bound_ms"],
                                 "label": LABEL})
    return rows


def chain_rows(rows: list[dict]) -> list[dict]:
    """The chain per (model, GPU, precision, batch): the stages' bounds summed, images/s at that bound."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["gpu"], r["precision"], r["batch"])
        c = out.setdefault(key, {"model": r["model"], "gpu": r["gpu"], "precision": r["precision"],
                                 "batch": r["batch"], "flops": 0, "bound_ms": 0.0, "bound_unfused_ms": 0.0,
                                 "compute_limited_ms": 0.0, "label": LABEL})
        c["flops"] += r["flops"]
        c["bound_ms"] += r["bound_ms"]
        c["bound_unfused_ms"] += r["bound_unfused_ms"]
        c["compute_limited_ms"] += r["bound_ms"] if r["limit"] == "compute" else 0.0
    for c in out.values():
        c["bound_ms_per_image"] = c["bound_ms"] / c["batch"]
        c["images_per_s"] = 1e3 * c["batch"] / c["bound_ms"]
        c["images_per_s_unfused"] = 1e3 * c["batch"] / c["bound_unfused_ms"]
    return list(out.values())


def ceiling_rows(model: str, counts: dict[int, list], gpus: list[str]) -> list[dict]:
    """Per (GPU, precision): the images/s no batch size exceeds (module docstring), from the batch-2 minus batch-1
    counts, and what limits the stage that takes most of that time (compute / memory)."""
    rows = []
    for g in gpus:
        gpu = GPUS[g]
        for p in PRECISIONS:
            per_stage = [roofline(c2.flops - c1.flops, stage_bytes(c2, p)[0] - stage_bytes(c1, p)[0], gpu, p)
                         for c1, c2 in zip(counts[1], counts[2], strict=True)]
            total = sum(r["bound_ms"] for r in per_stage)
            main = max(per_stage, key=lambda r: r["bound_ms"])  # the stage that takes most of the time
            rows.append({"model": model, "gpu": g, "precision": p, "ms_per_image": total,
                         "images_per_s": 1e3 / total if total else None,
                         "limit": main["limit"], "label": LABEL})
    return rows


# == goals and the papers' figures ===============================================================================
def goal_rows(chains: list[dict], ceilings: list[dict]) -> list[dict]:
    """The GPU goals (``zsad.reference.GOAL_*``, judged on measurements by bench/gpu_check.py; BAG-CLIP / Bayes-PFL,
    paper profile) against the forecast, per GPU and precision. A lower bound above a latency goal (or a ceiling
    below a throughput goal) rules the goal out at that precision on that GPU; otherwise
    ``roofline_fraction_needed`` says how close to the roofline an implementation must run to meet it."""
    from zsad.reference import GOAL_BAG_B1_MS, GOAL_BAG_IMG_S, GOAL_BAYES_B1_MS

    out = []
    for model, target in (("bagclip", GOAL_BAG_B1_MS), ("bayespfl", GOAL_BAYES_B1_MS)):
        for c in chains:
            if c["model"] == model and c["batch"] == 1:
                out.append({"goal": f"{model} batch-1 p50 ms", "target": f"<= {target:g}", "model": model,
                            "gpu": c["gpu"], "precision": c["precision"], "forecast": c["bound_ms"],
                            "forecast_what": "lower bound, batch 1",
                            "roofline_fraction_needed": c["bound_ms"] / target,
                            "verdict": "ruled out" if c["bound_ms"] > target else "not ruled out", "label": LABEL})
    for ceil in ceilings:
        if ceil["model"] != "bagclip":
            continue
        listed = [c for c in chains if c["model"] == "bagclip" and c["gpu"] == ceil["gpu"]
                  and c["precision"] == ceil["precision"]]
        best = max(listed, key=lambda c: c["images_per_s"])
        out.append({"goal": "bagclip images/s", "target": f">= {GOAL_BAG_IMG_S:g}", "model": "bagclip",
                    "gpu": ceil["gpu"], "precision": ceil["precision"], "forecast": best["images_per_s"],
                    "forecast_what": f"upper bound at batch {best['batch']} (ceiling over all batches "
                                     f"{ceil['images_per_s']:.0f})",
                    "best_batch": best["batch"], "ceiling": ceil["images_per_s"],
                    "roofline_fraction_needed": GOAL_BAG_IMG_S / best["images_per_s"],
                    "verdict": "ruled out" if ceil["images_per_s"] < GOAL_BAG_IMG_S else "not ruled out",
                    "label": LABEL})
    return out


def paper_figures(models: list[str]) -> list[dict]:
    """The papers' speed rows (latency / FPS / it/s) of ``models``, bracketed variants and components included,
    each with the GPUS key of its hardware where the table has that GPU."""
    from zsad.methods import METHODS
    from zsad.reference import efficiency_rows

    names = {METHODS[m].paper_name: m for m in models if METHODS[m].paper_name}
    out = []
    for p in efficiency_rows():
        base = p["method"].split(" [")[0]
        if base in names and p["quantity"] in ("latency_ms", "fps", "it_per_s"):
            out.append({**p, "model": names[base], "gpu": gpu_for_device(p.get("hardware") or "")})
    return out


# == measured / forecast =========================================================================================
def load_measured(path: str | Path) -> dict:
    """A zsad-bench result JSON of a GPU run, checked: one-line errors for anything else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ZsadError(f"cannot read --measured {path}: {err}") from None
    if not isinstance(data, dict) or data.get("schema") != "zsad-bench/1":
        raise ZsadError(f"--measured {path} is not a zsad-bench result file (schema zsad-bench/1)")
    env = data.get("environment") or {}
    if not str(env.get("device", "")).startswith("cuda"):
        raise ZsadError(f"--measured {path} is a {env.get('device', 'unknown')} run: only a GPU (cuda) run is "
                        "compared with the forecast")
    if gpu_for_device(str(env.get("device_name", ""))) is None:
        raise ZsadError(f"--measured {path} ran on '{env.get('device_name')}', which is not in the peak table "
                        f"(known: {', '.join(g.name for g in GPUS.values())})")
    return {**data, "path": str(path)}


def measured_rows(result: dict, stages: list[dict], chains: list[dict]) -> list[dict]:
    """measured / forecast per stage (rows with stage_ms) and for the chain (p50), for every timed row of a GPU
    result at a precision the forecast has. ``stages`` / ``chains``: forecast rows covering its GPU and batches."""
    gpu = gpu_for_device(result["environment"]["device_name"])
    fstage = {(r["model"], r["gpu"], r["precision"], r["batch"], r["stage"]): r for r in stages}
    fchain = {(r["model"], r["gpu"], r["precision"], r["batch"]): r for r in chains}
    out = []
    for row in result["rows"]:
        p = MEASURED_PRECISION.get(row.get("precision", ""))
        if row.get("status") != "ok" or p is None or row.get("backend") == "served":
            continue
        key = (row["model"], gpu, p, row["batch"])
        base = {"model": row["model"], "gpu": gpu, "backend": row["backend"], "precision": row["precision"],
                "forecast_precision": p, "batch": row["batch"], "source": result["path"]}
        timed = [(n, ms) for n, ms in (row.get("stage_ms") or {}).items() if key + (n,) in fstage]
        timed.append(("chain (p50)", row["p50_ms"]))
        for name, ms in timed:
            f = fchain[key] if name == "chain (p50)" else fstage[key + (name,)]
            out.append({**base, "stage": name, "measured_ms": ms, "forecast_ms": f["bound_ms"],
                        "forecast_unfused_ms": f["bound_unfused_ms"], "flops": f["flops"],
                        "ratio": ms / f["bound_ms"], "below_bound": ms < f["bound_ms"]})
    return out


def check_measured(result: dict, models: list[str], profile: str, image_size: int | None) -> None:
    """A measured result must be of a forecast model, at the forecast's profile and image size (one-line errors,
    before anything is built)."""
    import zsad.methods as M

    where, model = result["path"], result["model"]
    if model not in models:
        raise ZsadError(f"--measured {where} is a {model} run; add it to --model")
    if result["profile"] != profile:
        raise ZsadError(f"--measured {where} ran the {result['profile']} profile, the forecast the {profile} profile")
    size = image_size or M.resolve_config(model, profile).backbone.image_size
    sizes = {r.get("image_size") for r in result["rows"] if r.get("status") == "ok"}
    if sizes - {size}:
        raise ZsadError(f"--measured {where} ran at {sorted(sizes)} px, the forecast at {size} px")


# == the whole forecast ==========================================================================================
def forecast(models: list[str], profile: str, image_size: int | None, batches: list[int], gpus: list[str],
             measured: list[dict] | None = None, log=print) -> dict:
    """The forecast payload (JSON-ready) of ``models`` at ``profile`` on ``gpus`` at ``batches``. ``measured``:
    results from ``load_measured`` (checked here first; their GPUs and batch sizes are added to the forecast). The
    papers' figures come with a batch-1 forecast on the paper's own GPU where the peak table has it."""
    import torch

    import zsad.methods as M

    measured = measured or []
    for m in measured:
        check_measured(m, models, profile, image_size)
    gpus = list(dict.fromkeys([*gpus, *(str(gpu_for_device(m["environment"]["device_name"])) for m in measured)]))
    paper = paper_figures(models)
    payload: dict = {"schema": SCHEMA, "label": LABEL, "profile": profile, "batches": batches, "gpus": gpus,
                     "precisions": list(PRECISIONS), "peaks": {g: asdict(GPUS[g]) for g in GPUS},
                     "byte_model": {"weight_bytes": WEIGHT_BYTES, "activation_bytes": ACT_BYTES, "doc": __doc__},
                     "methods": {}, "stages": [], "chains": [], "ceilings": [], "paper": paper, "paper_chains": [],
                     "timing_s": {}}
    for model in models:
        t0 = time.perf_counter()
        overrides: dict = {"pretrained": None, **({"image_size": image_size} if image_size else {})}
        with torch.random.fork_rng(devices=[]):
            method = M.create(model, profile, backbone=overrides)
        t1 = time.perf_counter()
        # batch 1 always: the latency goals are batch-1 figures
        wanted = sorted({1, *batches, *(r["batch"] for m in measured if m["model"] == model for r in m["rows"])})
        counted = count_method(method, wanted)
        t2 = time.perf_counter()
        payload["methods"][model] = {"image_size": method.image_size, "stages": [c.name for c in counted[1]],
                                     "counts": {b: [asdict(c) for c in cs] for b, cs in counted.items()}}
        del method
        payload["timing_s"][model] = {"build": round(t1 - t0, 2), "count": round(t2 - t1, 2)}
        log(f"forecast {model}: built in {t1 - t0:.1f} s, counted at {len(counted)} batch sizes in {t2 - t1:.1f} s")
        rows = stage_rows(model, counted, gpus, wanted)
        payload["stages"] += rows
        payload["chains"] += chain_rows(rows)
        payload["ceilings"] += ceiling_rows(model, counted, gpus)
        own = sorted({p["gpu"] for p in paper if p["model"] == model and p["gpu"]})
        payload["paper_chains"] += chain_rows(stage_rows(model, counted, own, [1]))
    # the goals are paper-profile figures: judged only at the paper profile and its image size
    paper_setting = profile == "paper" and all(
        v["image_size"] == M.resolve_config(k, "paper").backbone.image_size for k, v in payload["methods"].items())
    payload["goals"] = goal_rows([c for c in payload["chains"] if c["batch"] in {1, *batches}],
                                 payload["ceilings"]) if paper_setting else []
    payload["measured"] = [r for m in measured for r in measured_rows(m, payload["stages"], payload["chains"])]
    return payload
