"""CPU inference (issue 25): the CPU's ISA and peak from /proc/cpuinfo text, the precision --precision auto tries on
each kind of CPU and its fallback on a gate refusal, the speed-up / efficiency columns against hand computations,
and zsad-bench's worker processes (each backend's own peak RSS; every worker reaped, its memory gone with it)."""
import contextlib
import json
import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zsad import ZsadError
from zsad.bench.backends import default_backends
from zsad.bench.report import add_efficiency, add_speedups
from zsad.cpu import BF16_FAST, CpuInfo, apply_isa_cap, parse_cpuinfo, precision_preference, read_cpu

AMX_XEON = ("fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8 "
            "avx512_fp16")
ZEN4_EPYC = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16"
VNNI_XEON = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni"  # Cascade Lake: VNNI, no bf16
AVX2_ONLY = "fpu sse sse2 avx avx2 fma"
OLD = "fpu sse sse2"


def _cpuinfo(flags: str, cores: int, threads_per_core: int, mhz: float = 2600.0, vendor="GenuineIntel") -> str:
    """/proc/cpuinfo text of one socket: ``cores`` x ``threads_per_core`` logical CPUs (siblings share a core id)."""
    blocks = []
    for p in range(cores * threads_per_core):
        blocks.append(f"processor\t: {p}\nvendor_id\t: {vendor}\nmodel name\t: Test CPU\nphysical id\t: 0\n"
                      f"core id\t\t: {p % cores}\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n")
    return "\n".join(blocks)


def test_isa_cores_and_peak_from_cpuinfo_text():
    amx = parse_cpuinfo(_cpuinfo(AMX_XEON, cores=2, threads_per_core=2, mhz=2600.0))
    assert amx.physical_cores == 2 and amx.mhz == 2600.0 and amx.vendor == "GenuineIntel"  # 4 threads, 2 cores
    # by hand: cores x clock x operations per cycle per core
    assert amx.peak_tflops("fp32") == pytest.approx((2 * 2.6e9 * 64 / 1e12, "AVX-512F"))
    assert amx.peak_tflops("bf16") == pytest.approx((2 * 2.6e9 * 1024 / 1e12, "AMX-BF16"))
    assert amx.peak_tflops("int8") == pytest.approx((2 * 2.6e9 * 2048 / 1e12, "AMX-INT8"))
    assert amx.peak_tflops("int8-bf16")[1] == "AMX-INT8"  # held to the int8 peak
    epyc = parse_cpuinfo(_cpuinfo(ZEN4_EPYC, cores=2, threads_per_core=1, mhz=2000.0, vendor="AuthenticAMD"))
    assert [epyc.best_isa(p) for p in ("fp32", "bf16", "int8")] == [("AVX-512F", 64), ("AVX-512 BF16", 128),
                                                                   ("AVX-512 VNNI", 256)]
    old = parse_cpuinfo(_cpuinfo(OLD, cores=1, threads_per_core=1, mhz=1000.0))
    # no bf16 / int8 instructions: both at the plain fp32 rate
    assert [old.best_isa(p) for p in ("fp32", "bf16", "int8")] == [("SSE/AVX", 16)] * 3
    assert parse_cpuinfo(_cpuinfo(AVX2_ONLY, 4, 1)).best_isa("int8") == ("AVX2", 64)
    # only the logical CPUs this process may use count: CPUs 0 and 2 are the two threads of core 0
    assert parse_cpuinfo(_cpuinfo(AMX_XEON, cores=2, threads_per_core=2), allowed_cpus={0, 2}).physical_cores == 1


