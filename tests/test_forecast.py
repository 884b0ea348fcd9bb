"""The roofline forecast (zsad-bench --forecast): the byte model and the bound against hand counts, the peak table
against NVIDIA's datasheet figures written out here, the goals' verdicts, measured / forecast on a crafted GPU
result (fake data made in this test only), and one-line errors. Nothing here is a GPU measurement."""
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from zsad import ZsadError
from zsad.bench.cli import main as bench_cli
from zsad.bench.flops import stage_count
from zsad.bench.forecast import (
    GPUS,
    ceiling_rows,
    chain_rows,
    goal_rows,
    gpu_for_device,
    parse_gpus,
    roofline,
    stage_bytes,
    stage_rows,
)
from zsad.methods.stages import Stage
from zsad.reference import GOAL_BAG_B1_MS, GOAL_BAG_IMG_S


class _Gemm(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(k, n))

    def forward(self, x):
        return x @ self.w


def _gemm_stage(m: int, n: int, k: int) -> Stage:
    """One GEMM per image: x [B, M, K] @ W [K, N] -> y [B, M, N]."""
    return Stage("gemm", _Gemm(k, n), {"x": ("B", m, k)}, {"y": ("B", m, n)})


@pytest.mark.parametrize("m,n,k", [(4096, 4096, 4096), (1, 4096, 4096)])
def test_one_gemm_at_fp16_on_an_h100_by_hand(m, n, k):
    """FLOPs = 2MNK, bytes = 2(MK + KN + MN) at fp16, bound = max(FLOPs / 989.5e12, bytes / 3.35e12) s."""
    c = stage_count(_gemm_stage(m, n, k), batch=1)
    flops, nbytes = 2 * m * n * k, 2 * (m * k + k * n + m * n)
    assert c.flops == flops
    assert stage_bytes(c, "fp16") == (nbytes, nbytes)  # no score intermediate: fused == unfused
    r = roofline(c.flops, nbytes, GPUS["h100"], "fp16")
    t_c, t_m = flops / 989.5e12 * 1e3, nbytes / 3.35e12 * 1e3
    assert r["t_compute_ms"] == pytest.approx(t_c, rel=1e-12) and r["t_memory_ms"] == pytest.approx(t_m, rel=1e-12)
    assert r["bound_ms"] == pytest.approx(max(t_c, t_m), rel=1e-12)
    if m == 4096:  # 137.4 GFLOP in 0.1389 ms vs 100.7 MB in 0.0300 ms: compute-bound
        assert r["limit"] == "compute" and r["bound_ms"] == pytest.approx(0.13890, abs=1e-5)
    else:  # a GEMV: 33.6 MFLOP vs 33.6 MB moved: memory-bound, 0.01002 ms
        assert r["limit"] == "memory" and r["bound_ms"] == pytest.approx(0.010022, abs=1e-6)


@pytest.mark.parametrize("m,n,k", [(64, 512, 256), (64, 8, 8)])  # per image: compute-bound, memory-bound
def test_chain_and_ceiling_of_one_gemm_by_hand(m, n, k):
    """Batch 2 of the GEMM stage on an A100 at fp32: W read once, x and y per image; the ceiling is per image,
    max(2MNK / peak, 4(MK + MN) / bandwidth), with W amortised away."""
    st = _gemm_stage(m, n, k)
    counts = {b: [stage_count(st, b)] for b in (1, 2)}
    rows = stage_rows("toy", counts, ["a100"], [2])
    assert len(rows) == 5  # one per precision
    fp32 = next(r for r in rows if r["precision"] == "fp32")
    flops, nbytes = 2 * 2 * m * n * k, 4 * (2 * m * k + k * n + 2 * m * n)
    assert fp32["flops"] == flops and fp32["bytes_fused"] == nbytes
    bound = max(flops / 19.5e12, nbytes / 2039e9) * 1e3
    chain = next(c for c in chain_rows(rows) if c["precision"] == "fp32")
    assert chain["bound_ms"] == pytest.approx(bound) and chain["images_per_s"] == pytest.approx(2e3 / bound)
    ceil = next(c for c in ceiling_rows("toy", counts, ["a100"]) if c["precision"] == "fp32")
    per_image = max(2 * m * n * k / 19.5e12, 4 * (m * k + m * n) / 2039e9) * 1e3
    assert ceil["ms_per_image"] == pytest.approx(per_image) and ceil["images_per_s"] == pytest.approx(1e3 / per_image)
    assert ceil["images_per_s"] >= chain["images_per_s"]


