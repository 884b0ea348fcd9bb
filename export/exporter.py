"""Export a method into a Triton model repository, stage by stage, behind the parity gate.

Generic over ``Method.stages()``. Flow: build the method (checkpoint, or untrained with a loud warning) ->
export every stage to ONNX in a scratch directory -> parity gate (stage by stage, random + real inputs, batch 1
and > 1, then the chain end to end) -> only then write the repository (configs validated against Triton's
schema) and the parity report. A failing stage writes nothing and raises ``ParityError`` naming the stage, the
tensor and the error.

Never losing a user's files: everything is built in a temporary folder beside ``--out`` (same file system; see
``_scratch_folder`` for why not inside), and each model folder carries a marker file, :data:`MARKER_NAME`. An existing folder of the same name is replaced
only if it carries that marker (an earlier export), unless ``force``; otherwise the export is refused before any
work, with nothing deleted. ``--name`` must be a plain identifier, so no model folder can land outside ``--out``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path

from zsad import ZsadError, __version__
from zsad.export import parity
from zsad.export.onnx_export import export_metadata, export_stage, onnx_files, stamp_stage_files
from zsad.export.triton_repo import (RepoOptions, Sym, ensemble_config, openvino_stage_config, preprocess_config,
                                     python_model_files, repository_readme, restore_config, restore_warmup_files, stage_config,
                                     string_tensor_file, tensor_config, text_input_config, text_warmup_files,
                                     torch_config, write_model)

OPENVINO_BACKENDS = ("openvino", "python-openvino")


MARKER_NAME = ".zsad-export.json"
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
    models += [f"{name}_torch"] if backend == "python-torch" else [f"{name}_{st.name}" for st in stages]
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


@dataclass
class ExportResult:
    repo: Path
    models: list[str]
    ensembles: list[str]
    parity_rows: list
    report: Path


def build_method(model: str | None, checkpoint: str | None, profile: str, image_size: int | None,
                 clip_weights: str | None, overrides: dict | None = None):
    """The method to export: from a checkpoint, or untrained from a profile (loud warning)."""
    import zsad.methods as M
    from zsad.checkpoint import load_checkpoint, read_sidecar

    if checkpoint:
        meta = read_sidecar(checkpoint)
        if model and model != meta["method"]:
            raise ZsadError(f"--model {model} but {checkpoint} is a '{meta['method']}' checkpoint")
        overrides = {"backbone": {"image_size": image_size}} if image_size else None
        return load_checkpoint(checkpoint, clip_weights=clip_weights, overrides=overrides)[0], True
    if not model:
        raise ZsadError("give --model (and --profile) or --checkpoint")
    warnings.warn(f"exporting UNTRAINED {model} (no --checkpoint): prompts and heads are random. Fine for "
                  f"architecture benchmarks and tests, useless for detection.", stacklevel=2)
    from zsad.configs import deep_merge

    overrides = dict(overrides or {})
    if image_size:
        overrides = deep_merge(overrides, {"backbone": {"image_size": image_size}})
    if clip_weights:
        overrides = deep_merge(overrides, {"backbone": {"weights": str(clip_weights), "pretrained": None}})
    return M.create(model, profile, **overrides), False


def _check_backend_available(backend: str, fp16: bool, device: str, precision: str = "fp32") -> None:
    """Refuse early, with the reason, what this machine cannot build or verify."""
    if backend in OPENVINO_BACKENDS:
        from zsad.export.openvino_export import check_precision, require_openvino

        require_openvino()
        check_precision(precision)
        if fp16:
            raise ZsadError(f"--fp16 is not an OpenVINO precision; give --backend {backend} --precision bf16 or int8")
        if device == "gpu":
            raise ZsadError(f"--backend {backend} exports for CPU servers (OpenVINO's CPU plugin): give --device cpu")
    elif precision != "fp32":
        raise ZsadError(f"--precision {precision} is for --backend openvino / python-openvino (use --fp16 for "
                        f"half precision with {backend})")
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError as err:
            raise ZsadError("--backend tensorrt needs TensorRT (pip install 'zsad[gpu]' on a machine with NVIDIA's "
                            "TensorRT); it is not installed here. The onnxruntime backend runs the same ONNX stages.") from err
    if fp16:
        if backend in ("onnxruntime", "python-ort"):
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ZsadError("--fp16 with ONNX Runtime needs its CUDA provider (onnxruntime-gpu) here to run the "
                                "parity gate; CPU ONNX Runtime has no fp16 kernels for these graphs (it crashes or "
                                "falls back slowly). Export fp32 for CPU serving, or use --backend tensorrt / "
                                "python-torch on a GPU machine.")
        if backend == "python-torch" and device != "gpu":
            raise ZsadError("--fp16 with python-torch needs CUDA: there is no fast fp16 on the CPU. Export fp32 "
                            "for CPU serving (--device cpu), or export on the GPU server with --device gpu.")
        if backend == "python-torch":
            import torch

            if not torch.cuda.is_available():
                raise ZsadError("--fp16 with python-torch needs CUDA on this machine to run the parity gate")


def export_model(*, model: str | None = None, checkpoint: str | None = None, profile: str = "paper",
                 image_size: int | None = None, clip_weights: str | None = None, backend: str = "onnxruntime",
                 fp16: bool = False, max_batch: int = 32, out: str | Path = "model_repository",
                 name: str | None = None, device: str | None = None, resize_to_input: bool = False,
                 parity_images: int = 4, preferred_batch: list[int] | None = None, queue_delay_us: int = 200,
                 instances: int = 1, max_pixels: int = 50_000_000, overrides: dict | None = None,
                 dynamic_batching: bool = True, support: str | Path | None = None, shots: int = 0,
                 support_class: str | None = None, support_seed: int = 0, force: bool = False,
                 precision: str = "fp32", calibration: str | Path | None = None, calibration_images: int = 32,
                 gate_images: int = 16, gate_thresholds=None, log=print) -> ExportResult:
    """See the module docstring; ``overrides`` deep-merge into an untrained method's profile (tests, benchmarks).

    Few-shot (``support`` + ``shots``, methods with a few-shot mode): the memory bank of K normal images of ONE
    class (a folder of images, or ``support_class`` of a data-set root's train/good) is built before the stages
    are taken, so it is baked into the exported graph as constants: one exported model per product.

    OpenVINO backends (``precision`` fp32 / bf16 / int8, see zsad.export.openvino_export): the ONNX stages pass
    the fp32 gate first, then the IR does (fp32: the same parity gate; bf16 / int8: the precision gate on
    ``gate_images`` synthetic images, ``gate_thresholds`` a GateThresholds; int8 calibrated on ``calibration``).
    """
    repo = Path(out)
    check_out_and_name(repo, name)
    device = device or ("cpu" if backend in ("python-ort",) + OPENVINO_BACKENDS else "gpu")
    if device not in ("cpu", "gpu"):
        raise ZsadError(f"--device must be cpu or gpu, got '{device}'")
    _check_backend_available(backend, fp16, device, precision)
    method, trained = build_method(model, checkpoint, profile, image_size, clip_weights, overrides)
    if support is not None or shots:
        _fit_support(method, support, shots, support_class, support_seed, log)  # may add a stage (few-shot)
    name = name or method.name
    planned = planned_models(name, method.stages(), method.text_inputs(), backend, resize_to_input)
    refuse_foreign_folders(repo, planned, force)
    opts = RepoOptions(name=name, backend=backend, max_batch=max_batch,
                       instance_kind="KIND_GPU" if device == "gpu" else "KIND_CPU", instances=instances,
                       preferred_batch=preferred_batch or [], queue_delay_us=queue_delay_us,
                       resize_to_input=resize_to_input, fp16=fp16, max_pixels=max_pixels,
                       dynamic_batching=dynamic_batching)
    stages = method.stages()
    size = method.image_size
    n_images = max(1, min(parity_images, max_batch))
    if n_images == 1:
        log("note: parity gate at batch 1 only (--parity-images 1 or --max-batch 1)")
    images = parity.synthetic_images(size, n=n_images)
    # text inputs (Bayes-PFL's class name): the synthetic images' own class names, through the method's encoder
    names = parity.synthetic_class_names(n_images)
    extra_feed = {ti.tensor: ti.encode(names).numpy() for ti in method.text_inputs()}
    tol = parity.FP16_TOL if fp16 else parity.FP32_TOL
    created_repo = not repo.exists()
    repo.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_folder(repo)
    try:
        log(f"exporting {method.name} ({method.profile}, {'trained' if trained else 'UNTRAINED'}) at {size} px, "
            f"backend {backend}{' fp16' if fp16 else ''}, max batch {max_batch}: stages "
            + " -> ".join(s.name for s in stages))
        runners, stage_files = _build_stage_artifacts(method, stages, opts, scratch, log)
        stamp_stage_files(stage_files, export_metadata(method, trained, checkpoint, fp16))  # self-describing files
        rows = parity.check_stages(stages, runners, images, tol, extra_feed=extra_feed,
                                   chain_tol=None if fp16 else method.chain_tolerance)
        log(parity.format_table(rows))
        gate_section = None
        if backend in OPENVINO_BACKENDS:
            stage_files, gate_section, ov_rows = _openvino_stages(
                method, stages, stage_files, precision, scratch, calibration, calibration_images, gate_images,
                gate_thresholds, images, tol, extra_feed, log)
            rows += ov_rows
        staging = scratch / "repo"
        models, ensembles = _write_repository(staging, method, stages, opts, stage_files, trained, precision)
        if sorted(models) != sorted(planned):
            raise ZsadError(f"internal: wrote models {sorted(models)} but planned {sorted(planned)}")
        report = staging / name / "parity_report.json"
        parity.write_report(report, rows, {
            "model": name, "method": method.name, "profile": method.profile, "trained": trained,
            "backend": backend, "fp16": fp16, "image_size": size, "max_batch": max_batch, "tolerance": tol,
            "end_to_end_tolerance": tol if fp16 else max(tol, method.chain_tolerance),
            "runtime": "onnxruntime " + __import__("onnxruntime").__version__ if backend != "python-torch" else "torch",
            **({"precision": precision, "openvino": gate_section} if gate_section else {})})
        marker = json.dumps({"written_by": "zsad-export", "zsad": __version__, "export": name,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2)
        for m in models:
            (staging / m / MARKER_NAME).write_text(marker + "\n")
        refuse_foreign_folders(repo, planned, force)  # again: the user may have added a folder meanwhile
        _install(staging, repo, models, scratch)
        log(f"wrote {len(models)} models to {repo}: ensembles {', '.join(ensembles)}; parity report "
            f"{repo / name / 'parity_report.json'} (worst relative error {max(r.max_rel for r in rows):.2e}, "
            f"tolerance {tol:g})")
        return ExportResult(repo, models, ensembles, rows, repo / name / "parity_report.json")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created_repo and repo.is_dir() and not any(repo.iterdir()):
            repo.rmdir()  # a failed export into a new folder leaves nothing behind


def _build_stage_artifacts(method, stages, opts: RepoOptions, scratch: Path, log):
    """Per stage: the file(s) to ship and a runner for the parity gate (ORT session or the torch chain)."""
    runners, files = {}, {}
    if opts.backend == "python-torch":
        # the served code is the torch stage chain rebuilt from the shipped checkpoint: check exactly that
        from zsad.checkpoint import load_checkpoint, save_checkpoint

        ckpt = save_checkpoint(scratch / "checkpoint", method, exported=True)
        clip = method.config.backbone.weights
        rebuilt = load_checkpoint(ckpt, clip_weights=clip)[0]
        for st, st2 in zip(stages, rebuilt.stages()):
            runners[st.name] = parity.torch_runner(st2.module, list(st2.inputs), list(st2.outputs))
        files["__checkpoint__"] = ckpt
        return runners, files
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if opts.fp16 else ["CPUExecutionProvider"]
    for st in stages:
        path = scratch / "onnx" / st.name / "model.onnx"
        log(f"  exporting stage '{st.name}' to ONNX ...")
        export_stage(st, path, opts.max_batch)
        if opts.fp16:
            from zsad.export.fp16 import convert_to_fp16

            convert_to_fp16(path)
        runners[st.name] = parity.ort_runner(path, providers)
        files[st.name] = onnx_files(path)
    return runners, files


def _write_repository(repo: Path, method, stages, opts: RepoOptions, stage_files: dict, trained: bool,
                      precision: str = "fp32"):
    from zsad.data import CLIP_MEAN, CLIP_STD

    name, size = opts.name, method.image_size
    models: list[str] = []
    chain_in = chain_inputs(stages)
    text_inputs = method.text_inputs()
    expected = {"images"} | {ti.tensor for ti in text_inputs}
    if set(chain_in) != expected:
        raise ZsadError(f"{method.name}: the stage chain takes {sorted(chain_in)}; a request supplies 'images' and "
                        f"the method's text inputs {sorted(expected)} only")
    final = stages[-1]
    out_tensors = [tensor_config(n, s, final.dtype(n)) for n, s in final.outputs.items()]
    # preprocess models (bytes and raw uint8)
    warm_png = _warmup_png(size)
    for raw in (False, True):
        pname = f"{name}_preprocess" + ("_raw" if raw else "")
        write_model(repo, preprocess_config(opts, pname, raw, size, CLIP_MEAN, CLIP_STD),
                    files=python_model_files("preprocess"),
                    extra={} if raw else {"warmup/warmup.bin": string_tensor_file([warm_png])})
        models.append(pname)
    # the stage models (or one torch chain)
    # text models: a request's text field -> the token tensor (the method's own encoder function)
    steps: list[tuple[str, dict, dict]] = []
    for ti in text_inputs:
        tname = f"{name}_text_{ti.request_name}"
        write_model(repo, text_input_config(opts, tname, ti), files=python_model_files("text_input"),
                    extra=text_warmup_files(ti))
        models.append(tname)
        steps.append((tname, {ti.request_name: ti.request_name}, {ti.tensor: ti.tensor}))
    if opts.backend == "python-torch":
        mname = f"{name}_torch"
        inputs = [tensor_config(n, shp, dt) for n, (shp, dt) in chain_in.items()]
        cfg = torch_config(opts, mname, inputs, out_tensors)
        files = {**python_model_files("torch_chain"), "checkpoint": stage_files["__checkpoint__"]}
        clip = method.config.backbone.weights
        if clip:
            files[f"clip_weights{Path(clip).suffix}"] = Path(clip)
            cfg["parameters"].append({"key": "clip_weights", "value": {"string_value": f"clip_weights{Path(clip).suffix}"}})
        write_model(repo, cfg, files=files)
        models.append(mname)
        steps.append((mname, {n: n for n in chain_in}, {n: n for n in final.outputs}))
    else:
        for st in stages:
            mname = f"{name}_{st.name}"
            files = {}
            if opts.backend in OPENVINO_BACKENDS:
                files.update({p.name: p for p in stage_files[st.name]})  # model.xml + model.bin
                if opts.backend == "python-openvino":
                    files.update(python_model_files("stage_openvino"))
                write_model(repo, openvino_stage_config(opts, st, mname, precision), files=files)
                models.append(mname)
                steps.append((mname, {n: n for n in st.inputs}, {n: n for n in st.outputs}))
                continue
            if opts.backend == "tensorrt":
                from zsad.export.trt_engine import build_engine

                files["model.plan"] = build_engine(stage_files[st.name][0], st, opts)
            else:
                files.update({p.name: p for p in stage_files[st.name]})
                if opts.backend == "python-ort":
                    files.update(python_model_files("stage_ort"))
            write_model(repo, stage_config(opts, st, mname), files=files)
            models.append(mname)
            steps.append((mname, {n: n for n in st.inputs}, {n: n for n in st.outputs}))
    ensembles, ens_cfgs = [], []
    for raw in (False, True):
        ename = name + ("_raw" if raw else "")
        pre = f"{name}_preprocess" + ("_raw" if raw else "")
        in_name = "image" if raw else "image_bytes"
        inputs = [{"name": "image", "data_type": Sym("TYPE_UINT8"), "dims": [-1, -1, 3]} if raw else
                  {"name": "image_bytes", "data_type": Sym("TYPE_STRING"), "dims": [1]}]
        inputs += [{"name": ti.request_name, "data_type": Sym("TYPE_STRING"), "dims": [1]} for ti in text_inputs]
        pre_out = {"images": "images"}
        outputs = list(out_tensors)
        ens_steps = [(pre, {in_name: in_name}, pre_out)] + list(steps)
        if opts.resize_to_input:
            pre_out["original_size"] = "original_size"
            rname = f"{name}_restore"
            if rname not in models:
                write_model(repo, restore_config(opts, rname, size), files=python_model_files("restore"),
                            extra=restore_warmup_files(size))
                models.append(rname)
            ens_steps.append((rname, {"anomaly_map": "anomaly_map", "original_size": "original_size"},
                              {"anomaly_map_original": "anomaly_map_original"}))
            outputs += [{"name": "anomaly_map_original", "data_type": Sym("TYPE_FP32"), "dims": [-1]},
                        {"name": "original_size", "data_type": Sym("TYPE_INT32"), "dims": [2]}]
        ens_cfg = ensemble_config(opts, ename, inputs, outputs, ens_steps)
        write_model(repo, ens_cfg)
        models.append(ename)
        ensembles.append(ename)
        ens_cfgs.append(ens_cfg)
    (repo / name / "README.md").write_text(repository_readme(name, ens_cfgs, opts.backend, trained, size))
    return models, ensembles


def _openvino_stages(method, stages, onnx_files, precision, scratch, calibration, n_calibration, gate_images,
                     thresholds, images, tol, extra_feed, log):
    """The gated ONNX stages -> OpenVINO IR; fp32 IR passes the parity gate, bf16 / int8 the precision gate.
    Returns ({stage: IR files}, the report section, the fp32 IR's parity rows)."""
    from zsad.export.openvino_export import build_openvino_stages, precision_gate

    runners, files, info = build_openvino_stages(method, stages, onnx_files, precision, scratch, calibration,
                                                 n_calibration, log)
    rows = []
    if precision == "fp32":
        rows = parity.check_stages(stages, runners, images, tol, extra_feed=extra_feed,
                                   chain_tol=method.chain_tolerance)
        for r in rows:
            r.case = f"openvino {r.case}"
        log(parity.format_table(rows))
        return files, {**info, "gate": "fp32 parity gate (the rows marked 'openvino')"}, rows
    section = precision_gate(method, stages, runners, precision, gate_images, thresholds)
    log(f"{precision} precision gate passed: map correlation {section['map_corr']:.5f}, score Spearman "
        f"{section['score_spearman']:.5f}, pixel AUROC {100 * section['pixel_auroc']:.2f} vs fp32 "
        f"{100 * section['pixel_auroc_fp32']:.2f}\nnote: {section['caveat']}")
    return files, {**info, "gate": section}, rows


def _fit_support(method, support, shots: int, support_class: str | None, seed: int, log) -> None:
    from zsad.evaluate import _load_support, support_images

    if not getattr(method, "few_shot", False):
        import zsad.methods as M

        few_shot = ", ".join(n for n in M.available() if M.METHODS[n].few_shot)
        raise ZsadError(f"{method.name} has no few-shot mode (--support/--shots are for {few_shot})")
    if support is None or shots < 1:
        raise ZsadError("few-shot export needs both --support DIR and --shots K (K >= 1)")
    paths = support_images(support, [support_class or "(folder)"], shots, seed)
    paths = next(iter(paths.values()))
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


def _warmup_png(size: int) -> bytes:
    import io

    from PIL import Image

    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample

    buf = io.BytesIO()
    Image.fromarray(render_sample(SYNTHETIC_TEST_CLASSES[0], "test_defect", 0, image_size=size).image).save(buf, "PNG")
    return buf.getvalue()