def test_precision_order_for_each_kind_of_cpu(monkeypatch):
    order = {name: [p for p, _ in precision_preference(frozenset(flags.split()))]
             for name, flags in [("amx", AMX_XEON), ("epyc", ZEN4_EPYC), ("vnni", VNNI_XEON), ("avx2", AVX2_ONLY),
                                 ("old", OLD)]}
    assert order == {"amx": ["int8-bf16", "bf16", "int8-qk-bf16", "int8", "fp32"],
                     "epyc": ["int8-qk-bf16", "int8-bf16", "int8", "bf16", "fp32"],
                     "vnni": ["int8", "fp32"], "avx2": ["fp32"], "old": ["fp32"]}
    # measured: bf16 no faster than fp32 here (above BF16_FAST) puts int8 first and drops bf16; inf: no bf16 at all
    def measured(flags, ratio):
        return [p for p, _ in precision_preference(frozenset(flags.split()), ratio)]

    for flags in (AMX_XEON, ZEN4_EPYC):
        assert measured(flags, 1.5) == measured(flags, BF16_FAST + 0.01) == ["int8", "int8-qk-bf16", "int8-bf16",
                                                                              "fp32"]
        assert measured(flags, math.inf) == ["int8", "fp32"]
        assert measured(flags, BF16_FAST) == measured(flags, 0.26) == measured(flags, None)  # fast: the flags' order
    assert measured(VNNI_XEON, 1.5) == ["int8", "fp32"] and measured(OLD, 1.5) == ["fp32"]
    assert "1.50x fp32's time" in precision_preference(frozenset(AMX_XEON.split()), 1.5)[0][1]
    cpu = CpuInfo(flags=frozenset(ZEN4_EPYC.split()))
    monkeypatch.setattr("zsad.export.openvino_export.bf16_matmul_ratio", lambda: 0.5)
    assert default_backends("cpu", cpu) == ["torch-fp32", "torch-compile", "torch-bf16", "torch-compile-bf16", "ort",
                                            "openvino-int8-qk-bf16", "openvino-int8-bf16", "openvino-int8",
                                            "openvino-bf16", "openvino-fp32", "served"]
    monkeypatch.setattr("zsad.export.openvino_export.bf16_matmul_ratio", lambda: 1.5)  # the torch bf16 comparators stay
    assert default_backends("cpu", cpu) == ["torch-fp32", "torch-compile", "torch-bf16", "torch-compile-bf16", "ort",
                                            "openvino-int8", "openvino-int8-qk-bf16", "openvino-int8-bf16",
                                            "openvino-fp32", "served"]
    no_bf16 = default_backends("cpu", CpuInfo(flags=frozenset(VNNI_XEON.split())))
    assert "torch-bf16" not in no_bf16 and "openvino-int8" in no_bf16 and "openvino-bf16" not in no_bf16
    avx2 = default_backends("cpu", CpuInfo(flags=frozenset(AVX2_ONLY.split())))
    assert "openvino-fp32" in avx2 and not [b for b in avx2 if "int8" in b or "bf16" in b]


