"""Export a method into a Triton model repository, stage by stage, behind the parity gate.

Generic over ``Method.stages()``. Flow: build the method (checkpoint, or untrained with a loud warning) ->
export every stage to ONNX in a scratch directory -> parity gate (stage by stage, random + real inputs, batch 1
and > 1, then the chain end to end) -> only then write the repository (configs validated against Triton's
schema) and the parity report. A failing stage writes nothing and raises ``ParityError`` naming the stage, the
tensor and the error.

Never losing a user's files: everything is built in a temporary folder beside ``--out`` (same file system; see
``_scratch_folder`` for why not inside), and each model folder carries a marker file, :data:`MARKER_NAME`. An
existing folder of the same name is replaced only if it carries that marker (an earlier export), unless ``force``;
otherwise the export is refused before any work, with nothing deleted. ``--name`` must be a plain identifier, so
no model folder can land outside ``--out``.

Versions (``version``, ``zsad-export --version N``): the export is built and gated as any other, then its models
land as version N of an export already in ``--out`` (zsad.export.versions), refused unless that export has the
same models and configs and no version N yet; what is served does not change until ``zsad-deploy`` switches.
Every export stores its check (``reference_vN.npz``: the gate's images and their eager answers) for that switch.

Options: :class:`ExportOptions`, one field per ``zsad-export`` option (export/cli.py). Steps: ``_export_and_gate``
(ONNX / plans / IR per stage + the gates) -> ``_write_repository`` (one writer per kind of model) ->
``_write_report_and_markers`` -> ``_install``. What differs per backend is asked of its runtime
(zsad.export.runtimes: its files, the runners the gate checks them with, its chain models); nothing here names one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zsad import ZsadError, __version__
from zsad.export import parity, runtimes, versions
from zsad.export.onnx_export import export_metadata, stamp_stage_files
from zsad.export.triton_repo import (
    RepoOptions,
    Sym,
    ensemble_config,
    ensemble_step,
    preprocess_config,
    python_model_files,
    repository_readme,
    restore_config,
    restore_warmup_files,
    string_tensor_file,
    tensor_config,
    text_input_config,
    text_output_config,
    text_warmup_files,
    write_model,
)

if TYPE_CHECKING:  # openvino_export is imported where an OpenVINO backend is used
    from zsad.export.parity import GateThresholds


MARKER_NAME = versions.MARKER_NAME
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_out_and_name(out: Path, name: str | None) -> None:
    """Refuse an --out that is not a folder and a --name that could leave it, before anything is built."""
    if out.exists() and not out.is_dir():
        raise ZsadError(f"--out {out} is a file, not a folder (give a model repository folder)")
    if name is not None and not _PLAIN_NAME.fullmatch(name):
        raise ZsadError(f"--name {name[:80]!r} is not a plain identifier (letters, digits, '_' and '-', starting "
                        f"with a letter or digit, at most 64 characters)")


def planned_models(name: str, stages, text_inputs, backend: str, resize_to_input: bool) -> list[str]:
    """The model folders an export writes (``_write_repository`` checks it writes exactly these)."""
    models = [f"{name}_preprocess", f"{name}_preprocess_raw"]
    models += [f"{name}_text_{ti.request_name}" for ti in text_inputs]
    models += runtimes.get(backend).model_names(name, stages)
    models += [f"{name}_restore"] if resize_to_input else []
    return models + [name, f"{name}_raw"]


def refuse_foreign_folders(repo: Path, models: list[str], force: bool) -> None:
    """Refuse to replace anything under ``repo`` named like one of ``models`` that an export did not write."""
    foreign = [m for m in models if os.path.lexists(repo / m) and not (repo / m / MARKER_NAME).is_file()]
    if foreign and not force:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ZsadError(f"--out {repo} already holds {shown}, not written by zsad-export (no {MARKER_NAME}); "
                        f"nothing was changed: move them away, choose another --out or --name, or give --force "
                        f"to replace them")


def _scratch_folder(repo: Path) -> Path:
    """The temporary build folder: beside ``repo`` (same file system, so moving models in is a rename), not inside
    it: tritonserver takes every folder of its repository, hidden ones too, for a model, and refuses to start
    on a leftover build folder (checked with the bundled 2.51). Inside only where the parent is not writable."""
    prefix = f".{repo.resolve().name}.zsad-export-tmp-"
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=repo.resolve().parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=repo))


def _install(staging: Path, repo: Path, models: list[str], scratch: Path) -> None:
    """Move the finished model folders into ``repo``; replaced ones go to ``scratch`` (deleted after), and come
    back if a move fails half-way."""
    aside = scratch / "replaced"
    aside.mkdir()
    moved: list[str] = []
    try:
        for m in models:
            if os.path.lexists(repo / m):
                os.rename(repo / m, aside / m)
                moved.append(m)
            os.rename(staging / m, repo / m)
    except OSError as err:
        for m in moved:
            if not os.path.lexists(repo / m):
                os.rename(aside / m, repo / m)
        raise ZsadError(f"could not move the exported models into {repo}: {err}") from err


def _check_new_version(repo: Path, name: str, planned: list[str], version: int) -> None:
    """Before any work: version N joins an export of the same models that has no version N yet."""
    existing = versions.export_models(repo, name)
    if sorted(existing) != sorted(planned):
        raise ZsadError(f"--version: {repo / name} holds the models {sorted(existing)}, this export would write "
                        f"{sorted(planned)}: a different method or layout; export it under another --name")
    taken = [m for m, ensemble in existing.items() if not ensemble and os.path.lexists(repo / m / str(version))]
    if taken:
        raise ZsadError(f"--version {version}: {repo / taken[0]}/{version} exists already; versions are never "
                        f"overwritten: choose a new number (the versions there: "
                        f"{sorted(int(d.name) for d in (repo / taken[0]).iterdir() if d.name.isdigit())})")


def _install_version(staging: Path, repo: Path, name: str, models: list[str], version: int) -> Path:
    """Move the staged models' version folder in as version ``version`` of the export in ``repo`` (its configs
    pinned first, so nothing served changes); returns the version's parity report."""
    versions.check_same_layout(repo, staging, name, models)
    existing = versions.export_models(repo, name)
    versions.pin_active(repo, name, existing)
    for m, ensemble in existing.items():
        if not ensemble:
            os.rename(staging / m / "1", repo / m / str(version))
    report = repo / name / f"parity_report_v{version}.json"
    os.replace(staging / name / "parity_report.json", report)
    os.replace(versions.reference_path(staging, name, version), versions.reference_path(repo, name, version))
    return report


