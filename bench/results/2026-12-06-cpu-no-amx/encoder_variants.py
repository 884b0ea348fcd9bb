"""The paper-profile BAG-CLIP encoder at each int8 / attention / hint combination, timed alone (issue 25, no-AMX).

    python encoder_variants.py build DIR        # ONNX export, then NNCF int8 twice (2 calibration images):
                                                #   DIR/att_int8 (attention quantised: zsad's int8 IR),
                                                #   DIR/att_float (attention left alone: int8-bf16's IR), DIR/fp32
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python encoder_variants.py time DIR att_float:bf16 att_int8:f32 ...

time: for each IR:hint, p50 of 4 runs after 2 warm-ups (static shapes, LATENCY hint) and the op profile's top 5.
"""
import sys
import time
from pathlib import Path

import numpy as np


def build(out: Path) -> None:
    from zsad.bench.one_backend import build_method
    from zsad.export import openvino_export as ovx
    from zsad.export.runtimes.runners import Scratch
    from zsad.methods.stages import EncoderStage

    method, _ = build_method("bagclip", "paper", None, None)
    stages = method.stages()
    files = Scratch(out / "scratch", 2).onnx(method, 1)
    enc = next(st for st in stages if isinstance(st.module, EncoderStage))
    feeds = ovx.stage_calibration_feeds(method, stages, enc, ovx.calibration_images(None, method.image_size, 2))
    np.savez(out / "feed.npz", **feeds[0])
    keep = ovx.projection_ops(ovx.convert(files[enc.name][0]), method.backbone.visual.proj.detach().cpu().numpy())
    for name, attention in [("att_int8", True), ("att_float", False)]:
        ovx.save(ovx.quantize_int8(ovx.convert(files[enc.name][0]), feeds, keep, attention), out / name,
                 "int8" if attention else "int8-bf16", True)
    ovx.save(ovx.convert(files[enc.name][0]), out / "fp32", "fp32", False)


def time_variants(out: Path, specs: list[str]) -> None:
    import openvino as ov

    from zsad.export.openvino_export import op_profile, with_shapes_of

    feed = dict(np.load(out / "feed.npz"))
    core = ov.Core()
    for spec in specs:
        ir, hint = spec.split(":")
        model = core.read_model(str(out / ir / "model.xml"))
        compiled = core.compile_model(with_shapes_of(model, feed), "CPU",
                                      {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        for _ in range(2):
            request.infer(feed)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            request.infer(feed)
            times.append(time.perf_counter() - start)
        del request, compiled
        profile = op_profile(model, {"f32": "fp32", "bf16": "bf16"}[hint], feed, top=5)
        print(f"{spec:16s} p50 {1e3 * float(np.median(times)):7.0f} ms  runs {[round(1e3 * t) for t in times]}  "
              + "; ".join(f"{k} {v:.0f}" for k, v in profile.items()), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        time_variants(Path(sys.argv[2]), sys.argv[3:])
