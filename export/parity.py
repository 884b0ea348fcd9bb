"""The parity gate: an exported stage is written only if it reproduces the PyTorch module it came from.

For every stage, on fresh random inputs and on the real inputs that synthetic-defect images produce upstream,
at batch 1 and batch > 1; then the whole chain end to end on the images. Error measure per tensor:
``max|exported - torch| / max|torch|`` (relative to the tensor's scale; element-wise relative error explodes
near zero, e.g. for probabilities). Tolerances: fp32 1e-4; fp16 2e-2 (fp16 has a 2^-11 ~ 5e-4 unit roundoff and
the encoder accumulates it over 24 blocks; the image-score ranking must still match). The end-to-end image scores
must rank the images identically (pairs closer than the tolerance may swap).

Discontinuous steps (``Stage.selections``, zsad.selection: BAG-CLIP's kNN neighbours) are compared by their tie
rule, never by value: a differing selection passes only where it is a near-tie within the tolerance (relative to
the scores' scale), and the end-to-end comparison runs the torch chain on the exported chain's selections
(:func:`reference_on_selections`), so everything continuous keeps the same tolerance. Each selection row reports
how many selections differed and the largest score gap crossed. The same function serves every comparison that
meets such a step: this gate, served == eager, zsad-bench's parity columns.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from zsad import ZsadError
from zsad.data.feeds import synthetic_class_names, synthetic_images  # noqa: F401 (re-exported)
from zsad.methods.stages import walk_stages
from zsad.selection import TopKSelection

FP32_TOL = 1e-4
FP16_TOL = 2e-2

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class ParityRow:
    stage: str
    case: str
    tensor: str
    max_abs: float
    max_rel: float
    tol: float
    # selection rows (zsad.selection): how many selections differed from torch's (all near-ties when ok); max_abs
    # then holds the largest score gap crossed and tol the score perturbation allowed
    differing: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.max_rel <= self.tol)


class ParityError(ZsadError):
    def __init__(self, row: ParityRow, rows: list[ParityRow]):
        super().__init__(f"parity check failed for stage '{row.stage}', tensor '{row.tensor}' ({row.case}): "
                         + (f"{row.detail}; " if row.detail else
                            f"max relative error {row.max_rel:.3g} > {row.tol:g} (max abs {row.max_abs:.3g}); ")
                         + "nothing was written for this stage")
        self.row, self.rows = row, rows


def compare(stage: str, case: str, name: str, ref: np.ndarray, got: np.ndarray, tol: float) -> ParityRow:
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.shape != got.shape:
        return ParityRow(stage, case, f"{name} (shape {got.shape} != {ref.shape})", float("inf"), float("inf"), tol)
    if not np.isfinite(got).all():
        return ParityRow(stage, case, f"{name} (non-finite values)", float("inf"), float("inf"), tol)
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return ParityRow(stage, case, name, diff, diff / max(scale, 1e-12), tol)


def torch_runner(module: torch.nn.Module, inputs: Sequence[str], outputs: Sequence[str]) -> Runner:
    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in inputs])
        out = out if isinstance(out, tuple) else (out,)
        # float tensors as fp32 (fp16 stages compare in fp32); integer ones (token positions) keep their type
        return {n: (o.float() if o.is_floating_point() else o).cpu().numpy() for n, o in zip(outputs, out, strict=True)}

    return run


def ort_runner(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=list(providers))
    names = [o.name for o in sess.get_outputs()]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = {i.name for i in sess.get_inputs()}
        return dict(zip(names, sess.run(None, {k: v for k, v in feed.items() if k in wanted}), strict=True))

    return run


def _random_feed(stage, batch: int, seed: int) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    return {n: t.numpy() for n, t in zip(stage.inputs, stage.example_inputs(batch, gen), strict=True)}


def compare_selection(stage: str, case: str, name: str, spec: TopKSelection, source, ref, got,
                      tol: float) -> ParityRow:
    """A selection output: equal sets, or near-ties within ``tol`` of the scores' scale (zsad.selection)."""
    scores = spec.raw_scores(source)
    eps = tol * max(float(np.abs(scores).max()) if scores.size else 0.0, 1e-12)
    c = spec.check(scores, ref, got, eps)
    return ParityRow(stage, case, f"{name} (selection)", c.max_gap, 0.0 if c.ok else float("inf"), eps,
                     differing=c.differing,
                     detail="" if c.ok else (f"{c.unexplained} of {c.rows} selections differ beyond a near-tie "
                                             f"({c.first_bad})"))