def _write_reference(method, path: Path, max_batch: int, parity_images: int, check: dict | None) -> None:
    """The parity gate's images as a client sends them (uint8) and the eager answers to them: the check
    ``zsad-deploy`` runs on a version before serving it (``check``: its rule, see reference_check)."""
    import torch

    from zsad.data import preprocess
    from zsad.data.feeds import synthetic_class_names, synthetic_raw_images

    raw = synthetic_raw_images(max(1, min(parity_images, max_batch)))
    names = synthetic_class_names(len(raw)) if method.text_inputs() else None
    x = torch.from_numpy(np.stack([preprocess(img, method.image_size) for img in raw]))
    with torch.no_grad():
        out = method(x, names)
    versions.save_reference(path, raw, out.score.numpy(), out.anomaly_map.numpy(), names, check)


def reference_check(opts: ExportOptions) -> dict | None:
    """How zsad-deploy compares a version's served answers with its eager fp32 ones: None (the default, a relative
    tolerance) for fp32; fp16 within the fp16 parity tolerance; bf16 / int8 by the precision gate this export
    passed (map correlation, no image pair ranked otherwise beyond a near-tie): their answers differ from fp32 by
    ~1e-2, on another CPU by other amounts again, so no fixed tolerance fits them."""
    if opts.precision != "fp32":
        th = opts.gate_thresholds or parity.GateThresholds()
        return {"rule": "gate", "precision": opts.precision, "map_corr": th.map_corr, "score_tie": th.score_tie}
    if opts.fp16:
        return {"rule": "relative", "precision": "fp16", "tol": parity.FP16_TOL}
    return None