class _Tiny(nn.Module):
    """Hand-countable: an embedding gather, a linear, one SDPA call, an explicit similarity into a top-k."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(100, 8)  # 800 elements; 5 rows of 8 gathered per image
        self.proj = nn.Linear(8, 8)  # 64 + 8

    def forward(self, ids, x):
        e = self.table(ids)  # [B, 5, 8]
        q = self.proj(x)[:, None]  # [B, 1, 6, 8]
        att = F.scaled_dot_product_attention(q, q, q)[:, 0]  # scores [B, 1, 6, 6] inside the fused op
        sim = x @ x.transpose(1, 2)  # [B, 6, 6], written by bmm, read once by topk
        return att + e.sum(1, keepdim=True), sim.topk(2, dim=-1).indices


def test_byte_model_on_a_hand_countable_stage():
    st = Stage("tiny", _Tiny(), {"ids": ("B", 5), "x": ("B", 6, 8)}, {"y": ("B", 6, 8), "idx": ("B", 6, 2)},
               dtypes={"ids": torch.int64, "idx": torch.int64}, index_bounds={"ids": 100})
    c = stage_count(st, batch=1)
    assert c.flops == 2 * 6 * 8 * 8 + 2 * (2 * 6 * 6 * 8) + 2 * 6 * 6 * 8  # linear, SDPA (QK^T, PV), similarity
    assert c.weight_elems == 5 * 8 + 64 + 8  # gathered rows, not the 800-element table
    assert (c.io_elems, c.io_bytes) == (6 * 8 + 6 * 8, 5 * 8 + 6 * 2 * 8)  # x, y floats; ids, idx int64
    assert c.score_elems == 4 * 36 + 2 * 36  # SDPA scores 4 passes; similarity 1 write + 1 read
    assert c.score_bytes == 0
    # fp16: weights 112 x 2, activations 96 x 2 + 136 int64 bytes; unfused + 216 x 2
    assert stage_bytes(c, "fp16") == (224 + 192 + 136, 224 + 192 + 136 + 432)
    # int8: weights 1 byte, activations and scores stay 2 bytes
    assert stage_bytes(c, "int8") == (112 + 192 + 136, 112 + 192 + 136 + 432)
    assert stage_bytes(c, "fp32") == (448 + 384 + 136, 448 + 384 + 136 + 864)
    assert stage_bytes(c, "tf32") == stage_bytes(c, "fp32") and stage_bytes(c, "bf16") == stage_bytes(c, "fp16")
    c2 = stage_count(st, batch=2)
    assert c2.weight_elems == 2 * 5 * 8 + 72 and c2.score_elems == 2 * c.score_elems


def test_peak_table_matches_the_datasheets():
    """Figures as NVIDIA prints them ('*' = with sparsity, dense is half), bandwidth in GB/s."""
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP32 67 TF; TF32 989*; BF16/FP16 1,979*; INT8 3,958*;
    # 3.35 TB/s. H100 PCIe column: FP32 51; TF32 756*; BF16/FP16 1,513*; INT8 3,026*; 2 TB/s.
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: as H100 SXM's compute; 4.8 TB/s.
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM: FP32 19.5; TF32 156 | 312*; BF16/FP16 312 | 624*;
    # INT8 624 | 1,248*; 2,039 GB/s.
    # NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3; TF32 120*; FP16/BF16 242*; INT8 485*; 300 GB/s.
    # NVIDIA Ampere GA102 whitepaper v2.0, RTX 3090: FP32 35.6; TF32 35.6/71; FP16 (FP32 acc.) 71/142; INT8 284/568;
    # 936 GB/s.
    printed = {"h100": (67, 989, 1979, 3958, True, 3350), "h100-pcie": (51, 756, 1513, 3026, True, 2000),
               "h200": (67, 989, 1979, 3958, True, 4800), "a100": (19.5, 156, 312, 624, False, 2039),
               "l4": (30.3, 120, 242, 485, True, 300), "rtx3090": (35.6, 35.6, 71, 284, False, 936)}
    assert set(GPUS) == set(printed)
    for key, (fp32, tf32, fp16, int8, sparse, bw) in printed.items():
        half = 2 if sparse else 1
        assert GPUS[key].peak_tflops == {"fp32": fp32, "tf32": tf32 / half, "fp16": fp16 / half,
                                         "bf16": fp16 / half, "int8": int8 / half}, key
        assert GPUS[key].bandwidth_gbs == bw, key
        assert GPUS[key].source and GPUS[key].printed
    assert GPUS["h100"].ridge("fp16") == pytest.approx(989.5e12 / 3.35e12)


def test_device_names_map_to_the_table_or_to_nothing():
    names = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H100 NVL": None,
             "NVIDIA H200": "h200", "NVIDIA H200 NVL": None, "NVIDIA A100-SXM4-80GB": "a100",
             "NVIDIA A100-SXM4-40GB": None, "NVIDIA A100 80GB PCIe": None, "NVIDIA L4": "l4", "NVIDIA L40S": None,
             "single NVIDIA RTX 3090 (all experiments, sec. 4.1)": "rtx3090", "NVIDIA GeForce RTX 3090 Ti": None,
             "single NVIDIA GeForce RTX 3070 8GB": None}
    assert {n: gpu_for_device(n) for n in names} == names


def test_gpu_list_errors_name_the_known_gpus():
    assert parse_gpus("H100, l4,h100") == ["h100", "l4"]
    with pytest.raises(ZsadError, match=r"unknown GPU 'v100' for --forecast; known: h100, h100-pcie, h200, a100, l4"):
        parse_gpus("h100,v100")
    r = CliRunner().invoke(bench_cli, ["--forecast", "h100,b200", "--model", "bagclip"])
    assert r.exit_code == 2 and "unknown GPU 'b200'" in r.output and "known: h100" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(bench_cli, ["--forecast", "h100", "--model", "bagclip,nope"])
    assert r.exit_code == 2 and "unknown method(s) ['nope']" in r.output
    r = CliRunner().invoke(bench_cli, ["--measured", "x.json"])
    assert r.exit_code == 2 and "--measured needs --forecast" in r.output


def test_goal_verdicts():
    """A bound above the latency goal rules it out; a ceiling below the throughput goal rules that out; otherwise
    the fraction of the roofline needed."""
    chains = [{"model": "bagclip", "gpu": "h100", "precision": "fp16", "batch": 1, "bound_ms": GOAL_BAG_B1_MS / 2,
               "images_per_s": 1e3 / (GOAL_BAG_B1_MS / 2)},
              {"model": "bagclip", "gpu": "h100", "precision": "fp16", "batch": 8, "bound_ms": 8e3 / GOAL_BAG_IMG_S / 2,
               "images_per_s": 2 * GOAL_BAG_IMG_S},
              {"model": "bagclip", "gpu": "l4", "precision": "fp16", "batch": 1, "bound_ms": GOAL_BAG_B1_MS * 1.25,
               "images_per_s": 1e3 / (GOAL_BAG_B1_MS * 1.25)}]
    ceilings = [{"model": "bagclip", "gpu": "h100", "precision": "fp16", "images_per_s": 2.2 * GOAL_BAG_IMG_S},
                {"model": "bagclip", "gpu": "l4", "precision": "fp16", "images_per_s": 0.9 * GOAL_BAG_IMG_S}]
    goals = {(g["goal"], g["gpu"]): g for g in goal_rows(chains, ceilings)}
    h100 = goals[("bagclip batch-1 p50 ms", "h100")]
    assert h100["verdict"] == "not ruled out" and h100["roofline_fraction_needed"] == pytest.approx(0.5)
    assert goals[("bagclip batch-1 p50 ms", "l4")]["verdict"] == "ruled out"
    tput = goals[("bagclip images/s", "h100")]
    assert tput["verdict"] == "not ruled out" and tput["best_batch"] == 8
    assert tput["roofline_fraction_needed"] == pytest.approx(0.5)
    assert goals[("bagclip images/s", "l4")]["verdict"] == "ruled out"


def _crafted_gpu_result(forecast_json: dict, device_name: str = "NVIDIA H100 80GB HBM3") -> dict:
    """A FAKE zsad-bench GPU result, made here from the forecast itself: stage times at 2x and 0.5x the bound, so
    that the comparison's ratios are known. Test data only; never a result file."""
    st = {(r["stage"], r["precision"]): r["bound_ms"] for r in forecast_json["stages"]
          if r["gpu"] == "h100" and r["batch"] == 2}
    chain = {c["precision"]: c["bound_ms"] for c in forecast_json["chains"] if c["gpu"] == "h100"
             and c["batch"] == 2}
    size = forecast_json["methods"]["bagclip"]["image_size"]
    base = {"model": "bagclip", "profile": "tiny", "image_size": size, "device": "cuda", "batch": 2, "status": "ok"}
    rows = [{**base, "backend": "ort", "precision": "fp16", "p50_ms": 3 * chain["fp16"],
             "stage_ms": {"encoder": 2 * st[("encoder", "fp16")], "graph": 0.5 * st[("graph", "fp16")],
                          "not_a_stage": 1.0}},
            {**base, "backend": "openvino-int8-bf16", "precision": "int8-bf16", "p50_ms": 4 * chain["int8"]},
            {**base, "backend": "torch-compile", "precision": "-", "p50_ms": 1.0},
            {**base, "backend": "served", "precision": "fp32", "p50_ms": 1.0}]
    return {"schema": "zsad-bench/1", "model": "bagclip", "profile": "tiny", "command": "crafted in a test",
            "environment": {"device": "cuda", "device_name": device_name}, "rows": rows, "paper": []}


