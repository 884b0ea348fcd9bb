"""fp16 / bf16 on the CPU: every method's stage chain under ``torch.autocast("cpu", dtype)`` against fp32.

The comparison is the GPU tests' (tests/test_chain_gpu.py): the same images through the chain in fp32 and under
autocast, score and anomaly map compared by their max relative error (max |half - fp32| / max |fp32|), with ``TOL``
per dtype. What a CPU run adds:

- **selections**: BAG-CLIP's kNN neighbours are a discontinuous step (zsad.selection); a half-precision chain picks
  other neighbours wherever its features move a near-tie. The rows report how many selections differ and the map
  error with the fp32 selection adopted after the graph stage (``map_rel_on_fp32_selection``: the continuous error
  alone), besides the plain end-to-end error. No tolerance is loosened for it.
- **per stage**: each stage run alone under autocast on the fp32 chain's inputs (where precision is lost);
- **precision of the ops**: every aten kernel of a half-precision run, by the dtype it received (``PrecisionLog``, from
  the profiler): which ran in half, which in fp32 (what CPU autocast does not lower, and what we keep in fp32).

``python -m zsad.bench.half_precision --profile paper --methods bagclip --out DIR`` writes DIR/<method>.json; run one
method per process at the paper profile (a ViT-L at 518 px in three precisions holds ~10 GB). ``--shallow`` builds
the paper widths with a 2-block ViT (``shallow_config``), the configuration tests/test_half_precision.py runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

# the GPU tests' tolerances (tests/test_chain_gpu.py TOL): max relative error of score and map against fp32
TOL = {torch.float16: 5e-2, torch.bfloat16: 1e-1}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
HALF = (torch.float16, torch.bfloat16)
# ops whose cost is the model's FLOPs: where one of these runs in fp32 under autocast, it is a fallback worth naming
COMPUTE_OPS = ("addmm", "mm", "bmm", "baddbmm", "mkldnn_convolution", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_attention_math")


def rel(ref: np.ndarray, got: np.ndarray) -> float:
    """max |got - ref| / max |ref| (tests/test_chain_gpu.py's ``_rel``); inf where ``got`` is not finite."""
    got = np.asarray(got, np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def shallow_config(layers: int = 2, image_size: int = 518, text_layers: int = 2) -> dict:
    """An open_clip model config at ViT-L-14-336's widths (vision 1024 / 16 heads, patch 14, text 768 / 12 heads,
    embedding 768) with ``layers`` vision blocks: the paper's per-block shapes at a CPU test's cost."""
    return {"embed_dim": 768,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": 1024, "head_width": 64,
                           "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12,
                         "layers": text_layers}}


def shallow_overrides(name: str, arch_path: str, image_size: int, layers: int = 2) -> dict:
    """Profile overrides that run method ``name`` on the shallow config at ``arch_path``: every block a tap, the dual
    stream from block 2, one deep text prompt layer (the text tower has two blocks)."""
    taps = list(range(1, layers + 1))
    ov: dict = {"backbone": {"arch": arch_path, "pretrained": None, "image_size": image_size}, "taps": taps}
    if name in ("anomalyclip", "bagclip"):
        ov.update(dual_start=min(2, layers), prompt={"deep_depth": 1})
    if name == "sowa":
        ov.update(prompt={"deep_depth": 1})
    return ov


class PrecisionLog:
    """The aten kernels a run executes, counted by the dtype of their floating inputs ("fp32", "fp16", "bf16", or
    "mixed" for half inputs with fp32 weights, e.g. CPU autocast's LayerNorm), read off ``torch.profiler`` events
    (``record_shapes``): the run itself is unchanged. An op that autocast re-dispatches appears twice, its inputs before
    and after the cast; only the innermost event of a name counts (what the kernel received)."""

    DTYPES = {"float": "fp32", "c10::Half": "fp16", "c10::BFloat16": "bf16", "double": "fp64"}

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._prof = None

    def __enter__(self):
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        prof, self._prof = self._prof, None
        prof.__exit__(*exc)
        for e in prof.events():
            if any(c.name == e.name for c in _descendants(e)):
                continue  # the autocast wrapper of the same op: its child got the cast inputs
            kinds = {self.DTYPES[d] for d in e.input_dtypes or () if d in self.DTYPES}
            if kinds:
                kind = next(iter(kinds)) if len(kinds) == 1 else "mixed" if kinds & {"fp16", "bf16"} else "fp32"
                self.counts[(e.name.removeprefix("aten::"), kind)] += 1
        return False

    def summary(self) -> dict:
        """{"half": {op: n}, "fp32": {op: n}, "mixed": {op: n}, "fp32_compute": [compute kernels that ran in fp32]}."""
        out: dict = {"half": {}, "fp32": {}, "mixed": {}}
        for (op, kind), n in sorted(self.counts.items()):
            key = "half" if kind in ("fp16", "bf16") else "mixed" if kind == "mixed" else "fp32"
            out[key][op] = out[key].get(op, 0) + n
        out["fp32_compute"] = sorted(op for op in out["fp32"] if op in COMPUTE_OPS)
        return out


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def run_chain(stages, feed: dict, dtype: torch.dtype | None = None, adopt: dict | None = None,
              log: PrecisionLog | None = None, reuse: dict | None = None) -> dict:
    """The chain's tensors (as ``run_stages``), each stage under autocast ``dtype`` (None: fp32). ``adopt``: tensors
    that replace a stage's own outputs of the same name (an fp32 selection), so everything after it runs on them.
    ``reuse``: what this chain returned for the same ``feed`` and ``dtype``; a stage given the very tensors it was
    given there takes its outputs from there instead of running again. With ``adopt``, only the stages after the
    selection run: the same half-precision tensors up to it, at a fraction of the time (at the paper's widths fp16
    matmuls run ~40x slower than fp32 on a CPU without AVX-512 FP16)."""
    import contextlib

    from zsad.methods.stages import torch_stage, walk_stages

    def run(st, inputs: dict) -> dict:
        if reuse is not None and all(inputs[n] is reuse.get(n) for n in st.inputs):
            return {n: (adopt or {}).get(n, reuse[n]) for n in st.outputs}
        autocast = torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.inference_mode(), autocast, log if log is not None else contextlib.nullcontext():
            out = torch_stage(st, inputs)
        return {n: (adopt or {}).get(n, t) for n, t in out.items()}

    return walk_stages(stages, feed, run)


def selection_rows(stages, ref: dict, got: dict) -> dict:
    """Per selection tensor: how many rows (a patch's neighbour set) differ from fp32's, and the largest score gap
    the half chain's choice crossed, on fp32's own scores (zsad.selection.TopKSelection.check with eps = 0)."""
    out = {}
    for st in stages:
        for name, spec in st.selections.items():
            scores = spec.raw_scores(_numpy(ref[spec.source]))
            check = spec.check(scores, _numpy(ref[name]), _numpy(got[name]), 0.0)
            out[name] = {"rows": check.rows, "differing": check.differing, "max_gap": check.max_gap}
    return out


def compare_method(method, images: torch.Tensor, dtypes=("fp16", "bf16"), per_stage: bool = True,
                   ops: bool = True) -> list[dict]:
    """One row per precision: score / map errors against fp32 (end to end, and on the fp32 selections), finiteness,
    selections, per-stage errors, the ops' precision and the times."""
    from zsad.data.feeds import synthetic_feed

    method.eval()
    stages = method.stages()  # outside autocast: static text and folded constants are made in fp32, as in serving
    feed = synthetic_feed(method, images)
    t0 = time.perf_counter()
    ref = run_chain(stages, feed)
    t_fp32 = time.perf_counter() - t0
    selections = {n: ref[n] for st in stages for n in st.selections}
    rows = []
    for key in dtypes:
        dtype = DTYPES[key]
        t0 = time.perf_counter()
        got = run_chain(stages, feed, dtype)
        seconds = time.perf_counter() - t0
        row = {"precision": key, "tol": TOL[dtype], "fp32_s": round(t_fp32, 2), "half_s": round(seconds, 2)}
        score, amap = _numpy(got["score"]), _numpy(got["anomaly_map"])
        row["finite"] = bool(np.isfinite(score).all() and np.isfinite(amap).all())
        row["score_rel"] = rel(_numpy(ref["score"]), score)
        row["map_rel"] = rel(_numpy(ref["anomaly_map"]), amap)
        if selections:
            row["selections"] = selection_rows(stages, ref, got)
            fixed = run_chain(stages, feed, dtype, adopt=selections, reuse=got)
            row["score_rel_on_fp32_selection"] = rel(_numpy(ref["score"]), _numpy(fixed["score"]))
            row["map_rel_on_fp32_selection"] = rel(_numpy(ref["anomaly_map"]), _numpy(fixed["anomaly_map"]))
        if per_stage:
            row["stages"] = stage_errors(stages, ref, dtype)
        if ops:
            # a separate run on one image under the profiler (its time is not the chain's)
            log = PrecisionLog()
            run_chain(stages, {k: v[:1] for k, v in feed.items()}, dtype, log=log)
            row["ops"] = log.summary()
        rows.append(row)
    return rows


def stage_errors(stages, ref: dict, dtype: torch.dtype) -> dict:
    """Each stage alone under autocast on the fp32 chain's inputs: max relative error per float output."""
    out = {}
    for st in stages:
        got = run_chain([st], {n: ref[n] for n in st.inputs}, dtype)
        out[st.name] = {n: rel(_numpy(ref[n]), _numpy(got[n])) for n in st.outputs
                        if ref[n].is_floating_point()}
    return out


HALF_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile", "avx512_vnni")


def cpu_name_and_flags(cpu) -> tuple[str, list[str]]:
    """``cpu`` (a zsad.cpu.CpuInfo)'s model name and which of the half-precision ISA flags it has."""
    name = cpu.model if cpu.model != "unknown" else (platform.processor() or "unknown")
    return name, [f for f in HALF_FLAGS if f in cpu.flags]


def table(records: list[dict]) -> str:
    """A markdown table of ``compare_method`` records (one row per method x precision)."""
    lines = ["| method | precision | tol | score rel | map rel | finite | selections differing (max gap) | "
             "score / map rel on fp32 selection | worst stage output alone | fp32 s | half s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        for r in rec["rows"]:
            sel = r.get("selections", {}).get("knn_index")
            sel_s = f"{sel['differing']} / {sel['rows']} ({sel['max_gap']:.2g})" if sel else "-"
            fixed = (f"{r['score_rel_on_fp32_selection']:.2g} / {r['map_rel_on_fp32_selection']:.2g}"
                     if "map_rel_on_fp32_selection" in r else "-")
            worst = max(((err, f"{st}.{name}") for st, outs in r.get("stages", {}).items()
                         for name, err in outs.items()), default=None)
            worst_s = f"{worst[1]} {worst[0]:.2g}" if worst else "-"
            lines.append(f"| {rec['method']} | {r['precision']} | {r['tol']} | {r['score_rel']:.2g} | "
                         f"{r['map_rel']:.2g} | {r['finite']} | {sel_s} | {fixed} | {worst_s} | {r['fp32_s']} | "
                         f"{r['half_s']} |")
    return "\n".join(lines)


def write_report(records: list[dict], stem: Path, command: str) -> tuple[Path, Path]:
    """STEM.json (the records) and STEM.md (command, machine, the table, and per method and precision the compute
    kernels that ran in fp32 under autocast). Refuses to replace files it did not write this call."""
    from datetime import date

    paths = stem.with_suffix(".json"), stem.with_suffix(".md")
    for path in paths:
        if path.exists():
            raise SystemExit(f"error: {path} exists; choose another --report stem (nothing was overwritten)")
    first = records[0]
    lines = [f"# fp16 / bf16 on the CPU against fp32 ({date.today().isoformat()})", "", "```bash", command, "```", "",
             f"CPU: {first['cpu']} ({first['threads']} threads; flags {', '.join(first['cpu_flags']) or 'none'}); "
             f"torch {first['torch']}; profile {first['profile']}"
             + (f" at the paper widths with {first['shallow_blocks']} vision blocks" if first["shallow_blocks"] else "")
             + f"; batch {first['batch']} synthetic-defect images; random weights (no accuracy meaning).", "",
             "Errors are max |half - fp32| / max |fp32| of the score and the anomaly map (the GPU tests' comparison, "
             "tol = their tolerance). BAG-CLIP's kNN selection is a step: rows whose neighbour set differs from fp32's "
             "and, after adopting fp32's selection, the continuous error alone. 'worst stage output alone': each "
             "stage run under autocast on the fp32 chain's inputs.", "", table(records), "",
             "## Compute kernels that ran in fp32 under autocast", "",
             "What CPU autocast does not lower, and what zsad keeps fp32 on purpose (zsad.modules.precision).", ""]
    for rec in records:
        for r in rec["rows"]:
            ops = r.get("ops")
            if ops is not None:
                fp32 = ", ".join(f"{op} x{ops['fp32'][op]}" for op in ops["fp32_compute"]) or "none"
                lines.append(f"- {rec['method']} {r['precision']}: {fp32}; half kernels "
                             f"{sum(ops['half'].values())}, fp32 {sum(ops['fp32'].values())}, "
                             f"mixed {sum(ops['mixed'].values())}")
    lines += ["", "Peak RSS per method (GB): " + ", ".join(f"{r['method']} {r['peak_rss_gb']}" for r in records), ""]
    paths[0].write_text(json.dumps({"command": command, "records": records}, indent=1, default=float) + "\n")
    paths[1].write_text("\n".join(lines))
    return paths


def main(argv=None) -> None:
    import zsad.methods as M
    from zsad.export.parity import synthetic_images

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="paper")
    p.add_argument("--methods", default=",".join(M.available()))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shallow", type=int, default=0, help="vision blocks of a paper-width shallow ViT (0: the profile)")
    p.add_argument("--no-per-stage", action="store_true")
    p.add_argument("--no-ops", action="store_true", help="skip the (slow) run that records each op's precision")
    p.add_argument("--out", required=True, help="folder for <method>.json (kept: a method already there is skipped)")
    p.add_argument("--report", help="also write REPORT.json / REPORT.md from every <method>.json in --out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from zsad.cpu import read_cpu

    cpu, flags = cpu_name_and_flags(read_cpu(measure=False))
    for name in args.methods.split(","):
        if (out / f"{name}.json").exists():
            print(f"{name}: {out / (name + '.json')} exists, kept")
            continue
        t0 = time.perf_counter()
        if args.shallow:
            size = 336 if name == "sowa" else 518
            arch = out / f"vit-1024-{args.shallow}block-{size}.json"
            arch.write_text(json.dumps(shallow_config(args.shallow, size)))
            method = M.create(name, args.profile, **shallow_overrides(name, str(arch), size, args.shallow))
        else:
            method = M.create(name, args.profile, backbone={"pretrained": None})
        build_s = time.perf_counter() - t0
        images = torch.from_numpy(synthetic_images(method.image_size, n=args.batch))
        rows = compare_method(method, images, per_stage=not args.no_per_stage, ops=not args.no_ops)
        record = {"method": name, "profile": args.profile, "shallow_blocks": args.shallow, "batch": args.batch,
                  "image_size": method.image_size, "arch": method.backbone.info.arch, "build_s": round(build_s, 1),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
                  "cpu": cpu, "cpu_flags": flags, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "rows": rows}
        (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=float))
        for r in rows:
            print(f"{name:12s} {r['precision']}: score {r['score_rel']:.3g} map {r['map_rel']:.3g} "
                  f"(tol {r['tol']}) finite {r['finite']} fp32 {r['fp32_s']}s half {r['half_s']}s "
                  f"fp32 compute ops {r.get('ops', {}).get('fp32_compute')}")
    if args.report:
        import sys

        records = [json.loads((out / f"{n}.json").read_text()) for n in args.methods.split(",")]
        for path in write_report(records, Path(args.report), "python -m zsad.bench.half_precision " + " ".join(
                sys.argv[1:] if argv is None else argv)):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