@dataclass
class ExportResult:
    repo: Path
    models: list[str]
    ensembles: list[str]
    parity_rows: list
    report: Path
    precision: str  # the precision exported (--precision auto: the one kept)


def build_method(opts: ExportOptions):
    """(method, trained): from ``opts.checkpoint`` (``opts.overrides`` are for untrained methods only), or untrained
    from ``opts.model`` at ``opts.profile`` (loud warning); through the one loader, zsad.load."""
    import zsad.methods as M
    from zsad.configs import deep_merge
    from zsad.load import load

    size = {"backbone": {"image_size": opts.image_size}} if opts.image_size else {}
    if not opts.checkpoint:
        if not opts.model:
            raise ZsadError("give --model (and --profile) or --checkpoint")
        M.resolve_config(opts.model, opts.profile)  # an unknown method or profile: its error, not the warning first
        warnings.warn(f"exporting UNTRAINED {opts.model} (no --checkpoint): prompts and heads are random. Fine for "
                      f"architecture benchmarks and tests, useless for detection.", stacklevel=3)
    overrides = size if opts.checkpoint else deep_merge(opts.overrides or {}, size)
    loaded = load(opts.checkpoint, model=opts.model, profile=opts.profile, clip_weights=opts.clip_weights,
                  overrides=overrides)
    return loaded.method, loaded.trained


def check_backend(backend: str, fp16: bool, device: str, precision: str = "fp32") -> runtimes.Runtime:
    """The backend's runtime; refused early, with the reason, where this machine cannot build or verify it."""
    runtime = runtimes.get(backend)
    reason = runtime.available()
    if reason is not None:
        raise ZsadError(reason)
    runtime.check_options(fp16, device, precision)
    return runtime


AUTO = "auto"  # --precision auto: chosen per machine (choose_precision)


def choose_precision(runtime: runtimes.Runtime, fp16: bool, device: str, cpu) -> dict:
    """--precision auto: the precisions to try on ``cpu`` (a zsad.cpu.CpuInfo), fastest first
    (zsad.cpu.precision_preference), kept where ``runtime`` builds and checks them here, each with the reason; the
    export tries them in order and keeps the first that passes its gate. Returns the record the export's report
    keeps: {"requested", "cpu", "candidates" [{precision, reason}], "refused" [{precision, why}]}."""
    import math

    from zsad.cpu import has_bf16, precision_preference
    from zsad.export.openvino_export import OV_HINT, bf16_matmul_ratio

    # the flags say bf16 runs here, not that it is fast: measured where a bf16 precision is on offer
    hinted_bf16 = {p for p, hint in OV_HINT.items() if hint == "bf16"}
    ratio = bf16_matmul_ratio() if has_bf16(cpu.flags) and hinted_bf16 & set(runtime.precisions) else None
    candidates, refused = [], []
    for precision, reason in precision_preference(cpu.flags, ratio):
        if precision not in runtime.precisions:
            refused.append({"precision": precision, "why": f"not a precision of --backend {runtime.name}"})
            continue
        try:
            runtime.check_options(fp16, device, precision)
        except ZsadError as err:
            refused.append({"precision": precision, "why": str(err)})
            continue
        candidates.append({"precision": precision, "reason": reason})
    if not candidates:  # fp32 is every runtime's and always preferred last: its own refusal is the user's error
        raise ZsadError(refused[-1]["why"])
    cpu_record = {k: v for k, v in cpu.summary().items()
                  if k in ("model", "vendor", "physical_cores", "isa_flags", "isa_cap")}
    if ratio is not None:  # (JSON has no infinity)
        cpu_record["bf16_linear_time_vs_fp32"] = round(ratio, 3) if math.isfinite(ratio) else "bf16 does not compile"
    return {"requested": AUTO, "cpu": cpu_record, "candidates": candidates, "refused": refused}


