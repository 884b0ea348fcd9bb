"""``openvino``: OpenVINO IR per stage for Triton's openvino backend, on CPU servers.

The ONNX stages pass the fp32 parity gate first; then each is converted to IR (int8 / int8-bf16: NNCF quantises
the encoder), and the IR passes its own gate: fp32 the same parity gate, bf16 / int8 / int8-bf16 the precision
gate against fp32 (export/openvino_export.py). zsad-bench times it as ``openvino-<precision>``.
"""
from __future__ import annotations

from zsad import ZsadError
from zsad.export.openvino_export import OV_HINT, PRECISIONS
from zsad.export.runtimes.base import register
from zsad.export.runtimes.onnx_runtime import OnnxStages
from zsad.export.runtimes.runners import Skip, stage_chain_runner


class OpenVinoStages(OnnxStages):
    """Gated ONNX stages -> gated OpenVINO IR (not registered: ``openvino`` and ``python-openvino`` derive)."""

    default_device = "cpu"
    precisions = PRECISIONS
    takes_ov_hint = True

    def available(self):
        from zsad.export.openvino_export import require_openvino

        try:
            require_openvino()
        except ZsadError as err:
            return str(err)
        return None

    def check_options(self, fp16, device, precision):
        from zsad.export.openvino_export import check_precision

        check_precision(precision)
        if fp16:
            raise ZsadError(f"--fp16 is not an OpenVINO precision; give --backend {self.name} --precision bf16 or int8")
        if device == "gpu":
            raise ZsadError(f"--backend {self.name} exports for CPU servers (OpenVINO's CPU plugin): give --device cpu")

    def instance_kind(self):
        return "KIND_CPU"

    def after_gate(self, method, stages, stage_files, opts, scratch, feed, log):
        """The IR from the gated ONNX stages; fp32 IR passes the parity gate, bf16 / int8 the precision gate."""
        from zsad.export import parity
        from zsad.export.openvino_export import build_openvino_stages

        runners, files, info = build_openvino_stages(method, stages, stage_files, opts.precision, scratch,
                                                     opts.calibration, opts.calibration_images, log,
                                                     opts.portable_int8)
        if info.get("int8_weights", {}).get("bits") == 8 and self.name == "openvino":
            log("note: 8-bit int8 weights (this CPU has VNNI): Triton's openvino backend loads them on any CPU, and "
                "on an x86 CPU without VNNI their int8 dot products overflow, silently; serve this export only on "
                "CPUs with VNNI / AMX, or re-export with --portable-int8")
        if opts.precision == "fp32":
            rows = parity.check_stages(stages, runners, feed, opts.tolerance)
            for r in rows:
                r.case = f"openvino {r.case}"
            log(parity.format_table(rows))
            return files, {**info, "gate": "fp32 parity gate (the rows marked 'openvino')"}, rows
        return files, {**info, "gate": _precision_gate(method, stages, runners, info, opts, log)}, []


def _precision_gate(method, stages, runners, info: dict, opts, log) -> dict:
    from zsad.export.openvino_export import precision_gate

    precision = opts.precision
    section = precision_gate(method, stages, runners, precision, opts.gate_images, opts.gate_thresholds,
                             [q["stage"] for q in info["quantized_stages"]])
    log(f"{precision} precision gate passed: map correlation {section['map_corr']:.5f}, image scores ranked as fp32 "
        f"beyond near-ties ({section['score_tie']:g} of the scale; Spearman {section['score_spearman']:.5f}), pixel "
        f"AUROC {100 * section['pixel_auroc']:.2f} vs fp32 "
        f"{100 * section['pixel_auroc_fp32']:.2f}\nnote: {section['caveat']}")
    return section


@register
class OpenVino(OpenVinoStages):
    name = "openvino"
    summary = "OpenVINO IR per stage for Triton's openvino backend (CPU)"
    bench_variants = tuple(f"openvino-{p}" for p in PRECISIONS)
    cpu_bench_variants = bench_variants

    def runs_on(self):
        return {"backend": "openvino"}

    def parameters(self, opts, stage, precision):
        # bf16 through the backend's HINT_BF16 parameter
        return {"PERFORMANCE_HINT": opts.ov_hint.upper(), "zsad_precision": precision,
                **({"HINT_BF16": "YES"} if OV_HINT[precision] == "bf16" else {})}

    def bench_runner(self, variant, method, device, max_batch, scratch):
        return _bench_runner(method, scratch, max_batch, variant.split("-", 1)[1])


def _bench_runner(method, scratch, max_batch: int, precision: str):
    try:
        from zsad.export.openvino_export import (
            QUANTIZED,
            build_openvino_stages,
            check_precision,
            op_profile,
            require_openvino,
        )

        ov = require_openvino()
        check_precision(precision)
    except Exception as err:  # not installed, or no bf16 on this CPU
        raise Skip(str(err)) from None
    stages = method.stages()
    cal = scratch.calibration(method) if precision in QUANTIZED else None
    runners, files, info = build_openvino_stages(method, stages, scratch.onnx(method, max_batch), precision,
                                                 scratch.workdir / f"openvino-{precision}", cal, log=lambda *a: None)
    profilers = {st.name: lambda feed, xml=files[st.name][0]: op_profile(ov.Core().read_model(str(xml)), precision,
                                                                        feed) for st in stages}
    quant = ""
    if cal is not None:  # int8, int8-bf16
        quant = (f"; int8 stages {[q['stage'] for q in info['quantized_stages']]} (NNCF, {len(cal)} synthetic "
                 f"calibration images, {info['int8_weights']['bits']}-bit weights)")
    return stage_chain_runner(method, [(st, runners[st.name]) for st in stages], f"openvino-{precision}", precision,
                              f"OpenVINO {ov.__version__} CPU, INFERENCE_PRECISION_HINT "
                              f"{info['inference_precision_hint']}{quant}, one compiled model per stage", profilers)
