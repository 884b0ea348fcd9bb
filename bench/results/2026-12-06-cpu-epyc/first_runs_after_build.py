"""The first chain runs after an OpenVINO int8-bf16 build, one by one, with the number of child processes alive.

Written for the AMX box's 336 px batch-1 outlier (2026-12-06-cpu-curves/bagclip-336-b1-trace.txt: the first ~4 runs
after the build at ~2 s, then 645, then 301 ms). Run it twice, with telemetry on (CI unset) and declined (CI=true:
OpenVINO's converter and NNCF both decline in CI), to see whether their forked telemetry senders slow those runs:

    env -u CI python first_runs_after_build.py 336
    CI=true python first_runs_after_build.py 336
"""
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil

from zsad.bench.one_backend import build_method
from zsad.export import openvino_export as O
from zsad.export.onnx_export import export_stage
from zsad.export.parity import synthetic_images

warnings.simplefilter("ignore")
size = int(sys.argv[1]) if len(sys.argv) > 1 else 336
method, _ = build_method("bagclip", "paper", size, None)
stages = method.eval().stages()
scratch = Path(tempfile.mkdtemp())
t = time.perf_counter()
files = {st.name: [export_stage(st, scratch / st.name / "model.onnx", max_batch=8)] for st in stages}
print(f"onnx {time.perf_counter() - t:.1f} s", flush=True)
t = time.perf_counter()
runners, _, _ = O.build_openvino_stages(method, stages, files, "int8-bf16", scratch, n_calibration=8,
                                        log=lambda *a: None)
print(f"built {time.perf_counter() - t:.1f} s", flush=True)
feed = O._chain_feed(method, synthetic_images(method.image_size, n=1))
me = psutil.Process()
t0 = time.perf_counter()
for i in range(14):
    kids = len(me.children())
    t = time.perf_counter()
    O.run_chain(stages, runners, feed)
    print(f"run {i:2d} at {t - t0:5.1f} s: {(time.perf_counter() - t) * 1e3:7.1f} ms, {kids} children alive",
          flush=True)