@dataclass
class ExportOptions:
    """Everything ``zsad-export`` is told, grouped as its command line is (one field per option)."""

    # what to export: a trained checkpoint, or an untrained method from a profile (``overrides`` deep-merge into it)
    model: str | None = None
    checkpoint: str | None = None
    profile: str = "paper"
    image_size: int | None = None
    clip_weights: str | None = None
    overrides: dict | None = None
    # where: the model repository, the model name in it, and whether foreign folders of that name may be replaced
    out: str | Path = "model_repository"
    name: str | None = None
    force: bool = False
    # serving config, written into every config.pbtxt
    backend: str = "onnxruntime"
    device: str | None = None  # cpu | gpu; default: the runtime's (Runtime.default_device)
    max_batch: int = 32
    preferred_batch: list[int] | None = None
    queue_delay_us: int = 200
    dynamic_batching: bool = True
    instances: int = 1
    resize_to_input: bool = False
    max_pixels: int = 50_000_000
    # few-shot: K normal images of one class baked into the graph as the memory bank
    support: str | Path | None = None
    shots: int = 0
    support_class: str | None = None
    support_seed: int = 0
    # precision and the gates that check it
    fp16: bool = False
    precision: str = "fp32"  # OpenVINO backends: fp32, bf16, the int8 mixes, or auto (choose_precision)
    calibration: str | Path | None = None
    calibration_images: int = 32
    portable_int8: bool = False  # int8 weights in 7 bits even where this CPU has VNNI (runs on CPUs without it)
    gate_images: int = 16
    gate_thresholds: GateThresholds | None = None  # None: its defaults
    parity_images: int = 4
    ov_hint: str = "latency"  # OpenVINO backends' performance hint in the served configs (checked by RepoOptions)
    # None: a plain export (version 1, replacing an earlier export of the name); N: version N added beside the
    # versions of the export already in ``out`` (zsad.export.versions)
    version: int | None = None

    def __post_init__(self):
        if self.device not in (None, "cpu", "gpu"):
            raise ZsadError(f"--device must be cpu or gpu, got '{self.device}'")
        if self.version is not None and not 1 <= self.version < 2**31:
            raise ZsadError(f"--version must be a positive integer, got {self.version}")

    @property
    def target_device(self) -> str:
        """``device``, or the backend's default when it is not given."""
        return self.device or runtimes.get(self.backend).default_device

    @property
    def tolerance(self) -> float:
        """The parity gate's per-stage tolerance."""
        return parity.FP16_TOL if self.fp16 else parity.FP32_TOL

    def repo_options(self, name: str) -> RepoOptions:
        return RepoOptions(name=name, backend=self.backend, max_batch=self.max_batch,
                           instance_kind="KIND_GPU" if self.target_device == "gpu" else "KIND_CPU",
                           instances=self.instances, preferred_batch=self.preferred_batch or [],
                           queue_delay_us=self.queue_delay_us,
                           resize_to_input=self.resize_to_input, fp16=self.fp16, max_pixels=self.max_pixels,
                           dynamic_batching=self.dynamic_batching, ov_hint=self.ov_hint)