def compare_outputs(stage, case: str, inputs: dict, ref: dict, got: dict, tol: float) -> list[ParityRow]:
    """Every output of ``stage`` (a Stage): by value, or by the tie rule where it is a selection."""
    rows = []
    for name in stage.outputs:
        spec = stage.selections.get(name)
        if spec is None:
            rows.append(compare(stage.name, case, name, ref[name], got[name], tol))
        else:
            source = ref[spec.source] if spec.source in ref else inputs[spec.source]
            rows.append(compare_selection(stage.name, case, name, spec, source, ref[name], got[name], tol))
    return rows


def _same_selection(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool((np.sort(a, axis=-1) == np.sort(b, axis=-1)).all())


def _torch_stage(st, inputs: dict) -> dict:
    """A stage by its torch module on numpy inputs (numpy out): the reference every runtime is compared with."""
    return torch_runner(st.module, list(st.inputs), list(st.outputs))(inputs)


def reference_on_selections(stages, feed: dict, got: dict, tol: float,
                            env: dict | None = None) -> tuple[dict, list[ParityRow]]:
    """The torch chain on ``feed`` (numpy, batch-major), taking every selection tensor ``got`` holds (another
    runtime's run of the same chain) in place of its own once it passed the tie rule; one selection row each.

    ``env``: the torch chain's own outputs on ``feed`` where already computed (reused up to the first selection
    that differs). Returns (reference tensors by name, the selection rows); a row that fails is returned, not
    raised: the caller decides (the gate raises, zsad-bench reports)."""
    rows: list[ParityRow] = []
    diverged = env is None

    def run(st, inputs: dict) -> dict:
        nonlocal diverged
        out = _torch_stage(st, inputs) if diverged else {n: env[n] for n in st.outputs}  # type: ignore[index]
        for name, spec in st.selections.items():
            if name not in got:
                continue
            source = out[spec.source] if spec.source in out else inputs[spec.source]
            rows.append(compare_selection(st.name, "chain", name, spec, source, out[name], got[name], tol))
            if not _same_selection(out[name], got[name]):
                out = {**out, name: np.asarray(got[name]).astype(out[name].dtype)}
                diverged = True
        return out

    return walk_stages(stages, feed, run), rows


def check_stages(stages, runners: dict[str, Runner], feed: dict[str, np.ndarray], tol: float,
                 seed: int = 0) -> list[ParityRow]:
    """Stage by stage (random + real inputs, batch 1 and the feed's batch), then the chain end to end.

    Raises ParityError at the first failing tensor; returns all rows when everything passes.
    ``feed``: the chain's inputs, batch-major (the images, and e.g. Bayes-PFL's class-name tokens).
    Each stage meets the inputs the torch chain gives it; selections are compared by their tie rule, and the end-to-end
    reference is the torch chain on the exported chain's selections (:func:`reference_on_selections`), at the same
    tolerance as every stage.
    """
    rows: list[ParityRow] = []

    def record(row: ParityRow):
        rows.append(row)
        if not row.ok:
            raise ParityError(row, rows)

    batches = sorted({1, len(next(iter(feed.values())))})
    for b in batches:
        inputs_b = {k: v[:b] for k, v in feed.items()}
        env = walk_stages(stages, inputs_b, _torch_stage)  # the torch chain: every stage's realistic inputs
        done: dict[str, tuple[dict, dict]] = {}  # stage -> (inputs, exported outputs) already run on them
        for st in stages:
            if st.random_inputs_meaningful():  # random token ids are not meaningful; random indices are
                rand = _random_feed(st, b, seed + b)
                for row in compare_outputs(st, f"random b={b}", rand, _torch_stage(st, rand), runners[st.name](rand),
                                           tol):
                    record(row)
            inputs = {n: env[n] for n in st.inputs}
            got = runners[st.name](inputs)
            done[st.name] = (inputs, got)
            for row in compare_outputs(st, f"images b={b}", inputs, {n: env[n] for n in st.outputs}, got, tol):
                record(row)

        def exported(st, inputs: dict, done=done) -> dict:
            seen = done.get(st.name)
            if seen is not None and all(inputs[n] is seen[0][n] for n in st.inputs):
                return seen[1]  # the same arrays (the chain's first stages): no second run
            return runners[st.name](inputs)

        chain = walk_stages(stages, inputs_b, exported)  # the exported chain alone
        reference, selection_rows = reference_on_selections(stages, inputs_b, chain, tol, env)
        for row in selection_rows:
            row.stage, row.case = "end-to-end", f"images b={b}"
            record(row)
        for name in stages[-1].outputs:
            record(compare("end-to-end", f"images b={b}", name, reference[name], chain[name], tol))
        if "score" in reference and b > 1:
            record(_ranking_row(reference["score"], chain["score"], tol, b))
    return rows


def discordant_pairs(ref: np.ndarray, got: np.ndarray, tie: float) -> int:
    """Image pairs ``got`` orders the other way round from ``ref`` although ``ref`` keeps them more than
    ``tie * max|ref|`` apart (closer pairs are near-ties of the ranking: they may swap)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.size < 2:
        return 0
    gap = ref[:, None] - ref[None, :]
    swapped = np.sign(gap) != np.sign(got[:, None] - got[None, :])
    apart = np.abs(gap) > tie * max(float(np.abs(ref).max()), 1e-12)
    return int(np.triu(swapped & apart, k=1).sum())


def _ranking_row(ref: np.ndarray, got: np.ndarray, tol: float, b: int) -> ParityRow:
    """Count image pairs ranked differently that the tolerance cannot explain."""
    bad = discordant_pairs(ref, got, tol)
    # 0 discordant pairs -> 0 error; any -> reported as an infinite error on the 'score ranking' tensor
    return ParityRow("end-to-end", f"images b={b}", "score ranking", float(bad), 0.0 if bad == 0 else float("inf"), tol)


def format_table(rows: list[ParityRow]) -> str:
    head = f"{'stage':<14}{'case':<23}{'tensor':<22}{'max abs':>11}{'max rel':>11}{'tol':>9}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.stage:<14}{r.case:<23}{r.tensor:<22}{r.max_abs:>11.3g}{r.max_rel:>11.3g}{r.tol:>9.0e}  "
                     + ("yes" if r.ok else "NO")
                     + (f"  ({r.differing} selections differ: near-ties, max gap in max abs)" if r.differing else ""))
    return "\n".join(lines)


def write_report(path: Path, rows: list[ParityRow], meta: dict) -> None:
    sel = [r for r in rows if r.differing is not None]
    data = {**meta, "measure": "max|exported - torch| / max|torch| per tensor",
            "worst": max((r.max_rel for r in rows), default=0.0),
            **({"selections": {"rule": "zsad.selection: differing selections must be near-ties within the row's tol "
                                        "(a score perturbation); the chain end to end is compared on the exported "
                                        "selections",
                               "differing": sum(r.differing or 0 for r in sel),
                               "max_tie_gap": max(r.max_abs for r in sel)}} if sel else {}),
            "rows": [dict(asdict(r), ok=r.ok) for r in rows]}
    Path(path).write_text(json.dumps(data, indent=2))


# A deployed chain (another runtime or precision) against torch fp32 eager on the same images: what zsad-bench and
# its served rows report. Looser than the export gate's per-stage tolerances because the whole chain accumulates.
CHAIN_TOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1, "int8": 1e-1, "int8-bf16": 1e-1, "int8-qk-bf16": 1e-1}


def rank_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Fraction of image pairs that both score vectors order the same way (1.0 = identical ranking)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    pairs = [(i, j) for i in range(len(ref)) for j in range(i + 1, len(ref))]
    if not pairs:
        return 1.0
    return float(np.mean([np.sign(ref[i] - ref[j]) == np.sign(got[i] - got[j]) for i, j in pairs]))


def chain_parity(ref_score, ref_map, score, amap, precision: str) -> dict:
    """Max relative errors (as ``compare``) and rank agreement of a chain's outputs vs torch fp32, and ``ok``.

    fp32 / fp16 pass within ``CHAIN_TOL`` with an identical ranking. bf16 / int8 / int8-bf16 also get the precision
    gate's map correlation and score ranking (``zsad.export.openvino_export``: no pair further apart than the gate's
    ``score_tie`` swapped) and pass on those: their max relative error is large by nature (pixel AUROC needs masks:
    the gate at export checks it)."""
    tol = CHAIN_TOL[precision]
    out = {"score_max_rel": compare("chain", "images", "score", ref_score, score, tol).max_rel,
           "map_max_rel": compare("chain", "images", "anomaly_map", ref_map, amap, tol).max_rel,
           "rank_agreement": rank_agreement(ref_score, score)}
    within = max(out["score_max_rel"], out["map_max_rel"]) <= tol
    if precision in GATED:
        gate = GateThresholds()
        m = gate_metrics(ref_score, ref_map, score, amap, np.zeros(np.shape(ref_map)), gate.score_tie)
        out.update({k: m[k] for k in ("map_corr", "score_spearman", "score_swaps")})
        out["ok"] = bool(within and m["map_corr"] >= gate.map_corr and m["score_swaps"] == 0)
    else:
        out["ok"] = bool(within and out["rank_agreement"] == 1.0)
    return out

# -- the precision gate's comparison (bf16 / int8 / int8-bf16 against fp32; zsad.export.openvino_export runs it) -----
GATED = ("bf16", "int8", "int8-bf16", "int8-qk-bf16")  # judged by the precision gate, not the fp32 parity gate


@dataclass
class GateThresholds:
    map_corr: float = 0.99  # Pearson correlation of all anomaly-map pixels, >=
    # image scores: no pair whose fp32 scores lie more than score_tie * max|score| apart may be ranked the other
    # way. Closer pairs are near-ties of the ranking (a trained model's scores cluster: 16 images within 0.1, some
    # 1e-4 apart, where bf16 moves a score by ~2e-3); Spearman counted every such swap and refused trained models
    score_tie: float = 0.01
    pixel_auroc_points: float = 0.5  # |pixel AUROC - fp32 pixel AUROC| * 100, <=


def gate_metrics(ref_score, ref_map, score, amap, masks, score_tie: float = GateThresholds.score_tie) -> dict:
    """Map correlation, image-score ranking (pairs swapped beyond ``score_tie``; Spearman for information) and pixel
    AUROC (zsad.metrics) of a low-precision chain vs fp32; without ``masks`` (zsad-deploy's check of a served
    version: its stored images have none) no AUROC, and gate_failures skips that condition."""
    from scipy.stats import spearmanr

    from zsad.metrics import auroc

    ref_map, amap = np.asarray(ref_map, np.float64), np.asarray(amap, np.float64)
    auroc_keys = ("pixel_auroc_fp32", "pixel_auroc", "pixel_auroc_diff_points") if masks is not None else ()
    if not np.isfinite(amap).all() or not np.isfinite(score).all():
        nan = float("nan")
        return {"map_corr": nan, "score_spearman": nan, "score_swaps": nan, "score_tie": score_tie,
                **dict.fromkeys(auroc_keys, nan)}
    corr = float(np.corrcoef(ref_map.ravel(), amap.ravel())[0, 1])
    rho = float(spearmanr(np.asarray(ref_score, np.float64), np.asarray(score, np.float64)).statistic)
    swaps = discordant_pairs(ref_score, score, score_tie)
    metrics = {"map_corr": corr, "score_spearman": rho, "score_swaps": swaps, "score_tie": score_tie}
    if masks is not None:
        labels = np.asarray(masks).ravel() > 0.5
        a_ref, a_got = auroc(labels, ref_map.ravel()), auroc(labels, amap.ravel())
        metrics.update(pixel_auroc_fp32=a_ref, pixel_auroc=a_got, pixel_auroc_diff_points=abs(a_got - a_ref) * 100.0)
    return metrics


def gate_failures(metrics: dict, th: GateThresholds) -> list[str]:
    """The gate's failed conditions, as text (empty: passed). NaN fails every comparison."""
    fails = []
    if not metrics["map_corr"] >= th.map_corr:
        fails.append(f"anomaly-map correlation {metrics['map_corr']:.5f} < {th.map_corr}")
    if metrics["score_swaps"] != 0:  # NaN (non-finite outputs) fails too
        fails.append(f"{metrics['score_swaps']} image pairs more than {metrics['score_tie']:g} x the score scale "
                     f"apart ranked the other way (Spearman {metrics['score_spearman']:.5f})")
    if "pixel_auroc_diff_points" in metrics and not metrics["pixel_auroc_diff_points"] <= th.pixel_auroc_points:
        fails.append(f"pixel AUROC {100 * metrics['pixel_auroc']:.2f} vs fp32 {100 * metrics['pixel_auroc_fp32']:.2f}"
                     f" ({metrics['pixel_auroc_diff_points']:.2f} points > {th.pixel_auroc_points})")
    return fails