def test_onednn_isa_cap_leaves_out_the_flags_above_it(monkeypatch):
    """ONEDNN_MAX_CPU_ISA (oneDNN's documented names, any case) hides the ISAs above it from the peaks and from
    --precision auto's order, as oneDNN hides them from OpenVINO's and torch's kernels: an AMX Xeon capped at
    AVX512_CORE_BF16 is an AVX-512 BF16 CPU without AMX; AVX512_CORE drops VNNI (AVX2-VNNI too: not below it in
    oneDNN's order); DNNL_MAX_CPU_ISA is the older name; an unknown name changes nothing."""
    def capped(env, flags=AMX_XEON):
        return apply_isa_cap(parse_cpuinfo(_cpuinfo(flags, cores=2, threads_per_core=1)), env)

    bf16 = capped({"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"})
    assert bf16.flags == frozenset(ZEN4_EPYC.split())  # AMX, AVX-512 FP16 and AVX-VNNI gone, the rest kept
    assert [bf16.best_isa(p) for p in ("fp32", "bf16", "int8")] == [("AVX-512F", 64), ("AVX-512 BF16", 128),
                                                                   ("AVX-512 VNNI", 256)]
    assert [p for p, _ in precision_preference(bf16.flags)] == ["int8-qk-bf16", "int8-bf16", "int8", "bf16", "fp32"]
    assert "capped by ONEDNN_MAX_CPU_ISA=avx512_core_bf16" in bf16.summary()["isa_cap"]
    core = capped({"DNNL_MAX_CPU_ISA": "AVX512_CORE"})
    assert core.best_isa("int8") == ("AVX2", 64) and core.best_isa("bf16") == ("AVX-512F", 64)
    assert [p for p, _ in precision_preference(core.flags)] == ["fp32"]  # AVX-512 without VNNI: int8 is slower
    assert capped({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}).best_isa("int8") == ("AVX-VNNI", 128)
    assert capped({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_FP16"}).best_isa("int8") == ("AVX-512 VNNI", 256)
    assert capped({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}).best_isa("bf16") == ("AMX-BF16", 1024)
    assert capped({"ONEDNN_MAX_CPU_ISA": "SSE41"}).best_isa("fp32") == ("SSE/AVX", 16)
    # the newer name wins over the older one, as in oneDNN
    both = {"ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX512_CORE_AMX"}
    assert capped(both).best_isa("fp32")[0] == "AVX2+FMA"
    # a cap above what the CPU has adds nothing
    assert capped({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, ZEN4_EPYC).flags == frozenset(ZEN4_EPYC.split())
    for env in ({}, {"ONEDNN_MAX_CPU_ISA": "DEFAULT"}, {"ONEDNN_MAX_CPU_ISA": "AVX9000"}):
        assert capped(env).flags == frozenset(AMX_XEON.split())
    assert "not a oneDNN ISA name" in capped({"ONEDNN_MAX_CPU_ISA": "AVX9000"}).isa_cap
    # read_cpu applies it to this machine: capped at AVX2, no peak is above AVX2's, whatever the CPU
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    here = read_cpu().summary()
    assert not [f for f in here["isa_flags"] if f.startswith(("avx512", "amx"))]
    assert set(here["peak_isa"].values()) <= {"AVX2+FMA", "AVX2", "SSE/AVX"}


def test_choose_precision_keeps_what_the_backend_builds_here():
    from zsad.export import runtimes
    from zsad.export.exporter import choose_precision

    amx = CpuInfo(model="Test CPU", flags=frozenset(AMX_XEON.split()))
    onnx = choose_precision(runtimes.get("onnxruntime"), False, "cpu", amx)
    assert [c["precision"] for c in onnx["candidates"]] == ["fp32"]
    assert [r["precision"] for r in onnx["refused"]] == ["int8-bf16", "bf16", "int8-qk-bf16", "int8"]
    assert all("not a precision of --backend onnxruntime" in r["why"] for r in onnx["refused"])
    with pytest.raises(ZsadError, match="exports for CPU servers"):  # fp32's own refusal is the user's error
        choose_precision(runtimes.get("openvino"), False, "gpu", amx)


def test_choose_precision_follows_the_measured_bf16_speed(monkeypatch):
    """--precision auto measures bf16 where the CPU has it: slower than fp32 here puts int8 first and bf16 out, and
    the export's record keeps the measurement (onnxruntime has no bf16: nothing measured)."""
    from zsad.export import runtimes
    from zsad.export.exporter import choose_precision

    amx = CpuInfo(model="Test CPU", flags=frozenset(AMX_XEON.split()))
    calls = []
    # the runtime's own checks ask this machine's OpenVINO (no bf16 on an AVX2 box): the made-up AMX CPU passes them
    monkeypatch.setattr(runtimes.get("python-openvino"), "check_options", lambda *a: None)
    for ratio, order, recorded in [(1.5, ["int8", "int8-qk-bf16", "int8-bf16", "fp32"], 1.5),
                                   (math.inf, ["int8", "fp32"], "bf16 does not compile"),
                                   (0.26, ["int8-bf16", "bf16", "int8-qk-bf16", "int8", "fp32"], 0.26)]:
        monkeypatch.setattr("zsad.export.openvino_export.bf16_matmul_ratio", lambda r=ratio: calls.append(r) or r)
        choice = choose_precision(runtimes.get("python-openvino"), False, "cpu", amx)
        assert [c["precision"] for c in choice["candidates"]] == order
        assert choice["cpu"]["bf16_linear_time_vs_fp32"] == recorded
    json.dumps(choice, allow_nan=False)  # the record is plain JSON
    calls.clear()
    assert "bf16_linear_time_vs_fp32" not in choose_precision(runtimes.get("onnxruntime"), False, "cpu", amx)["cpu"]
    assert not calls


def _bf16_over_fp32_by_hand(size: int = 1024, repeats: int = 10) -> float:
    """The same question asked independently of zsad's helper: one [size x size] matmul against a constant weight,
    compiled by OpenVINO's own API at each inference precision, the best of ``repeats`` timed calls each."""
    import time

    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)
    best = {}
    for hint in ("f32", "bf16"):
        p = ops.parameter([size, size], np.float32)
        request = ov.Core().compile_model(ov.Model([ops.matmul(p, ops.constant(w), False, True)], [p]), "CPU",
                                          {"INFERENCE_PRECISION_HINT": hint}).create_infer_request()
        request.infer({0: x})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            request.infer({0: x})
            times.append(time.perf_counter() - t0)
        best[hint] = min(times)
    return best["bf16"] / best["f32"]


def test_bf16_speed_is_measured_on_this_cpu():
    """The measurement itself, on this machine: a finite time ratio on the same side of 1 as the same ratio timed by
    hand where that one is clear (bf16 at most 0.8x or at least 1.25x fp32's time: the 2-core EPYC 0.5, an AMX Xeon
    0.26); where oneDNN is capped at AVX2 (any x86 CPU) bf16 cannot beat fp32, so the measurement says slow; with AMX
    usable here it says fast."""
    pytest.importorskip("openvino")
    from zsad.export.openvino_export import bf16_matmul_ratio

    ratio = bf16_matmul_ratio()
    assert ratio is not None and ratio > 0
    if {"amx_bf16", "amx_tile"} <= read_cpu().flags:
        assert ratio < BF16_FAST
    if read_cpu().flags & {"avx512_bf16", "amx_bf16"}:
        by_hand = _bf16_over_fp32_by_hand()
        if by_hand <= 0.8:
            assert ratio < 1, (ratio, by_hand)
        elif by_hand >= 1.25:
            assert ratio > 1, (ratio, by_hand)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "from zsad.export.openvino_export import bf16_matmul_ratio; print(bf16_matmul_ratio())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    assert float(out) > BF16_FAST, out


def test_auto_falls_back_when_a_gate_refuses():
    from zsad.export.exporter import first_passing
    from zsad.export.openvino_export import PrecisionGateError

    def choice():
        return {"candidates": [{"precision": p, "reason": f"why {p}"} for p in ("bf16", "int8-bf16", "int8", "fp32")],
                "refused": []}

    tried = []

    def attempt(refuse):
        def run(precision):
            tried.append(precision)
            if precision in refuse:
                raise PrecisionGateError(f"{precision} precision gate failed")
            return f"files of {precision}"
        return run

    c = choice()
    assert first_passing(c, attempt({"bf16"}), log=lambda *a: None) == ("int8-bf16", "files of int8-bf16")
    assert tried == ["bf16", "int8-bf16"] and c["chosen"] == "int8-bf16"
    assert c["refused"] == [{"precision": "bf16", "why": "bf16 precision gate failed"}]
    assert c["reason"] == "why int8-bf16; faster candidates refused by their gates: bf16"
    c = choice()
    assert first_passing(c, attempt(set()), log=lambda *a: None)[0] == "bf16" and c["refused"] == []
    with pytest.raises(PrecisionGateError, match="fp32"):  # the last refusal is the export's failure
        first_passing(choice(), attempt({"bf16", "int8-bf16", "int8", "fp32"}), log=lambda *a: None)


def test_speedups_and_efficiency_by_hand():
    def row(backend, precision, batch, ms_per_image, tflops=None, parity_ok=True):
        return {"backend": backend, "precision": precision, "batch": batch, "status": "ok",
                "p50_ms_per_image": ms_per_image, "achieved_tflops": tflops, "parity_ok": parity_ok}

    rows = [row("torch-fp32", "fp32", 1, 1000.0, 0.1), row("torch-bf16", "bf16", 1, 400.0, 0.25),
            row("torch-compile", "fp32", 1, 300.0, parity_ok=False),  # fastest torch, but wrong: not the comparator
            row("openvino-bf16", "bf16", 1, 200.0, 0.4096), row("openvino-int8-bf16", "int8-bf16", 1, 250.0, 0.4096),
            row("torch-fp32", "fp32", 2, 800.0), row("ort", "fp32", 2, 400.0, 0.128),
            {"backend": "torch-fp16", "precision": "-", "batch": 1, "status": "skipped", "reason": "GPU only"}]
    add_speedups(rows)
    by = {(r["backend"], r["batch"]): r for r in rows}
    assert by["openvino-bf16", 1]["speedup_vs_torch_fp32_b1"] == pytest.approx(1000 / 200)
    assert by["openvino-bf16", 1]["speedup_vs_best_torch"] == pytest.approx(400 / 200)
    assert by["openvino-bf16", 1]["best_torch"] == "torch-bf16"
    assert by["ort", 2]["speedup_vs_torch_fp32_b1"] == pytest.approx(1000 / 400)
    assert by["ort", 2]["speedup_vs_best_torch"] == pytest.approx(800 / 400)  # against batch 2's torch
    assert by["ort", 2]["best_torch"] == "torch-fp32"
    assert "speedup_vs_best_torch" not in by["torch-fp16", 1]
    cpu = CpuInfo(flags=frozenset(AMX_XEON.split()), physical_cores=2, mhz=2000.0)
    add_efficiency(rows, cpu)
    # peak = 2 cores x 2.0 GHz x ops/cycle: bf16 on AMX 1024 -> 4.096 TFLOP/s; int8 2048 -> 8.192; fp32 64 -> 0.256
    assert by["openvino-bf16", 1]["efficiency"] == pytest.approx(0.4096 / 4.096)
    assert by["openvino-bf16", 1]["peak_isa"] == "AMX-BF16"
    assert by["openvino-int8-bf16", 1]["efficiency"] == pytest.approx(0.4096 / 8.192)
    assert by["ort", 2]["efficiency"] == pytest.approx(0.128 / 0.256)
    assert "efficiency" not in by["torch-fp32", 2]  # no achieved rate, no efficiency


def _vm_kb(pid: int | str, field: str) -> int:
    return int(next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ln.startswith(field)).split()[1])


@pytest.mark.slow
def test_each_backend_runs_in_its_own_worker_and_leaves_nothing_behind():
    """Three backends in one run, each in a spawned worker: its own pid and peak RSS (VmHWM: below the 1 GB this
    process holds, which a worker's ru_maxrss would include), the same random weights as the parent (torch fp32
    parity exact), no worker for a backend skipped up front, and afterwards every worker reaped and gone."""
    from zsad.bench.model_bench import bench_model

    ballast = bytearray(1024 * 2**20)
    ballast[::4096] = b"\x01" * (len(ballast) // 4096)  # touched: resident
    before = _vm_kb("self", "VmRSS")
    _, _, rows = bench_model("anomalyclip", "tiny", None, [1], ["torch-fp32", "ort", "openvino-fp32", "torch-fp16"],
                             "cpu", iters=1, warmup=0, checkpoint=None, served_url=None, concurrency=[1],
                             served_seconds=1.0, progress=False, log=lambda *a: None)
    grown_mb = (_vm_kb("self", "VmRSS") - before) / 1024
    by = {r["backend"]: r for r in rows}
    ok = [by[b] for b in ("torch-fp32", "ort", "openvino-fp32")]
    assert all(r["status"] == "ok" and r["parity_ok"] for r in ok), rows
    assert by["torch-fp32"]["parity_map_max_rel"] == 0.0  # the worker rebuilt the parent's weights exactly
    pids = [r["worker_pid"] for r in ok]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    for r in ok:
        assert 100 < r["peak_rss_mb"] < len(ballast) / 2**20, r  # torch loaded, but not this process's memory
    assert by["torch-fp16"]["status"] == "skipped" and "worker_pid" not in by["torch-fp16"]
    for pid in pids:
        with pytest.raises(ChildProcessError):  # reaped: no longer a child of ours, not even a zombie
            os.waitpid(pid, os.WNOHANG)
        assert not Path(f"/proc/{pid}").exists()
    assert multiprocessing.active_children() == []
    # onnxruntime / openvino sessions lived in the workers: this process kept none (it grew ~240 MB in one run of
    # these backends in-process, measured)
    assert grown_mb < 120, grown_mb
    del ballast


@pytest.mark.slow
def test_export_auto_records_its_choice_and_falls_back(tmp_path, monkeypatch):
    """--precision auto on a faked VNNI CPU without bf16 tries int8 then fp32; a gate that refuses every int8 map
    leaves fp32, written as fp32, with the refusal and the reason in the parity report."""
    from zsad.cpu import CpuInfo as Info
    from zsad.export.exporter import ExportOptions, export_model
    from zsad.export.openvino_export import GateThresholds

    monkeypatch.setattr("zsad.cpu.read_cpu",
                        lambda measure=True: Info(model="Faked VNNI CPU", flags=frozenset(VNNI_XEON.split())))
    strict = GateThresholds(map_corr=1.0 + 1e-9)  # no int8 map correlates above 1
    export_model(ExportOptions(model="anomalyclip", profile="tiny", backend="openvino", precision="auto", out=tmp_path,
                               max_batch=2, parity_images=2, calibration_images=2, gate_images=4,
                               gate_thresholds=strict), log=lambda *a: None)
    report = json.loads((tmp_path / "anomalyclip" / "parity_report.json").read_text())
    choice = report["precision_choice"]
    assert report["precision"] == "fp32" and choice["chosen"] == "fp32"
    assert [c["precision"] for c in choice["candidates"]] == ["int8", "fp32"]
    assert choice["cpu"]["model"] == "Faked VNNI CPU"
    assert choice["cpu"]["isa_flags"] == ["avx2", "avx512_vnni", "avx512f", "fma"]
    (refused,) = choice["refused"]
    assert refused["precision"] == "int8" and "anomaly-map correlation" in refused["why"]
    assert "faster candidates refused by their gates: int8" in choice["reason"]
    config = (tmp_path / "anomalyclip_encoder" / "config.pbtxt").read_text()
    assert 'key: "zsad_precision"' in config and 'string_value: "fp32"' in config


def test_a_spawned_processs_peak_rss_is_its_own():
    """peak_rss_mb is the worker's own high-water mark: a process spawned while this one holds 512 MB reports far
    less (Linux carries getrusage's ru_maxrss over exec from the forked image: it would report >= 512 MB)."""
    from concurrent.futures import ProcessPoolExecutor

    from zsad.bench.worker import peak_rss_mb

    ballast = bytearray(512 * 2**20)
    ballast[::4096] = b"\x01" * (len(ballast) // 4096)  # touched: resident
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child = pool.submit(peak_rss_mb).result()
    assert child is not None and 1 < child < 256, child
    assert peak_rss_mb() > 512
    del ballast


def _peak_growth_mb(run) -> float:
    """MB the peak RSS of this process rises above its current RSS while ``run()`` runs (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm_kb("self", "VmRSS")
    run()
    return (_vm_kb("self", "VmHWM") - before) / 1024


def test_ort_int8_calibration_frees_each_tensor_as_it_goes(tmp_path):
    """ORT's calibration graph (every MatMul / Conv tensor also feeding a ReduceMin and a ReduceMax) keeps every such
    tensor of the model alive in ORT's default execution order (a paper-profile ViT-L: 15.2 GB for one image);
    under zsad's calibration (priority order) a tiny CLIP encoder at 448 px runs in a small fraction of that
    (measured 21 vs 179 MB)."""
    import numpy as np
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from zsad.bench.one_backend import build_method
    from zsad.export.onnx_export import export_stage
    from zsad.export.runtimes.onnx_runtime import calibration_in_priority_order

    method, _ = build_method("bagclip", "tiny", 448, None)
    encoder = method.stages()[0]
    export_stage(encoder, tmp_path / "encoder.onnx", 2)
    image = np.random.default_rng(0).standard_normal((1, 3, 448, 448)).astype(np.float32)

    def growth(order) -> float:
        with order():
            calibrator = create_calibrator(tmp_path / "encoder.onnx", ["MatMul", "Conv", "Gemm"],
                                           augmented_model_path=str(tmp_path / f"{order.__name__}.onnx"),
                                           calibrate_method=CalibrationMethod.MinMax)
        session = calibrator.infer_session
        session.run(None, {"images": image})  # first run: one-off allocations
        return _peak_growth_mb(lambda: session.run(None, {"images": image}))

    default, priority = growth(contextlib.nullcontext), growth(calibration_in_priority_order)
    assert default > 60 and priority < default / 3, (default, priority)


def test_op_profile_is_the_median_of_its_profiled_runs():
    from zsad.export.openvino_export import median_profile

    # three profiled runs of one stage, the second held up by the machine (its Transpose 6x the others)
    runs = [{"attention jit": 10.0, "Transpose ref": 50.0},
            {"attention jit": 11.0, "Transpose ref": 282.0},
            {"attention jit": 9.0, "Transpose ref": 47.0, "Split ref": 3.0}]
    # by hand: the middle value of each kind, 0 where a run did not execute it
    assert median_profile(runs, top=3) == {"Transpose ref": 50.0, "attention jit": 10.0, "Split ref": 0.0}
    assert median_profile(runs, top=1) == {"Transpose ref": 50.0, "other": 10.0}
    assert median_profile([{"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 7.0}], top=2) == {"b": 6.0, "a": 2.0}


def _running(pid: int) -> bool:
    """Alive, not a zombie (an orphan's exit may wait for an init that does not reap)."""
    try:
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


def test_a_bench_worker_ends_with_its_parent(tmp_path):
    """A zsad-bench killed while a backend's worker runs (SIGKILL, or a SIGTERM that skips Python's cleanup) left
    that worker running on its own, a multi-GB process for minutes at the paper profile. The worker asks the kernel
    to SIGTERM it when its parent dies: here it blocks reading its parity images from a FIFO nobody writes, the
    parent is SIGKILLed, and the worker is gone within seconds."""
    import signal
    import time

    from zsad.bench.worker import BackendTask

    worker = None
    fifo = tmp_path / "images.npy"
    os.mkfifo(fifo)
    task = BackendTask(backend="torch-fp32", model="anomalyclip", profile="tiny", image_size=None, checkpoint=None,
                       images_npy=str(fifo), base={}, batches=[1], device="cpu", iters=1, warmup=0, gflops=1.0,
                       scratch_dir=str(tmp_path / "scratch"), calibration_images=1)
    (tmp_path / "task.pkl").write_bytes(__import__("pickle").dumps(task))
    code = ("import pickle, sys; from zsad.bench.worker import run_in_worker; "
            f"run_in_worker(pickle.loads(open({str(tmp_path / 'task.pkl')!r}, 'rb').read()))")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while worker is None and time.monotonic() < deadline:  # the spawned worker: a child of the parent
            for d in Path("/proc").iterdir():
                if d.name.isdigit() and d.name != str(parent.pid):
                    try:
                        status = (d / "status").read_text()
                    except OSError:
                        continue
                    if f"\nPPid:\t{parent.pid}\n" in status and b"spawn_main" in (d / "cmdline").read_bytes():
                        worker = int(d.name)
            time.sleep(0.2)
        assert worker is not None, "no worker started"
        time.sleep(3)  # past its start-up, blocked on the FIFO
        assert Path(f"/proc/{worker}").exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker), "the worker outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if worker is not None and _running(worker):  # the test failed: leave no orphan behind
            os.kill(worker, signal.SIGKILL)