def export_model(opts: ExportOptions, log=print) -> ExportResult:
    """See the module docstring and :class:`ExportOptions`.

    Few-shot (``support`` + ``shots``, methods with a few-shot mode): the memory bank of K normal images of ONE
    class (a folder of images, or ``support_class`` of a data-set root's train/good) is built before the stages
    are taken, so it is baked into the exported graph as constants: one exported model per product.

    OpenVINO backends (``precision`` fp32 / bf16 / int8, see zsad.export.openvino_export): the ONNX stages pass
    the fp32 gate first, then the IR does (fp32: the same parity gate; bf16 / int8: the precision gate on
    ``gate_images`` synthetic images, ``gate_thresholds`` a GateThresholds; int8 calibrated on ``calibration``).
    """
    repo = Path(opts.out)
    check_out_and_name(repo, opts.name)
    runtime = check_backend(opts.backend, opts.fp16, opts.target_device,
                            "fp32" if opts.precision == AUTO else opts.precision)
    if opts.ov_hint != "latency" and not runtime.takes_ov_hint:
        raise ZsadError(f"--ov-hint {opts.ov_hint} is OpenVINO's performance hint: --backend {runtime.name} has none "
                        "(it is for " + " / ".join(rt.name for rt in runtimes.RUNTIMES.values() if rt.takes_ov_hint)
                        + ")")
    int8 = [p for p in runtime.precisions if "int8" in p]
    if opts.portable_int8 and not (int8 and (opts.precision == AUTO or opts.precision in int8)):
        raise ZsadError(f"--portable-int8 sets the width of int8 weights: it needs an int8 --precision (or auto) of "
                        f"an OpenVINO backend, not --backend {runtime.name} --precision {opts.precision}")
    choice = None
    if opts.precision == AUTO:
        from zsad.cpu import read_cpu

        choice = choose_precision(runtime, opts.fp16, opts.target_device, read_cpu(measure=False))
        log("--precision auto on " + choice["cpu"]["model"] + ": trying " + ", ".join(
            f"{c['precision']} ({c['reason']})" for c in choice["candidates"]))
    method, trained = build_method(opts)
    if opts.support is not None or opts.shots:
        _fit_support(method, opts.support, opts.shots, opts.support_class, opts.support_seed, log)  # adds a stage
    name = opts.name or method.name
    planned = planned_models(name, method.stages(), method.text_inputs(), opts.backend, opts.resize_to_input)
    refuse_foreign_folders(repo, planned, opts.force)
    if opts.version is not None:
        _check_new_version(repo, name, planned, opts.version)
    repo_opts = opts.repo_options(name)
    created_repo = not repo.exists()
    repo.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_folder(repo)
    try:
        stages, stage_files, rows, gate_section, precision = _export_and_gate(method, trained, opts, repo_opts, scratch,
                                                                              log, choice)
        opts = replace(opts, precision=precision)
        staging = scratch / "repo"
        models, ensembles = _write_repository(staging, method, stages, repo_opts, stage_files, trained,
                                              opts.precision)
        if sorted(models) != sorted(planned):
            raise ZsadError(f"internal: wrote models {sorted(models)} but planned {sorted(planned)}")
        _write_report_and_markers(staging, models, method, trained, opts, repo_opts, rows, gate_section, choice)
        version = opts.version or 1
        _write_reference(method, versions.reference_path(staging, name, version), opts.max_batch, opts.parity_images,
                         reference_check(opts))
        if opts.version is None:
            refuse_foreign_folders(repo, planned, opts.force)  # again: the user may have added a folder meanwhile
            _install(staging, repo, models, scratch)
            report = repo / name / "parity_report.json"
        else:
            report = _install_version(staging, repo, name, models, version)
        log(f"wrote {len(models)} models to {repo}" + (f" as version {version}" if opts.version else "")
            + f": ensembles {', '.join(ensembles)}; parity report {report} (worst relative error "
            f"{max(r.max_rel for r in rows):.2e}, tolerance {opts.tolerance:g})")
        if opts.version is not None:
            log(f"serving is unchanged (version {versions.versions_state(repo, name)['active']}); switch a running "
                f"zsad-serve with: zsad-deploy update {repo} --name {name} --version {version}")
        return ExportResult(repo, models, ensembles, rows, report, opts.precision)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created_repo and repo.is_dir() and not any(repo.iterdir()):
            repo.rmdir()  # a failed export into a new folder leaves nothing behind


def _gate_inputs(method, max_batch: int, parity_images: int, log):
    """The parity gate's synthetic images and, for methods with text inputs (Bayes-PFL's class name), the
    images' own class names through the method's encoder."""
    n_images = max(1, min(parity_images, max_batch))
    if n_images == 1:
        log("note: parity gate at batch 1 only (--parity-images 1 or --max-batch 1)")
    import torch

    from zsad.data.feeds import synthetic_feed, synthetic_images

    images = synthetic_images(method.image_size, n=n_images)
    feed = synthetic_feed(method, torch.from_numpy(images))
    return images, {k: v.numpy() for k, v in feed.items() if k != "images"}