@pytest.mark.slow
def test_forecast_files_and_measured_over_forecast(tmp_path):
    out = tmp_path / "out"
    args = ["--forecast", "h100,l4", "--model", "bagclip", "--profile", "tiny", "--batch", "1,2", "--out", str(out)]
    r = CliRunner().invoke(bench_cli, args)
    assert r.exit_code == 0, r.output
    first = json.loads(next(out.glob("*-forecast-tiny-bagclip.json")).read_text())
    assert first["label"] == "forecast, not measured" and first["measured"] == []
    assert first["goals"] == []  # the goals are paper-profile figures: not judged on the tiny profile
    assert {p.suffix for p in out.iterdir()} == {".json", ".md", ".png"}
    for c in first["chains"]:  # the chain is its stages, summed
        parts = [s["bound_ms"] for s in first["stages"]
                 if (s["gpu"], s["precision"], s["batch"]) == (c["gpu"], c["precision"], c["batch"])]
        assert len(parts) == 4 and c["bound_ms"] == pytest.approx(sum(parts), rel=1e-5)  # JSON: 6 digits
        ceil = next(x for x in first["ceilings"] if (x["gpu"], x["precision"]) == (c["gpu"], c["precision"]))
        assert c["images_per_s"] <= ceil["images_per_s"] * (1 + 1e-5)
    result = tmp_path / "gpu-run.json"
    result.write_text(json.dumps(_crafted_gpu_result(first)))
    r = CliRunner().invoke(bench_cli, args[:-4] + ["--batch", "1", "--out", str(out), "--measured", str(result)])
    assert r.exit_code == 0, r.output
    second = json.loads(next(out.glob("*-forecast-tiny-bagclip-2.json")).read_text())  # numbered, first kept
    got = {(m["backend"], m["stage"]): m for m in second["measured"]}
    assert set(got) == {("ort", "encoder"), ("ort", "graph"), ("ort", "chain (p50)"),
                        ("openvino-int8-bf16", "chain (p50)")}
    assert got[("ort", "encoder")]["ratio"] == pytest.approx(2, rel=1e-5) and not got[("ort", "encoder")]["below_bound"]
    assert got[("ort", "graph")]["ratio"] == pytest.approx(0.5, rel=1e-5) and got[("ort", "graph")]["below_bound"]
    assert got[("ort", "chain (p50)")]["ratio"] == pytest.approx(3, rel=1e-5)
    assert got[("openvino-int8-bf16", "chain (p50)")]["forecast_precision"] == "int8"
    assert got[("openvino-int8-bf16", "chain (p50)")]["ratio"] == pytest.approx(4, rel=1e-5)
    assert 2 in second["batches"] or any(s["batch"] == 2 for s in second["stages"])  # the run's batch was added
    md = next(out.glob("*-forecast-tiny-bagclip-2.md")).read_text()
    assert "FORECAST, NOT MEASURED" in md and "| 0.50 **below the bound** |" in md and "| 2.00 |" in md


