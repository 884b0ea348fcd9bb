"""kernels/aot.py: every Triton kernel configuration built ahead of time for sm_80 / sm_89 / sm_90a on the CPU.

- the occupancy formula against hand computations by NVIDIA's occupancy rules (each case written out);
- the checks (spill, shared memory per block, compile error) on crafted rows at the limits;
- the ptxas log parser on logs in ptxas's format, and on a real build: the test runs ptxas -v itself on the PTX
  Triton produced and reads the cubin Triton built with cuobjdump, and both agree with the row;
- the recorder sees every @triton.jit kernel of the kernel modules, with the block sizes the launchers choose;
- the papers' shapes in aot.py agree with the paper profile;
- the step bites: a configuration that spills, one whose shared memory is over the limit and one that does not
  compile fail it (rows, CLI exit status, gpu-check's step; ~20 s), and a representative subset of the real
  configurations (each kernel at its paper setting, attention in fp16 and fp32: 21 builds, ~40 s on 2 cores)
  compiles clean; the full set (225 builds, ~340 CPU-s) is the gpu-check step's job, see
  bench/results/*-kernels-aot.md;
- the committed table in bench/results is current (its fingerprint is what would be built now) and all green.
"""
import csv
import json
import re
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from zsad.kernels import aot  # noqa: E402
from zsad.kernels import dual_attention as DA  # noqa: E402
from zsad.kernels import knn_graph as KG  # noqa: E402
from zsad.kernels import window_attention as WA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
A80, A89, A90 = aot.TARGETS[80], aot.TARGETS[89], aot.TARGETS[90]


# == occupancy, by hand ==========================================================================================
def test_published_per_sm_limits():
    """The limits the formula uses, as NVIDIA publishes them (CUDA C++ Programming Guide, compute capabilities
    table; Ampere / Ada / Hopper tuning guides): written out here in bytes and counts."""
    assert (A80.max_threads_per_sm, A80.max_blocks_per_sm, A80.smem_per_sm, A80.smem_per_block) == \
        (2048, 32, 167936, 166912)  # 164 KB per SM, 163 KB per block
    assert (A89.max_threads_per_sm, A89.max_blocks_per_sm, A89.smem_per_sm, A89.smem_per_block) == \
        (1536, 24, 102400, 101376)  # 100 KB per SM, 99 KB per block
    assert (A90.max_threads_per_sm, A90.max_blocks_per_sm, A90.smem_per_sm, A90.smem_per_block) == \
        (2048, 32, 233472, 232448)  # 228 KB per SM, 227 KB per block
    for a in (A80, A89, A90):
        assert (a.regs_per_sm, a.max_regs_per_thread, a.reg_alloc_unit, a.smem_reserved_per_block,
                a.smem_alloc_unit) == (65536, 255, 256, 1024, 128)
    assert [a.name for a in (A80, A89, A90)] == ["sm_80", "sm_89", "sm_90a"]