def _export_and_gate(method, trained: bool, opts: ExportOptions, repo_opts: RepoOptions, scratch: Path, log,
                     choice: dict | None = None):
    """Export every stage into ``scratch`` and pass it through the gate(s); returns (stages, the files to ship
    per stage, parity rows, the OpenVINO report section or None, the precision exported). A failing gate raises;
    with --precision auto (``choice``, from choose_precision) a precision gate's refusal moves on to the next
    candidate, recorded in ``choice`` ("refused", then "chosen" and "reason")."""
    stages = method.stages()
    images, extra_feed = _gate_inputs(method, opts.max_batch, opts.parity_images, log)
    log(f"exporting {method.name} ({method.profile}, {'trained' if trained else 'UNTRAINED'}) at {method.image_size} "
        f"px, backend {opts.backend}{' fp16' if opts.fp16 else ''}, max batch {opts.max_batch}: stages "
        + " -> ".join(s.name for s in stages))
    runtime = runtimes.get(opts.backend)
    runners, stage_files = runtime.build_stages(method, stages, repo_opts, scratch, log)
    stamp_stage_files(stage_files, export_metadata(method, trained, opts.checkpoint, opts.fp16))  # self-describing
    feed = {"images": images, **extra_feed}
    rows = parity.check_stages(stages, runners, feed, opts.tolerance)
    log(parity.format_table(rows))

    def attempt(precision: str):
        return runtime.after_gate(method, stages, stage_files, replace(opts, precision=precision), scratch, feed, log)

    if choice is None:
        files, gate_section, second_rows = attempt(opts.precision)
        return stages, files, rows + second_rows, gate_section, opts.precision
    precision, (files, gate_section, second_rows) = first_passing(choice, attempt, log)
    return stages, files, rows + second_rows, gate_section, precision


def first_passing(choice: dict, attempt, log=print):
    """--precision auto: ``attempt(precision)`` for each of ``choice``'s candidates in order until one passes its
    gate; a precision gate's refusal (PrecisionGateError) is recorded in ``choice["refused"]`` and the next is
    tried, the last one's refusal raised. Sets ``choice["chosen"]`` and ``choice["reason"]``; returns (the precision,
    what ``attempt`` returned)."""
    from zsad.export.openvino_export import PrecisionGateError

    candidates = [c["precision"] for c in choice["candidates"]]
    for i, precision in enumerate(candidates):
        try:
            result = attempt(precision)
        except PrecisionGateError as err:
            if i == len(candidates) - 1:
                raise
            choice["refused"].append({"precision": precision, "why": str(err)})
            log(f"--precision auto: {precision} refused by its gate ({err}); trying {candidates[i + 1]}")
            continue
        choice["chosen"] = precision
        choice["reason"] = choice["candidates"][i]["reason"] + (
            f"; faster candidates refused by their gates: {', '.join(candidates[:i])}" if i else "")
        log(f"--precision auto chose {precision}: {choice['reason']}")
        return precision, result
    raise ZsadError("internal: --precision auto had no candidate")


