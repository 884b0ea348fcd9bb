"""OpenVINO IR per stage in fp32, bf16 or three int8 mixes, behind a precision gate (CPU inspection stations).

The exporter first produces every stage's ONNX and passes it through the fp32 parity gate; this module converts
that ONNX to OpenVINO IR (``ov.convert_model`` + ``ov.save_model``, weights kept fp32: ``compress_to_fp16`` off).

Precisions:
- ``fp32``: OpenVINO's ``INFERENCE_PRECISION_HINT`` forced to f32 at compile time. It must be forced: on CPUs with
  AVX-512 BF16 / AMX the CPU plugin's default is bf16. Gated like ONNX fp32 (``parity.check_stages``, 1e-4).
- ``bf16``: the same fp32 IR compiled with ``INFERENCE_PRECISION_HINT`` bf16 (the plugin keeps its own fp32
  islands). The hint is recorded in the IR's rt_info (``zsad/inference_precision``) and in the served config.
- ``int8``: NNCF post-training quantisation (``nncf.quantize`` on the OpenVINO model, ``model_type=TRANSFORMER``)
  of the encoder stage only, calibrated on the encoder inputs of images from a folder (default: the synthetic
  set's training classes, disjoint from the gate's classes). Quantised: every linear layer and the patch
  convolution, and attention (OpenVINO fuses it into one ``ScaledDotProductAttention`` op; NNCF quantises its
  query and key inputs, not the value, so Q.K^T runs int8 in the CPU plugin's int8 attention kernel and P.V in the
  inference precision: fp32 here, bf16 in int8-qk-bf16; checked on the paper-profile IR). Kept in fp32, via
  ``nncf.IgnoredScope``: every ``MVN`` (LayerNorm), every stand-alone ``Softmax``, and the final projection (the
  MatMul(s) whose constant operand is CLIP's ``visual.proj``, found by value). The head and postprocess stages
  stay fp32 (little compute; BAG-CLIP's kNN selection and the text similarity decide the map). Everything not
  quantised runs f32. Weights: 8 bits where this CPU has VNNI / AMX, 7 bits where it has not or with
  ``--portable-int8`` (8-bit weights overflow the int16 pair sums of x86 CPUs without VNNI:
  zsad.triton_models.zsad_common.int8); recorded in rt_info ``zsad/int8_weight_bits``.
- ``int8-bf16``: the same int8 linear layers, but attention is left out of the quantisation and everything not
  quantised (attention, LayerNorm, softmax, the residual stream, the head) runs in bf16 (``INFERENCE_PRECISION_HINT``
  bf16). Why: OpenVINO's fused int8 attention with the rest in fp32 is slower than its bf16 one on CPUs with fast
  bf16 (measured on an AVX-512 VNNI/BF16 EPYC: 57 vs 47 ms per ViT-L attention at 1370 tokens, one thread), while
  int8 linear layers run ~4x fp32. Needs a CPU with bf16 (AVX-512 BF16 or AMX). The fastest on AMX.
- ``int8-qk-bf16``: int8's IR (linear layers and the fused attention's inputs quantised: NNCF quantises its query
  and key, so Q.K^T runs int8) compiled with the bf16 hint, so the attention's P.V and everything not quantised runs
  in bf16. The fastest on the AVX-512 BF16/VNNI EPYC without AMX: its paper-profile BAG-CLIP encoder 2.02 s against
  2.16-2.21 s int8-bf16 and 2.40-2.53 s int8 (attention 850 ms against 1013-1076 ms bf16 and 1204-1274 ms int8
  with fp32 around it; bench/results/2026-12-07-cpu-epyc-int8-qk/). Needs bf16 as int8-bf16 does.

The precision gate (every precision but fp32) compares the exported chain with torch fp32 eager of the same
checkpoint on synthetic-defect images: anomaly-map correlation >= 0.99, image-score Spearman >= 0.99, pixel AUROC
within 0.5 points. A failing precision raises :class:`PrecisionGateError` and nothing is written.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsad import ZsadError
from zsad.export.parity import GATED, GateThresholds, gate_failures, gate_metrics  # noqa: F401 (re-exported)
from zsad.triton_models.zsad_common.int8 import isa_cap_setting

PRECISIONS = ("fp32", *GATED)
# what runs unquantised: int8 keeps it in fp32, int8-bf16 runs it (attention included) in bf16, int8-qk-bf16 runs
# it (attention's P.V included) in bf16
OV_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "int8-bf16": "bf16", "int8-qk-bf16": "bf16"}
QUANTIZED = ("int8", "int8-bf16", "int8-qk-bf16")  # the precisions whose encoder NNCF quantises
INT8_ATTENTION = ("int8", "int8-qk-bf16")  # ... with the fused attention's inputs (its Q.K^T) quantised too
CALIBRATION_IMAGES = 32
GATE_IMAGES = 16
CAVEAT = ("Random or tiny weights lack real CLIP's activation outliers (a few channels with values 100x the rest), "
          "which are what breaks int8 on real CLIP: passing this gate on random/tiny weights says nothing about "
          "int8 on trained weights. The gate runs at export on the checkpoint and calibration images given: "
          "re-export (and so re-gate) int8 with your own weights and images.")


class PrecisionGateError(ZsadError):
    section: dict  # the gate's report section (metrics, thresholds, failures), set where it is raised


class OpenVINOPluginError(ZsadError, RuntimeError):
    """OpenVINO's CPU plugin refused to compile or run a model on this CPU (still a RuntimeError, for the callers
    that probe the plugin with one)."""


def plugin_failure(err: RuntimeError, doing: str, precision: str) -> OpenVINOPluginError:
    """``err`` from OpenVINO's CPU plugin as one line: its own reason (the last line of its message, under the
    "Exception from <source file>" lines), and the oneDNN ISA cap where one is set (OpenVINO 2026.4 cannot compile
    its LayerNorm under ONEDNN_MAX_CPU_ISA=SSE41: "bad combination")."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = lines[-1] if lines else type(err).__name__
    setting = isa_cap_setting(os.environ)
    cap = "" if setting is None else f" with oneDNN capped by {setting[0]}={setting[1]} (unset or raise it)"
    return OpenVINOPluginError(f"OpenVINO's CPU plugin could not {doing} at {precision} on this CPU{cap}: {reason}")