@pytest.mark.parametrize("env,match", [({"device": "cpu", "device_name": "CPU"}, "is a cpu run"),
                                       ({"device": "cuda", "device_name": "NVIDIA GeForce GTX 1080"},
                                        "not in the peak table")])
def test_measured_results_that_cannot_be_compared_are_refused(tmp_path, env, match):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"schema": "zsad-bench/1", "model": "bagclip", "profile": "tiny", "environment": env,
                               "rows": []}))
    r = CliRunner().invoke(bench_cli, ["--forecast", "h100", "--model", "bagclip", "--profile", "tiny",
                                       "--measured", str(bad), "--out", str(tmp_path)])
    assert r.exit_code == 2 and match in r.output and len(r.output.strip().splitlines()) == 1
    bad.write_text("{}")
    r = CliRunner().invoke(bench_cli, ["--forecast", "h100", "--model", "bagclip", "--measured", str(bad)])
    assert r.exit_code == 2 and "not a zsad-bench result file" in r.output


@pytest.mark.slow
def test_paper_bagclip_encoder_reads_the_vit_l_visual_tower_once():
    """Paper profile: the encoder's weights are ViT-L/14's visual tower counted by hand, once (the dual stream
    shares them), and its unfused scores are 16 heads x 1370^2 x 4 passes per attention call (24 stock + the dual
    blocks' V-V calls), but the last block's stock call, which serves the class token alone: 16 x 1 x 1370 x 4."""
    import zsad.methods as M

    m = M.create("bagclip", "paper", backbone={"pretrained": None})
    enc = next(st for st in m.stages() if st.name == "encoder")
    c = stage_count(enc, batch=1)
    d, layers, p, g, embed = 1024, 24, 14, 37, 768
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    visual = 3 * p * p * d + d + (g * g + 1) * d + 2 * d + layers * block + 2 * d + d * embed
    assert visual == 305_105_920
    assert c.weight_elems == visual
    calls = layers + (layers - m.config.dual_start + 1)
    assert c.score_elems == (calls - 1) * 16 * (g * g + 1) ** 2 * 4 + 16 * 1 * (g * g + 1) * 4
    assert (c.io_elems, c.io_bytes) == (3 * 518 * 518 + embed + 4 * g * g * d, 0)