def _write_report_and_markers(staging: Path, models: list[str], method, trained: bool, opts: ExportOptions,
                              repo_opts: RepoOptions, rows, gate_section, choice: dict | None = None) -> None:
    """``NAME/parity_report.json`` and the :data:`MARKER_NAME` file in every model folder."""
    tol, name = opts.tolerance, repo_opts.name
    parity.write_report(staging / name / "parity_report.json", rows, {
        "model": name, "method": method.name, "profile": method.profile, "trained": trained,
        "backend": opts.backend, "fp16": opts.fp16, "image_size": method.image_size, "max_batch": opts.max_batch,
        "tolerance": tol,
        "runtime": runtimes.get(opts.backend).gate_runtime(),
        **({"precision": opts.precision, "openvino": gate_section} if gate_section else {}),
        **({"precision": opts.precision, "precision_choice": choice} if choice else {})})
    marker = json.dumps({"written_by": "zsad-export", "zsad": __version__, "export": name,
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2)
    for m in models:
        (staging / m / MARKER_NAME).write_text(marker + "\n")


def _write_repository(repo: Path, method, stages, opts: RepoOptions, stage_files: dict, trained: bool,
                      precision: str = "fp32") -> tuple[list[str], list[str]]:
    """Write every model of the export into ``repo``: the preprocess models, the text models, the stage models
    (or one torch chain), the optional restore model and the two ensembles; returns (models, ensembles)."""
    chain_in = _request_tensors(method, stages)
    text_inputs = method.text_inputs()
    final = stages[-1]
    out_tensors = [tensor_config(n, s, final.dtype(n)) for n, s in final.outputs.items()]
    # selections (BAG-CLIP's knn_index) leave the ensemble too, for served == eager checks by the tie rule
    # (zsad.selection); clients ask for the outputs they want, so nobody receives them unasked
    out_tensors += [tensor_config(n, st.outputs[n], st.dtype(n)) for st in stages for n in st.selections]
    # the text models' outputs: the preprocess models take them (unread) to run after them (see _ensemble)
    models = _write_preprocess_models(repo, opts, method.image_size, [text_output_config(ti) for ti in text_inputs])
    text_models, steps = _write_text_models(repo, opts, text_inputs)
    chain_models, chain_steps = runtimes.get(opts.backend).write_chain(repo, opts, method, stages, stage_files,
                                                                       precision, chain_in, out_tensors)
    models += text_models + chain_models
    steps += chain_steps
    if opts.resize_to_input:
        rname = f"{opts.name}_restore"
        write_model(repo, restore_config(opts, rname, method.image_size), files=python_model_files("restore"),
                    extra=restore_warmup_files(method.image_size))
        models.append(rname)
    ens_cfgs = [_ensemble(opts, raw, text_inputs, steps, out_tensors) for raw in (False, True)]
    for cfg in ens_cfgs:
        write_model(repo, cfg)
    ensembles = [cfg["name"] for cfg in ens_cfgs]
    (repo / opts.name / "README.md").write_text(
        repository_readme(opts.name, ens_cfgs, opts.backend, trained, method.image_size))
    return models + ensembles, ensembles


def _request_tensors(method, stages) -> dict[str, tuple]:
    """The chain's outside inputs, checked to be what a request supplies: 'images' and the method's text inputs."""
    chain_in = chain_inputs(stages)
    expected = {"images"} | {ti.tensor for ti in method.text_inputs()}
    if set(chain_in) != expected:
        raise ZsadError(f"{method.name}: the stage chain takes {sorted(chain_in)}; a request supplies 'images' and "
                        f"the method's text inputs {sorted(expected)} only")
    return chain_in


def _write_preprocess_models(repo: Path, opts: RepoOptions, size: int, after: list[dict]) -> list[str]:
    """NAME_preprocess (encoded bytes; warmed up with a real PNG) and NAME_preprocess_raw (uint8 HWC), taking the
    text models' outputs ``after`` as unread inputs (see :func:`_ensemble`)."""
    from zsad.data import CLIP_MEAN, CLIP_STD
    from zsad.data.synthetic import sample_pngs

    models = []
    warm_png = sample_pngs(1, image_size=size)[0]  # a synthetic defect image at the model's size
    for raw in (False, True):
        pname = f"{opts.name}_preprocess" + ("_raw" if raw else "")
        write_model(repo, preprocess_config(opts, pname, raw, size, CLIP_MEAN, CLIP_STD, after),
                    files=python_model_files("preprocess"),
                    extra={} if raw else {"warmup/warmup.bin": string_tensor_file([warm_png])})
        models.append(pname)
    return models


def _write_text_models(repo: Path, opts: RepoOptions, text_inputs) -> tuple[list[str], list[tuple]]:
    """One NAME_text_<field> per text input: a request's text field -> its token tensor (the method's encoder)."""
    models, steps = [], []
    for ti in text_inputs:
        tname = f"{opts.name}_text_{ti.request_name}"
        write_model(repo, text_input_config(opts, tname, ti), files=python_model_files("text_input"),
                    extra=text_warmup_files(ti))
        models.append(tname)
        steps.append(ensemble_step(tname, [ti.request_name], [ti.tensor]))
    return models, steps


def _ensemble(opts: RepoOptions, raw: bool, text_inputs, steps: list[tuple], out_tensors: list[dict]) -> dict:
    """The ensemble NAME (encoded image bytes) or NAME_raw (uint8 HWC arrays): preprocess -> ``steps`` ->
    (with resize_to_input) restore.

    Every step that can refuse a client's input (the text models: a bad class name; preprocess: a bad image) runs
    alone: the text models first, then preprocess, which takes their outputs (unread) for that ordering; the stage
    models need preprocess's images. Triton 2.51 (the bundled server) crashes when an ensemble step fails while
    another thread is still scheduling a step of the same request: it answers the request, that step's InferAsync
    then fails on memory already released, and it answers the request again (SIGSEGV in RespondIfError via
    EnsembleContext::FinishEnsemble; "incomplete string data for inference input" when it survives). With the text
    and preprocess steps side by side, a bad image or class name failing fast did exactly that under load. (Every
    method has at most one text input today; a second one would be a second entry step beside the first.)"""
    suffix = "_raw" if raw else ""
    in_name = "image" if raw else "image_bytes"
    inputs = [{"name": "image", "data_type": Sym("TYPE_UINT8"), "dims": [-1, -1, 3]} if raw else
              {"name": "image_bytes", "data_type": Sym("TYPE_STRING"), "dims": [1]}]
    inputs += [{"name": ti.request_name, "data_type": Sym("TYPE_STRING"), "dims": [1]} for ti in text_inputs]
    pre_in = {in_name: in_name, **{ti.tensor: ti.tensor for ti in text_inputs}}  # after the text models
    pre_out = {"images": "images"}
    outputs = list(out_tensors)
    restore = []
    if opts.resize_to_input:
        pre_out["original_size"] = "original_size"
        restore = [(f"{opts.name}_restore", {"anomaly_map": "anomaly_map", "original_size": "original_size"},
                    {"anomaly_map_original": "anomaly_map_original"})]
        outputs += [{"name": "anomaly_map_original", "data_type": Sym("TYPE_FP32"), "dims": [-1]},
                    {"name": "original_size", "data_type": Sym("TYPE_INT32"), "dims": [2]}]
    ens_steps = [(f"{opts.name}_preprocess{suffix}", pre_in, pre_out), *steps, *restore]
    return ensemble_config(opts, opts.name + suffix, inputs, outputs, ens_steps)


def _fit_support(method, support, shots: int, support_class: str | None, seed: int, log) -> None:
    from zsad.evaluate import _load_support, support_images

    if not getattr(method, "few_shot", False):
        import zsad.methods as M

        few_shot = ", ".join(n for n in M.available() if M.METHODS[n].few_shot)
        raise ZsadError(f"{method.name} has no few-shot mode (--support/--shots are for {few_shot})")
    if support is None or shots < 1:
        raise ZsadError("few-shot export needs both --support DIR and --shots K (K >= 1)")
    by_class = support_images(support, [support_class or "(folder)"], shots, seed)
    paths = next(iter(by_class.values()))
    method.fit_memory(_load_support(paths, method.image_size, "cpu"))
    log(f"few-shot: memory bank from {len(paths)} normal images of {support_class or support} (baked into the graph)")


def chain_inputs(stages) -> dict[str, tuple]:
    """The tensors a stage chain takes from outside (no earlier stage produces them): name -> (shape, torch dtype)."""
    produced, out = set(), {}
    for st in stages:
        for n, shape in st.inputs.items():
            if n not in produced and n not in out:
                out[n] = (shape, st.dtype(n))
        produced.update(st.outputs)
    return out