def require_openvino():
    try:
        import openvino as ov
    except ImportError as err:
        raise ZsadError("the OpenVINO backends need openvino (and nncf for int8): pip install 'zsad[openvino]'") \
            from err
    return ov


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ZsadError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision in QUANTIZED:
        try:
            import nncf  # noqa: F401
        except ImportError as err:
            raise ZsadError(f"--precision {precision} needs NNCF: pip install 'zsad[openvino]'") from err
    if OV_HINT[precision] == "bf16":
        caps = require_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in caps:
            raise ZsadError(f"--precision {precision}: this CPU has no bf16 support in OpenVINO (no AVX-512 BF16 / "
                            f"AMX), so bf16 would be emulated and slow; export fp32 or int8")


# -- data ---------------------------------------------------------------------------------------------------------
def gate_set(image_size: int, n: int = GATE_IMAGES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n preprocessed synthetic images of the held-out test classes [n,3,S,S] and their masks [n,S,S] (0/1)."""
    from zsad.data import preprocess
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample
    from zsad.data.transforms import preprocess_mask

    images, masks = [], []
    for i in range(n):
        s = render_sample(SYNTHETIC_TEST_CLASSES[i % len(SYNTHETIC_TEST_CLASSES)],
                          "test_good" if i % 3 == 2 else "test_defect", i, seed=seed)
        images.append(preprocess(s.image, image_size))
        masks.append(preprocess_mask(s.mask, image_size) if s.mask is not None
                     else np.zeros((image_size, image_size), np.float32))
    return np.stack(images), np.stack(masks)


def calibration_images(folder: str | Path | None, image_size: int, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Up to n preprocessed images [n,3,S,S]: from ``folder`` (recursively, sorted) or the synthetic training
    classes (disjoint from the gate's classes, so the gate does not grade the calibration images)."""
    from zsad.data import preprocess

    if n < 1:
        raise ZsadError(f"--calibration-images must be >= 1, got {n}")
    if folder is None:
        from zsad.data.synthetic import SYNTHETIC_TRAIN_CLASSES, render_sample

        return np.stack([preprocess(render_sample(SYNTHETIC_TRAIN_CLASSES[i % 4], "train_good" if i % 2 else
                                                  "test_defect", i, seed=1).image, image_size) for i in range(n)])
    from zsad.data.io import is_image_file, read_image

    root = Path(folder)
    if not root.is_dir():
        raise ZsadError(f"--calibration {folder} is not a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))[:n]
    if not paths:
        raise ZsadError(f"--calibration {folder} holds no images (png, jpg, bmp, tif, ...)")
    return np.stack([preprocess(read_image(p), image_size) for p in paths])


# -- conversion, quantisation, runners -------------------------------------------------------------------------------
def convert(onnx_path: Path):
    return require_openvino().convert_model(str(onnx_path))


def projection_ops(ov_model, proj: np.ndarray) -> list[str]:
    """Names of the MatMuls whose constant operand is ``proj`` (or its transpose): CLIP's final projection."""
    names = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        for inp in op.inputs():
            src = inp.get_source_output().get_node()
            if src.get_type_name() == "Constant":
                data = src.get_data()
                if any(data.shape == p.shape and np.array_equal(data, p) for p in (proj, proj.T)):
                    names.append(op.get_friendly_name())
                    break
    return names


def quantize_int8(ov_model, feeds: list[dict[str, np.ndarray]], keep_fp32: list[str], attention: bool = True,
                  weight_bits: int = 8):
    """NNCF post-training int8 of ``ov_model`` on calibration ``feeds`` (one dict per image), see module doc;
    ``attention=False`` leaves the fused attention ops unquantised (int8-bf16). ``weight_bits`` 7: every weight in
    7 bits (NNCF's overflow fix), for CPUs without VNNI (zsad.triton_models.zsad_common.int8); 8: NNCF's default
    (7 bits in the first layer only, the patch convolution)."""
    import logging

    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    logging.getLogger("nncf").setLevel(logging.WARNING)
    types = ["MVN", "Softmax"] + ([] if attention else ["ScaledDotProductAttention"])
    scope = nncf.IgnoredScope(names=keep_fp32, types=types, validate=False)
    overflow_fix = {7: OverflowFix.ENABLE, 8: OverflowFix.FIRST_LAYER}[weight_bits]
    return nncf.quantize(ov_model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(feeds), ignored_scope=scope,
                         advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow_fix))


def compile_model(ov_model, precision: str, threads: int = 0, perf_count: bool = False):
    props: dict[str, object] = {"INFERENCE_PRECISION_HINT": OV_HINT[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        props["INFERENCE_NUM_THREADS"] = threads
    if perf_count:
        props["PERF_COUNT"] = True
    core = require_openvino().Core()
    try:
        return core.compile_model(ov_model, "CPU", props)
    except RuntimeError as err:
        raise plugin_failure(err, f"compile the model '{ov_model.get_friendly_name()}'", precision) from err


def bf16_matmul_ratio(size: int = 1024, repeats: int = 5) -> float | None:
    """How long one linear layer ([size x size] input times a constant [size x size] weight) takes compiled as the
    runners compile it (compile_model) at bf16, over its time at fp32 (the best of ``repeats`` runs each, after a
    warm-up; ~20 ms in all): zsad.cpu.precision_preference's measure of whether bf16 pays on this CPU. Measured:
    0.26 on an AMX Xeon, 1.5 on the same capped at ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16. inf where the plugin cannot
    compile bf16 here (oneDNN capped at AVX2); None without OpenVINO."""
    import math
    import time

    try:
        ov = require_openvino()
    except ZsadError:
        return None
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x_value = rng.standard_normal((size, size), dtype=np.float32)
    weight = rng.standard_normal((size, size), dtype=np.float32) / size ** 0.5
    best = {}
    for precision in ("fp32", "bf16"):
        x = ops.parameter([size, size], np.float32, name="x")
        try:
            request = compile_model(ov.Model([ops.matmul(x, ops.constant(weight), False, True)], [x]),
                                    precision).create_infer_request()
        except RuntimeError:
            return None if precision == "fp32" else math.inf  # not even fp32: nothing to compare against
        request.infer({0: x_value})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            request.infer({0: x_value})
            times.append(time.perf_counter() - start)
        best[precision] = min(times)
    return best["bf16"] / best["fp32"]


def op_profile(ov_model, precision: str, feed: dict[str, np.ndarray], top: int = 8, runs: int = 3) -> dict[str, float]:
    """Where one inference of ``ov_model`` (compiled as the runners compile it) spends its time: milliseconds per
    kind of executed node, from OpenVINO's per-node counters (``PERF_COUNT``), the median over ``runs`` profiled
    runs after one warm-up run (:func:`median_profile`). A kind is "<node type> <kernel>", attention named as such:
    the CPU plugin runs it as a fused "Subgraph" whose original layers include the attention op. The kernel name
    does not say AMX for these Subgraphs ("jit_avx512_bf16"), yet they use the AMX tiles: capped below AMX
    (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) the same attention runs ~3x slower (measured, OpenVINO 2026.4)."""
    compiled = compile_model(with_shapes_of(ov_model, feed), precision, perf_count=True)
    attention_nodes = runtime_attention_nodes(compiled.get_runtime_model())
    request = compiled.create_infer_request()
    inputs = {n: np.ascontiguousarray(feed[n]) for n in (i.get_any_name() for i in compiled.inputs)}
    request.infer(inputs)  # one-off work (weight repacking) happens here: not profiled
    profiles = []
    for _ in range(runs):
        request.infer(inputs)
        ms: dict[str, float] = {}
        for node in request.profiling_info:  # the counters of the last run
            if node.status.name != "EXECUTED":
                continue
            kind = "attention" if node.node_name in attention_nodes else node.node_type
            key = f"{kind} {node.exec_type}"
            ms[key] = ms.get(key, 0.0) + node.real_time.total_seconds() * 1e3
        profiles.append(ms)
    return median_profile(profiles, top)


def runtime_attention_nodes(runtime_model) -> set[str]:
    """The nodes of a compiled model's runtime graph that run attention: where the CPU plugin fuses it (Snippets, on
    AVX-512 CPUs, and fp32 attention on AVX2 ones), the one "Subgraph" whose original layers include the attention
    op; where it decomposes it (int8 attention, its Q.K^T quantised, on AVX2 CPUs: measured on a Zen 3 EPYC,
    OpenVINO 2026.4), the P.V MatMul that keeps the op's name, and the Softmax and
    the Q.K^T MatMul found upstream of its first input (through the scale / conversion nodes between them)."""
    def layer(op, key):
        return op.get_rt_info()[key].astype(str)

    names = set()
    for op in runtime_model.get_ordered_ops():
        if "scaled_dot_product_attention" not in layer(op, "originalLayersNames").lower():
            continue
        names.add(op.get_friendly_name())
        if layer(op, "layerType") != "MatMul":
            continue  # fused: the one node
        node = op
        for _ in range(6):  # P.V <- [reorder] <- Softmax <- [scale, mask] <- Q.K^T
            if node.get_input_size() == 0:
                break
            node = node.input_value(0).get_node()
            kind = layer(node, "layerType")
            if kind in ("Softmax", "MatMul"):
                names.add(node.get_friendly_name())
            if kind not in ("Softmax", "Subgraph", "Reorder", "Eltwise", "Convert"):
                break  # the Q.K^T MatMul, or anything that is not between it and P.V
    return names


def median_profile(profiles: list[dict[str, float]], top: int = 8) -> dict[str, float]:
    """Per kind of node, the median of its milliseconds over ``profiles`` (0 in a run where it did not execute), the
    ``top`` largest and the rest summed as "other". A median, not one run: a single profiled run of the paper-profile
    BAG-CLIP encoder on the AMX Xeon once charged 282 ms to Transpose (26%; 47-55 ms in every other run), the run
    1066 ms against the stage's 770 ms p50, the machine holding it up."""
    kinds = {k for p in profiles for k in p}
    ms = {k: float(np.median([p.get(k, 0.0) for p in profiles])) for k in kinds}
    ranked = sorted(ms.items(), key=lambda kv: (-kv[1], kv[0]))
    out = dict(ranked[:top])
    if len(ranked) > top:
        out["other"] = sum(v for _, v in ranked[top:])
    return out


def with_shapes_of(ov_model, feed: dict[str, np.ndarray]):
    """A copy of ``ov_model`` with every input fixed to its shape in ``feed`` (static shapes: the paper-profile
    BAG-CLIP int8-bf16 encoder ran 1163 ms against 1196 ms with its dynamic batch, medians of 4 alternated runs on a
    quiet 2-core AMX Xeon), or ``ov_model`` itself if OpenVINO cannot reshape it."""
    model = ov_model.clone()
    try:
        model.reshape({i.get_any_name(): list(np.shape(feed[i.get_any_name()])) for i in model.inputs})
    except Exception:  # noqa: BLE001 (a model OpenVINO cannot make static runs as it is)
        return ov_model
    return model


def ov_runner(ov_model, precision: str):
    """A parity runner (dict of numpy in -> dict of numpy out) over the model compiled for the input shapes of the
    feed it is given (``with_shapes_of``); a feed of other shapes compiles again (only the last is kept: a
    compiled ViT-L holds its own repacked weights)."""
    inputs = [i.get_any_name() for i in ov_model.inputs]
    compiled: dict[tuple, Any] = {}

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {n: np.ascontiguousarray(feed[n]) for n in inputs}
        shapes = tuple(a.shape for a in arrays.values())
        if shapes not in compiled:
            compiled.clear()
            compiled[shapes] = compile_model(with_shapes_of(ov_model, arrays), precision)
        model = compiled[shapes]
        try:
            out = model(arrays)
        except RuntimeError as err:
            raise plugin_failure(err, f"run the model '{ov_model.get_friendly_name()}'", precision) from err
        return {o.get_any_name(): np.asarray(out[o]) for o in model.outputs}

    return run


def save(ov_model, folder: Path, precision: str, quantized: bool, weight_bits: int = 8) -> list[Path]:
    """model.xml + model.bin (fp32 weights; int8 ones where quantised), the precision recorded in rt_info (and, where
    quantised, the int8 weights' width, which the served stage checks against its CPU: ``int8_weight_bits``)."""
    ov = require_openvino()
    ov_model.set_rt_info(precision, ["zsad", "precision"])
    ov_model.set_rt_info(OV_HINT[precision], ["zsad", "inference_precision"])
    ov_model.set_rt_info(str(quantized), ["zsad", "int8_quantized"])
    if quantized:
        ov_model.set_rt_info(str(weight_bits), ["zsad", "int8_weight_bits"])
    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / "model.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return [xml, folder / "model.bin"]


def int8_weights_choice(portable: bool) -> dict:
    """The int8 weights' width for a model quantised on this machine, and why (recorded in the export's report):
    7 bits with ``portable`` or where this CPU lacks VNNI (its int8 dot products overflow with 8-bit weights), else
    8 bits, which CPUs without VNNI then refuse to serve (zsad.triton_models.zsad_common.int8)."""
    from zsad.cpu import int8_weight_bits_here

    if portable:
        return {"bits": 7, "reason": "--portable-int8: 7-bit weights, exact on every x86 CPU (with or without VNNI)"}
    if int8_weight_bits_here() == 7:
        return {"bits": 7, "reason": "this CPU has no VNNI: its int8 dot products (VPMADDUBSW) overflow int16 with "
                                     "8-bit weights, so 7-bit ones (runs on any x86 CPU)"}
    return {"bits": 8, "reason": "this CPU has VNNI / AMX (int32 accumulation): 8-bit weights (NNCF's default, the "
                                 "first layer in 7); x86 CPUs without VNNI refuse to serve this model: export "
                                 "with --portable-int8 for them"}


# -- the precision gate (its metrics and thresholds live with the other comparisons, zsad.export.parity) -------------
def run_chain(stages, runners: dict, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The chain through ``runners`` (stage name -> feed dict -> output dict), every tensor returned."""
    from zsad.methods.stages import walk_stages

    return walk_stages(stages, feed, lambda st, inputs: runners[st.name](inputs))


def precision_gate(method, stages, runners: dict, precision: str, n_images: int = GATE_IMAGES,
                   thresholds: GateThresholds | None = None, quantized: Sequence[str] = ()) -> dict:
    """Run the gate; returns its report section, or raises PrecisionGateError naming what failed and where the
    precision was lowered (``quantized``: the int8 stages, from ``build_openvino_stages``' info)."""
    from zsad.methods import run_stages

    th = thresholds or GateThresholds()
    images, masks = gate_set(method.image_size, n_images)
    feed = _chain_feed(method, images)
    with torch.inference_mode():
        ref = run_stages(stages, **{k: torch.from_numpy(v) for k, v in feed.items()})
    got = run_chain(stages, runners, feed)
    metrics = gate_metrics(ref["score"].numpy(), ref["anomaly_map"].numpy(), got["score"], got["anomaly_map"], masks,
                           th.score_tie)
    fails = gate_failures(metrics, th)
    # selections (BAG-CLIP's kNN neighbours) that the lowered precision chose otherwise: reported, not gated apart;
    # the metrics above measure the whole chain against fp32, selection changes included (what a user gets)
    differing = {n: int((np.sort(ref[n].numpy(), -1) != np.sort(got[n], -1)).any(-1).sum())
                 for st in stages for n in st.selections}
    section = {"precision": precision, "reference": "torch fp32 eager, same checkpoint", "images": n_images,
               "data": "synthetic set, held-out test classes (defect and good images)",
               "thresholds": asdict(th), **metrics, **({"selection_differing": differing} if differing else {}),
               "passed": not fails, "failures": fails, "caveat": CAVEAT}
    if fails:
        where = (f"int8 stage{'s' if len(quantized) > 1 else ''} {', '.join(repr(q) for q in quantized)}"
                 if quantized else f"every stage in {precision}")
        err = PrecisionGateError(f"{precision} precision gate failed on {n_images} synthetic images ({where}): "
                                 + "; ".join(fails) + "; nothing was written")
        err.section = section
        raise err
    return section


def _chain_feed(method, images: np.ndarray) -> dict[str, np.ndarray]:
    """The chain's inputs for numpy images (plus class-name tokens for methods that take text per image), numpy."""
    from zsad.data.feeds import synthetic_feed

    return {k: v.numpy() for k, v in synthetic_feed(method, torch.from_numpy(images)).items()}


def stage_calibration_feeds(method, stages, stage, images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One feed per calibration image for ``stage``: its inputs, running only the stages before it that produce
    them (the encoder, every method's first stage, takes the images themselves: nothing runs)."""
    from zsad.methods.stages import walk_stages

    feed = {k: torch.from_numpy(v) for k, v in _chain_feed(method, images).items()}
    with torch.inference_mode():
        env = walk_stages(stages, feed, stop=lambda st, env: st is stage or all(n in env for n in stage.inputs))
    return [{n: env[n][i:i + 1].numpy() for n in stage.inputs} for i in range(len(images))]


def build_openvino_stages(method, stages, onnx_files: dict, precision: str, scratch: Path, calibration=None,
                          n_calibration: int = CALIBRATION_IMAGES, log=print, portable_int8: bool = False):
    """Convert each stage's ONNX to OpenVINO (int8: quantise the encoder). Returns (runners, {stage: files},
    info): the runners compile the models exactly as they are saved, with the precision's hint. ``calibration``:
    a folder of images, None (the synthetic training classes) or preprocessed images [N,3,S,S] already made.
    int8 weights: 8 bits where this CPU has VNNI / AMX, else (or with ``portable_int8``) 7 bits, so that what the
    gate measures here is what runs here, and a portable model runs on any x86 CPU (see int8_weights_choice)."""
    from zsad.methods.stages import EncoderStage

    check_precision(precision)
    runners, files, info = {}, {}, {"precision": precision, "inference_precision_hint": OV_HINT[precision],
                                     "openvino": require_openvino().__version__, "quantized_stages": []}
    if precision in QUANTIZED:
        info["int8_weights"] = int8_weights_choice(portable_int8)
    bits = info.get("int8_weights", {}).get("bits", 8)
    for st in stages:
        model = convert(onnx_files[st.name][0])
        model.set_friendly_name(st.name)  # model.xml's name: the stage, which the plugin's errors then name
        quantize = precision in QUANTIZED and isinstance(st.module, EncoderStage)
        if quantize:
            if isinstance(calibration, np.ndarray):
                cal, source = calibration, "preprocessed images given by the caller"
            else:
                cal = calibration_images(calibration, method.image_size, n_calibration)
                source = str(calibration) if calibration else "synthetic set (training classes)"
            info["calibration"] = {"source": source, "images": len(cal)}
            keep = projection_ops(model, method.backbone.visual.proj.detach().cpu().numpy())
            attention = precision in INT8_ATTENTION
            rest = "fp32" if OV_HINT[precision] == "f32" else "bf16"
            runs = f"Q.K^T int8, P.V {rest}" if attention else rest
            log(f"  quantising stage '{st.name}' to int8 (NNCF, {len(cal)} calibration images, {bits}-bit weights; "
                f"attention {runs}; {rest}: LayerNorm (MVN), Softmax, final projection {keep})")
            model = quantize_int8(model, stage_calibration_feeds(method, stages, st, cal), keep, attention, bits)
            info["quantized_stages"].append({"stage": st.name, "attention": runs,
                                             "not_quantised": {"types": ["MVN (LayerNorm)", "Softmax"], "runs_in": rest,
                                                               "final_projection": keep},
                                             "nncf": {"version": __import__("nncf").__version__,
                                                      "model_type": "TRANSFORMER"}})
        files[st.name] = save(model, scratch / "openvino" / st.name, precision, quantize, bits)
        runners[st.name] = ov_runner(require_openvino().Core().read_model(str(files[st.name][0])), precision)
    return runners, files, info