def test_committed_paper_forecast_is_labelled_and_uses_the_current_tables():
    """bench/results holds one paper-profile forecast: every row says it is a forecast, and its peaks, byte sizes and
    goals are the ones the code has now (rerun the command in its header after changing them)."""
    from pathlib import Path

    from zsad.bench.forecast import ACT_BYTES, LABEL, WEIGHT_BYTES

    found = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob("*-forecast-paper-all.json"))
    assert found, "no committed paper forecast in bench/results"
    data = json.loads(found[-1].read_text())
    assert data["label"] == LABEL and data["command"].startswith("zsad-bench --forecast ")
    assert all(r["label"] == LABEL for key in ("stages", "chains", "ceilings", "goals") for r in data[key])
    assert data["measured"] == []  # no GPU run has landed: nothing measured is in it
    assert {k: (v["bandwidth_gbs"], v["peak_tflops"]) for k, v in data["peaks"].items()} == {
        k: (g.bandwidth_gbs, g.peak_tflops) for k, g in GPUS.items()}
    assert data["byte_model"]["weight_bytes"] == WEIGHT_BYTES and data["byte_model"]["activation_bytes"] == ACT_BYTES
    targets = {g["goal"]: g["target"] for g in data["goals"]}
    assert targets["bagclip batch-1 p50 ms"] == f"<= {GOAL_BAG_B1_MS:g}"
    assert targets["bagclip images/s"] == f">= {GOAL_BAG_IMG_S:g}"