@pytest.mark.parametrize("arch,regs,threads,smem,blocks,limiter", [
    # H100, the kNN top-k kernel's figures: 160 regs x 32 = 5120 per warp (a multiple of 256); a sub-partition holds
    # 16384 // 5120 = 3 warps -> 12 warps per SM -> 3 blocks of 4 warps. Shared: 49152 + 1024 = 50176 -> 233472 //
    # 50176 = 4 blocks. Warps: 64 // 4 = 16. -> 3 blocks, 12 warps, 12/64.
    (A90, 160, 128, 49152, 3, "registers"),
    # registers live per sub-partition: 200 regs -> 6400 per warp; 16384 // 6400 = 2 warps per sub-partition -> 8
    # one-warp blocks (the whole file would take 65536 // 6400 = 10). Shared 1024 -> 164; warps 64; blocks 32.
    (A80, 200, 32, 0, 8, "registers"),
    # register allocation unit: 100 regs -> 3200, rounded up to 3328 per warp; 16384 // 3328 = 4 -> 16 warps
    # (unrounded 16384 // 3200 = 5 -> 20).
    (A80, 100, 32, 0, 16, "registers"),
    # the reserved 1 KB: 51200 + 1024 = 52224 B per block -> 102400 // 52224 = 1 block on sm_89 (2 without it)
    (A89, 32, 128, 51200, 1, "shared memory"),
    # the 128 B allocation unit: 33076 + 1024 = 34100 -> rounded to 34176 -> 102400 // 34176 = 2 (3 unrounded)
    (A89, 32, 128, 33076, 2, "shared memory"),
    # the block limit: 1-warp blocks, 16 regs (512 per warp -> 32 per sub-partition -> 128 blocks), no shared
    # memory (1024 -> 100): warps allow 48, blocks 24 on sm_89
    (A89, 16, 32, 0, 24, "blocks"),
    # the warp limit: 1024 threads = 32 warps, 48 // 32 = 1 block on sm_89 (registers: 32 x 32 = 1024 per warp ->
    # 16 per sub-partition -> 64 warps -> 2 blocks)
    (A89, 32, 1024, 0, 1, "warps"),
    # 255 registers x 1024 threads: 8160 -> 8192 per warp, 2 per sub-partition = 8 warps < 32: no block fits
    (A90, 255, 1024, 0, 0, "registers"),
    # more shared memory than one block may have on sm_89 (but not on sm_90): no block
    (A89, 32, 128, 101377, 0, "shared memory"),
    # the same two limits equal: 64 regs (2048 per warp, 8 per sub-partition, 32 warps -> 4 blocks of 8 warps) and
    # 8 warps x 4 = 32 of the 64 warps; shared (50000 + 1024 -> 51072) -> 233472 // 51072 = 4
    (A90, 64, 256, 50000, 4, "registers, shared memory"),
])
def test_occupancy_by_hand(arch, regs, threads, smem, blocks, limiter):
    occ = aot.occupancy(arch, regs, threads, smem)
    warps = -(-threads // 32)
    assert occ.blocks_per_sm == blocks
    assert occ.warps_per_sm == blocks * warps
    assert occ.fraction == pytest.approx(blocks * warps / (arch.max_threads_per_sm // 32))
    assert occ.limiter == limiter


# == the checks ==================================================================================================
def _row(**kw):
    row = {"error": None, "spill_stores": 0, "spill_loads": 0, "smem_static": 0, "smem_dynamic": 0}
    row.update(kw)
    return row


def test_checks_at_the_limits():
    assert aot.problems(_row(), A90) == []
    assert "register spills" in aot.problems(_row(spill_stores=4), A90)[0]
    assert "register spills" in aot.problems(_row(spill_loads=4), A90)[0]  # loads alone count too
    # shared memory per block = static + dynamic, against the per-block maximum (not the SM's carveout)
    assert aot.problems(_row(smem_dynamic=232448), A90) == []  # exactly 227 KB: allowed
    assert "shared memory 232449 B" in aot.problems(_row(smem_dynamic=232448, smem_static=1), A90)[0]
    assert aot.problems(_row(smem_dynamic=101376), A89) == []
    assert "sm_89's maximum 101376" in aot.problems(_row(smem_dynamic=101377), A89)[0]
    assert aot.problems(_row(smem_dynamic=166912), A80) == []
    assert aot.problems(_row(smem_dynamic=166913), A80)
    assert len(aot.problems(_row(smem_dynamic=200000, spill_stores=8, spill_loads=8), A89)) == 2
    assert aot.problems(_row(error="CompilationError: boom"), A80) == ["compile error: CompilationError: boom"]


def test_parse_ptxas_log():
    log = ("ptxas info    : 11 bytes gmem\n"
           "ptxas info    : Compiling entry function '_k' for 'sm_89'\n"
           "ptxas info    : Function properties for _k\n"
           "    64 bytes stack frame, 40 bytes spill stores, 24 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 384 bytes cmem[0]\n")
    assert aot.parse_ptxas(log) == {"registers": 255, "smem_static": 2048, "stack": 64, "spill_stores": 40,
                                    "spill_loads": 24}
    clean = ("ptxas info    : Function properties for _k\n"
             "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
             "ptxas info    : Used 96 registers, used 1 barriers\n")
    assert aot.parse_ptxas(clean) == {"registers": 96, "smem_static": 0, "stack": 0, "spill_stores": 0,
                                      "spill_loads": 0}
    with pytest.raises(ValueError, match="no resource usage"):
        aot.parse_ptxas("ptxas fatal   : Unresolved extern function 'x'\n")


# == what gets built =============================================================================================
@pytest.fixture(scope="module")
def launches():
    return aot.collect(aot.call_sites())


def _jit_kernels(module):
    return {name for name, obj in vars(module).items()
            if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")}


def test_every_kernel_is_recorded_with_the_launchers_choices(launches):
    kernels = {f"{m.__name__.rsplit('.', 1)[-1]}.{k}" for m in (KG, WA, DA) for k in _jit_kernels(m)}
    assert kernels == {f"{la.module}.{la.name}" for la in launches}
    assert len(kernels) == 5

    # SOWA's dispatch in fp16 and fp32: the launcher's table for the precision, head dim 1024 / 8 = 128
    for dt, prec in (("fp16", "half"), ("fp32", "fp32")):
        sowa = [la for la in launches
                if f"window_attention.dispatch(grid=24 C=1024 heads=8 window=12 {dt})" in la.sites]
        assert len(sowa) == 1 and sorted(sowa[0].targets) == [80, 89, 90]
        assert tuple(sowa[0].kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")) == \
            WA.LAUNCH_CONFIGS[prec]
        assert (sowa[0].kwargs["HEAD_DIM"], sowa[0].kwargs["WINDOW"]) == (128, 12)
    # the backbone's dual attention at 518 px in bf16: the half-precision choice, 16 heads of 64
    dual = [la for la in launches if "dual_attention.dispatch(L=1370 heads=16 hd=64 bf16)" in la.sites]
    assert len(dual) == 1 and dual[0].config().startswith("bf16 ") and dual[0].kwargs["HEAD_DIM"] == 64
    assert tuple(dual[0].kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")) == \
        DA.LAUNCH_CONFIGS["half"]
    assert dual[0].kwargs["WITH_QK"] is True
    # BAG-CLIP's selection at k = 24: KP is the next power of two; the blocks are the target's choice, so H100 and
    # A100 / L4 get different builds
    sel = {cc: [la for la in launches if "knn_graph.dispatch_select(N=1369 D=1024 k=24 r=14)" in la.sites
                and cc in la.targets] for cc in aot.TARGETS}
    assert all(len(v) == 1 for v in sel.values())
    for cc, (la,) in sel.items():
        kw = la.kwargs
        assert (kw["K"], kw["KP"], kw["WRITE_ADJ"], kw["QSCALE"]) == (24, 32, False, 16384.0)
        assert (la.kwargs["BLOCK_M"], la.kwargs["BLOCK_N"], la.kwargs["num_warps"]) == KG.topk_config(cc)
    assert sel[80][0] is sel[89][0] and sel[90][0] is not sel[80][0]
    # every perf-sweep configuration the GPU run will launch is in the build
    for mod, name in ((DA, "dual"), (WA, "window")):
        for prec, dt in (("half", "fp16"), ("fp32", "fp32")):
            for bm, bn, nw, ns in mod.PERF_CONFIGS[prec]:
                assert any(f"{dt} config={bm}x{bn}w{nw}s{ns}" in s for la in launches for s in la.sites if name in s)
    # N = 576 is divisible by 16, 1369 is not: Triton specialises on it, so they are different builds
    n576 = [la for la in launches if "knn_graph.dispatch_select(N=576 D=1024 k=24 r=14)" in la.sites]
    assert len(n576) == 2 and not {id(la) for la in n576} & {id(la) for v in sel.values() for la in v}
    assert all("N" in la.divisible().split(",") for la in n576)


def test_recording_launches_nothing_and_restores_the_modules():
    x = torch.randn(1, 40, 16)
    with aot.record() as launches:
        idx = KG.dispatch_select(x, 3)  # the Triton path on a CPU tensor: recorded, not run
    assert len(launches) == 1 and launches[0].name == "_knn_topk_kernel"
    assert idx.shape == (1, 40, 3)
    assert KG.use_triton(x) is False and KG.for_current_mode is aot.for_current_mode  # restored
    torch.testing.assert_close(KG.dispatch_select(x, 3), KG.knn_select(x, 3))


def test_changed_default_choices_match_the_references_in_the_interpreter(monkeypatch):
    """The fp32 choices that replaced the spilling ones (window 32 x 32, one stage; dual 32 x 16) give the float64
    references' results (Triton's interpreter, small shapes with masked tails: 64-token windows, 40 tokens)."""
    import math

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 16 * 16, 32, generator=g)
    scale = WA.logit_scale(torch.full((2,), math.log(10.0)))
    bias = 16 * torch.sigmoid(torch.randn(2, 64, 64, generator=g))
    assert WA.LAUNCH_CONFIGS["fp32"][:2] == (32, 32)
    torch.testing.assert_close(WA.window_vv_attention_triton(v, 2, scale, bias, 8, 16).double(),
                               WA.window_vv_attention_reference(v.double(), 2, scale.double(), bias.double(), 8, 16),
                               rtol=1e-5, atol=2e-5)
    q, k, vv = torch.randn(3, 1, 2, 40, 16, generator=g).unbind(0)
    assert DA.LAUNCH_CONFIGS["fp32"][:2] == (32, 16)
    for got, ref in zip(DA.dual_attention_triton(q, k, vv), DA.dual_attention_reference(q.double(), k.double(),
                                                                                      vv.double()), strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_paper_shapes_match_the_profile():
    import open_clip

    import zsad.backbone  # noqa: F401  (open_clip's import needs zsad's torchvision shim first)
    from zsad.configs import resolve_profile

    bag, sowa = resolve_profile("bagclip", "paper"), resolve_profile("sowa", "paper")
    vit = open_clip.get_model_config(bag["backbone"]["arch"])["vision_cfg"]
    assert vit["width"] == aot.VIT_WIDTH and vit["patch_size"] == aot.PATCH
    assert vit["width"] // vit.get("head_width", 64) == aot.VIT_HEADS
    for method in ("anomalyclip", "bagclip", "afclip", "bayespfl", "sowa"):
        assert resolve_profile(method, "paper")["backbone"]["image_size"] in aot.IMAGE_SIZES
    assert bag["graph"]["knn_k"] in aot.KNN_K and bag["graph"]["sim_resolution_bits"] in aot.KNN_RESOLUTION_BITS
    assert sowa["backbone"]["image_size"] == aot.SOWA_IMAGE_SIZE
    assert (sowa["adapter"]["window"], sowa["adapter"]["heads"]) == (aot.SOWA_WINDOW, aot.SOWA_HEADS)
    assert {c["nodes"] for c in KG.PERF_CASES} <= {(s // aot.PATCH) ** 2 for s in aot.IMAGE_SIZES}
    assert {c["k"] for c in KG.PERF_CASES} <= set(aot.KNN_K)


# == real builds =================================================================================================
def _sowa(dtype, **blocks):
    v = torch.zeros(1, 576, 1024, dtype=dtype)
    return aot.Site("window_attention.window_vv_attention_triton", f"{dtype} {blocks}",
                    partial(WA.window_vv_attention_triton, v, 8, torch.ones(8), torch.zeros(8, 144, 144), 12, 24,
                            **blocks))


def _knn(**blocks):
    return aot.Site("knn_graph.knn_topk_triton", f"N=1369 {blocks}",
                    partial(KG.knn_topk_triton, torch.zeros(1, 1369, 1024), 8, **blocks))


@pytest.mark.slow
def test_the_step_fails_a_spilling_and_an_oversized_configuration(tmp_path, monkeypatch, capsys):
    """Deliberately invalid configurations, on sm_89: SOWA's window attention in fp32 with the launcher's former
    choice (64 x 64 blocks, 8 warps, 2 stages) spills; in fp16 with 64 x 128 blocks in 3 stages it asks for 176 KB of
    shared memory per block (99 KB allowed) without a spill; a kNN block of 48 rows is no power of two (tl.arange)
    and does not compile. The rows fail with the reason, the CLI exits 1, and so does gpu-check's aot step."""
    bad = [_sowa(torch.float32, block_m=64, block_n=64, num_warps=8, num_stages=2),
           _sowa(torch.float16, block_m=64, block_n=128, num_warps=8, num_stages=3), _knn(block_m=48)]
    rows, meta = aot.run(tmp_path, targets=(89,), sites=bad, jobs=2)
    assert [r["status"] for r in rows] == ["fail", "fail", "fail"]
    assert "register spills" in rows[0]["problems"] and rows[0]["spill_stores"] > 0
    assert rows[1]["problems"] == f"shared memory {rows[1]['smem_per_block']} B per block > sm_89's maximum 101376 B"
    assert rows[1]["spill_stores"] == 0 and rows[1]["smem_per_block"] > 101376
    assert rows[1]["blocks_per_sm"] == 0 and rows[1]["limiter"] == "shared memory"
    assert rows[2]["problems"].startswith("compile error: ") and rows[2]["error"]
    assert meta["summary"]["failed"] == 3 and meta["summary"]["compile_errors"] == 1
    md = next(tmp_path.glob("*-kernels-aot.md")).read_text()
    assert md.count("**fail**") == 3 and "**3 failed**" in md

    monkeypatch.setattr(aot, "call_sites", lambda: bad[2:])  # the cheapest to build
    assert aot.main(["--out", str(tmp_path / "cli"), "--targets", "89", "--jobs", "1"]) == 1
    assert "FAIL knn_graph._knn_topk_kernel" in capsys.readouterr().out

    from zsad.bench import gpu_check as G

    with pytest.raises(SystemExit) as e:
        G.step_aot(tmp_path / "gc", "cpu", targets=(89,), jobs=1)
    assert e.value.code not in (0, None)


@pytest.mark.slow
def test_representative_configurations_compile_clean_and_the_table_reads_them(tmp_path):
    """One launch of each kernel at its paper setting, for all three targets; for one of them the test runs ptxas
    -v itself on Triton's PTX and reads Triton's cubin with cuobjdump, and both agree with the row."""
    sites = [s for s in aot.call_sites() if s.label in {
        "knn_graph.dispatch_graph_from_index(N=1369 D=1024 k=8 r=14 binary max)",  # degree + normalise
        "knn_graph.dispatch_select(N=1369 D=1024 k=8 r=14)",
        "window_attention.dispatch(grid=24 C=1024 heads=8 window=12 fp16)",
        "window_attention.dispatch(grid=24 C=1024 heads=8 window=12 fp32)",
        "dual_attention.dispatch(L=1370 heads=16 hd=64 fp16)",
        "dual_attention.dispatch(L=1370 heads=16 hd=64 fp32)"}]
    assert len(sites) == 6
    rows, meta = aot.run(tmp_path, sites=sites, jobs=2)
    assert len(rows) == 7 * 3 and meta["summary"]["failed"] == 0, [(r["kernel"], r["config"], r["target"],
                                                                   r["problems"]) for r in rows if r["problems"]]
    assert {r["target"] for r in rows} == {"sm_80", "sm_89", "sm_90a"}
    for r in rows:
        assert r["registers"] > 0 and r["spill_stores"] == r["spill_loads"] == 0
        assert 0 < r["occupancy"] <= 1 and r["smem_per_block"] <= r["smem_limit"]

    # the table's files agree with the rows
    with open(next(tmp_path.glob("*-kernels-aot.csv"))) as f:
        table = list(csv.DictReader(f))
    assert [(t["kernel"], t["target"], int(t["registers"])) for t in table] == \
        [(r["kernel"], r["target"], r["registers"]) for r in rows]

    # independent reading of one build: sm_90a, the kNN top-k kernel
    launch = next(la for la in aot.collect([s for s in sites if "select" in s.call], (90,)))
    (built,) = aot.compile_all([dict(aot.compile_inputs(launch, 90), keep_asm=True)])
    row = next(r for r in rows if r["kernel"] == "knn_graph._knn_topk_kernel" and r["target"] == "sm_90a")
    assert built["registers"] == row["registers"] and built["smem_dynamic"] == row["smem_dynamic"]
    assert built["ptxas_log"] == row["ptxas_log"] == "triton"  # the log of Triton's own cubin step was read
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptx = tmp_path / "k.ptx"
    ptx.write_text(built["ptx"])
    log = subprocess.run([str(tools / "ptxas-blackwell"), "-v", "-lineinfo", "--regAllocOptLevel=2",
                          "--gpu-name=sm_90a", str(ptx), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True, check=True).stderr
    assert int(re.search(r"Used (\d+) registers", log).group(1)) == row["registers"]
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    assert (int(stores), int(loads)) == (row["spill_stores"], row["spill_loads"]) == (0, 0)
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(built["cubin"])
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    assert f"REG:{row['registers']} " in usage and "LOCAL:0 " in usage
    # the fallback (a triton without the ptxas-log knob) reads the same numbers
    assert aot.parse_ptxas(aot.run_ptxas(built["ptx"], 90, aot.compile_inputs(launch, 90)["options"])) == {
        k: row[k] for k in ("registers", "smem_static", "stack", "spill_stores", "spill_loads")}


# == the committed table =========================================================================================
def test_committed_table_is_current_and_green(launches):
    """bench/results holds the table of what would be built now: rebuild it (python -m zsad.kernels.aot --out
    bench/results) after changing a kernel, a launcher's choices or the call sites."""
    path = aot.newest_table(RESULTS)
    assert path is not None, "no bench/results/*-kernels-aot.json: run python -m zsad.kernels.aot --out bench/results"
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["fingerprint"] == aot.fingerprint(launches), \
        f"{path.name} is stale: rebuild it with python -m zsad.kernels.aot --out bench/results"
    assert meta["summary"]["failed"] == 0 and all(r["status"] == "ok" for r in rows)
    assert len(rows) == sum(len(la.targets) for la in launches) == meta["summary"]["rows"]
    assert all(r["spill_stores"] == r["spill_loads"] == 0 and r["smem_per_block"] <= r["smem_limit"] for r in rows)
    # each row's occupancy is the formula's on its own figures
    for r in rows:
        arch = next(a for a in aot.TARGETS.values() if a.name == r["target"])
        assert aot.occupancy(arch, r["registers"], r["threads"], r["smem_per_block"]).blocks_per_sm == \
            r["blocks_per_sm"]
    for ext in (".csv", ".md"):
        assert path.with_suffix(ext).is_file()
    md = path.with_suffix(".md").read_text()
    assert f"triton {meta['versions']['triton']}" in md and "ptxas" in md and "**0 failed**" in md
