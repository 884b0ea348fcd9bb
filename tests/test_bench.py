"""zsad-bench on the CPU: files, fields, parity, ordered percentiles, skipped backends with reasons; FLOPs against
a hand count. No assertion on absolute times."""
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import zsad.methods as M
from zsad.backbone import arch_config
from zsad.bench.cli import main as bench_cli
from zsad.bench.flops import method_flops
from zsad.bench.timing import percentiles, time_iterations

REQUIRED = {"model", "profile", "backend", "precision", "batch", "image_size", "device", "status", "reason"}
TIMED = {"p50_ms", "p90_ms", "p99_ms", "p50_ms_per_image", "images_per_s", "achieved_tflops", "gflops_per_image",
         "parity_score_max_rel", "parity_map_max_rel", "parity_rank_agreement", "parity_ok",
         "speedup_vs_torch_fp32_b1"}


def _hand_encoder_flops(cfg, taps_dual_from: int) -> int:
    """2 FLOPs per multiply-add: patch conv, per block qkv/out/MLP linears and the two attention matmuls, plus the
    V-V path (its attention and its own out_proj) in the dual blocks. The last (dual) block's stock stream serves
    only the class token: its qkv for every token, its query, out_proj and MLP for one."""
    v = cfg["vision_cfg"]
    d, layers, p = v["width"], v["layers"], v["patch_size"]
    g = v["image_size"] // p
    n = g * g + 1
    conv = 2 * g * g * 3 * p * p * d
    linear = 2 * n * (3 * d * d + d * d + 2 * 4 * d * d)
    attn = 2 * 2 * n * n * d
    last = 2 * n * 3 * d * d + 2 * (d * d + 2 * 4 * d * d) + 2 * 2 * n * d
    dual_blocks = layers - taps_dual_from + 1
    return (conv + (layers - 1) * (linear + attn) + last + dual_blocks * (attn + 2 * n * d * d)
            + 2 * d * cfg["embed_dim"])


def test_flop_counter_matches_a_hand_count():
    m = M.create("anomalyclip", "tiny")
    flops = method_flops(m)
    expected = _hand_encoder_flops(arch_config("zsad-tiny"), m.config.dual_start)
    assert flops["encoder"] * 1e9 == pytest.approx(expected, rel=1e-9)
    assert flops["total"] == pytest.approx(flops["encoder"] + flops["head"] + flops["postprocess"])


def test_timing_helpers():
    calls = []
    samples = time_iterations(lambda: calls.append(1), iters=5, warmup=2, device="cpu")
    assert len(samples) == 5 and len(calls) == 7 and all(s >= 0 for s in samples)
    p = percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert p["p50_ms"] == 3.0 and p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"]


def test_a_row_keeps_its_samples_in_the_order_they_were_timed():
    """time_batch's row holds every timed call in order (a slow first call stays first), after the warm-up."""
    import time
    from types import SimpleNamespace

    from zsad.bench.one_backend import time_batch

    sleeps = iter([0.0, 0.06, 0.0, 0.03])  # one warm-up call, then three timed ones: 60 ms, ~0, 30 ms
    runner = SimpleNamespace(make_step=lambda images: lambda: time.sleep(next(sleeps)), stage_steps=None,
                             op_profile=None, note="")
    row = time_batch(runner, torch.zeros(2, 3, 8, 8), {"batch": 2}, "cpu", iters=3, warmup=1, gflops=1.0)
    s = row["samples_ms"]
    assert len(s) == 3 and s[0] >= 60.0 and s[2] >= 30.0 and s[1] < s[2]  # sleep never returns early
    assert row["p50_ms"] == pytest.approx(float(np.percentile(s, 50)), abs=2e-3)


def _run(tmp_path, backends, extra=()):
    args = ["--model", "anomalyclip", "--profile", "tiny", "--batch", "1,2", "--backend", backends,
            "--device", "cpu", "--iters", "3", "--warmup", "1", "--out", str(tmp_path), "--no-progress", *extra]
    res = CliRunner().invoke(bench_cli, args)
    assert res.exit_code == 0, res.output
    files = sorted(tmp_path.iterdir())
    stem = files[0].stem
    assert stem.startswith(tuple("0123456789")) and "-anomalyclip-tiny-cpu-torch" in stem
    assert {f.suffix for f in files} == {".json", ".csv", ".md", ".png", ".html"}
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    with open(tmp_path / f"{stem}.csv", newline="") as f:
        rows_csv = list(csv.DictReader(f))
    assert len(rows_csv) == len(data["rows"])
    return data, res.output, (tmp_path / f"{stem}.md").read_text()


def test_a_backend_that_fails_here_is_skipped_with_its_reason(monkeypatch, tiny_method):
    """Timed in this process as in a worker: a runtime refusing the model here (OpenVINO's CPU plugin under a oneDNN
    cap) gives that backend's skipped rows with the reason, not a bench that stops before the other backends."""
    from zsad.bench import backends, one_backend

    class Refusing:
        def predict(self, images):
            raise RuntimeError("Exception from src/x.cpp:1:\nbad combination")

    monkeypatch.setattr(backends, "make_backend_runner", lambda *args, **kwargs: Refusing())
    rows, outputs = one_backend.timed_rows("openvino-fp32", tiny_method("afclip"), None, torch.zeros(2, 3, 224, 224),
                                           {"model": "afclip"}, [1, 2], "cpu", 3, 1, 1.0)
    assert outputs is None
    assert [(r["backend"], r["batch"], r["status"]) for r in rows] == [("openvino-fp32", 1, "skipped"),
                                                                        ("openvino-fp32", 2, "skipped")]
    assert all(r["reason"] == "RuntimeError: Exception from src/x.cpp:1:\nbad combination" for r in rows)


@pytest.mark.slow
def test_bench_torch_and_ort_with_skips(tmp_path, monkeypatch):
    data, output, md = _run(tmp_path, "torch-fp32,ort,torch-fp16,cuda-graphs,tensorrt")
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["onnxruntime"] and env["device_name"].startswith("CPU")
    rows = data["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["backend"], r["batch"]) for r in ok} == {("torch-fp32", 1), ("torch-fp32", 2), ("ort", 1), ("ort", 2)}
    for r in rows:
        assert set(r) >= REQUIRED
    for r in ok:
        assert set(r) >= TIMED, TIMED - set(r)
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        # every timed call is in the JSON, and the percentiles are numpy's of exactly those samples
        assert len(r["samples_ms"]) == r["iters"] == 3
        for q in (50, 90, 99):
            assert r[f"p{q}_ms"] == pytest.approx(float(np.percentile(r["samples_ms"], q)), abs=2e-3)
        assert r["parity_ok"] and r["parity_map_max_rel"] <= 1e-3 and r["parity_rank_agreement"] == 1.0
        assert r["images_per_s"] == pytest.approx(1000 * r["batch"] / r["p50_ms"])
        # GFLOP per image x images per second = FLOP/s; in TFLOP/s
        assert r["achieved_tflops"] == pytest.approx(r["gflops_per_image"] * 1e9 * r["images_per_s"] / 1e12, rel=1e-3)
    base = next(r for r in ok if r["backend"] == "torch-fp32" and r["batch"] == 1)
    assert base["speedup_vs_torch_fp32_b1"] == 1.0 and base["parity_map_max_rel"] == 0.0
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["backend"] for r in skipped} == {"torch-fp16", "cuda-graphs", "tensorrt"}
    if not torch.cuda.is_available():
        assert all("CUDA" in r["reason"] or "GPU" in r["reason"] for r in skipped if r["backend"] != "tensorrt")
    assert all(r["reason"] for r in skipped)
    assert data["gflops_per_image"]["total"] > 0
    assert "AnomalyCLIP" in md and "123.8" in md  # the paper's latency beside ours
    assert "skipped" in output and "torch-fp32" in output
    _assert_replot_redraws(tmp_path, monkeypatch)


def _assert_replot_redraws(tmp_path, monkeypatch):
    """--replot draws the PNG again from the JSON alone, with the papers' figure set aside as not comparable (these
    are tiny-profile CPU rows)."""
    from zsad.bench import report

    (result,) = tmp_path.glob("*.json")
    png, md = result.with_suffix(".png"), result.with_suffix(".md")
    png.unlink()
    md.write_text("stale")
    figures = []

    def keep(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    original = report.plot_figure
    monkeypatch.setattr(report, "plot_figure", keep)
    res = CliRunner().invoke(bench_cli, ["--replot", str(result)])
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 0 and f"wrote {png}" in res.output
    (fig,) = figures
    assert [ln for ln in fig.axes[0].lines if ln.get_gid() == "paper"] == []
    assert "paper latency (123.8 ms, GPU) not comparable: ours is tiny profile" in fig.axes[0].get_title()
    text = md.read_text()  # rewritten from the JSON: the command, the rows, and no claim of comparability
    assert "`zsad-bench" in text and "| torch-fp32 | fp32 | 1 |" in text
    assert "not comparable with the rows above (tiny profile, 224 px, CPU)" in text and "comparable setting" not in text
    res = CliRunner().invoke(bench_cli, ["--replot", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "cannot read bench results" in res.stderr


def test_bench_rejects_bad_arguments(tmp_path):
    res = CliRunner().invoke(bench_cli, ["--backend", "torch-fp64", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown backend" in res.stderr
    res = CliRunner().invoke(bench_cli, ["--batch", "0", "--profile", "tiny", "--backend", "torch-fp32",
                                         "--out", str(tmp_path)])
    assert res.exit_code == 2 and "positive" in res.stderr
    res = CliRunner().invoke(bench_cli, ["--served-precision", "bf16", "--profile", "tiny", "--backend", "served",
                                         "--out", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert "--served-precision bf16 needs --served-backend python-openvino" in res.stderr
    res = CliRunner().invoke(bench_cli, ["--served-hint", "throughput", "--profile", "tiny", "--backend", "served",
                                         "--out", str(tmp_path)])
    assert res.exit_code == 2 and "needs --served-backend python-openvino" in res.stderr
    res = CliRunner().invoke(bench_cli, ["--served-precision", "auto", "--served-url", "127.0.0.1:1", "--profile",
                                         "tiny", "--backend", "served", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "give the precision that server runs" in res.stderr
    assert not any(tmp_path.iterdir())


def _result_file(path, machine, size, rows):
    """A result file as zsad-bench writes it (schema zsad-bench/1), with hand-set rows."""
    env = {"device": "cpu", "device_name": machine, "date": "2026-12-06"}
    full = [{"model": "bagclip", "image_size": size, "precision": "int8-bf16", "status": "ok", **r} for r in rows]
    path.write_text(json.dumps({"schema": "zsad-bench/1", "model": "bagclip", "profile": "paper", "command": "x",
                                "environment": env, "gflops_per_image": {}, "rows": full, "paper": []}))
    return path


def test_curves_from_hand_made_results(tmp_path):
    """--curves: the batch panel takes every timed row, the size panel the batch-1 rows of a backend timed at two
    sizes (not one timed at one), the served panel the sweeps; skipped rows nowhere; other machines refused."""
    a = _result_file(tmp_path / "a.json", "cpu X", 518, [
        {"backend": "openvino-int8-bf16", "batch": 1, "p50_ms_per_image": 1200.0, "images_per_s": 0.83},
        {"backend": "openvino-int8-bf16", "batch": 4, "p50_ms_per_image": 1100.0, "images_per_s": 0.91},
        {"backend": "torch-bf16", "batch": 1, "p50_ms_per_image": 2000.0, "images_per_s": 0.5},
        {"backend": "torch-fp32", "batch": 1, "status": "skipped", "reason": "no"},
        {"backend": "served", "batch": 1, "concurrency": 2, "dynamic_batching": True, "ov_hint": "throughput",
         "images_per_s": 0.97, "p50_ms": 2050.0}])
    b = _result_file(tmp_path / "b.json", "cpu X", 336, [
        {"backend": "openvino-int8-bf16", "batch": 1, "p50_ms_per_image": 450.0, "images_per_s": 2.2}])
    res = CliRunner().invoke(bench_cli, ["--curves", str(a), "--curves", str(b), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = json.loads(next((tmp_path / "out").glob("*-curves-bagclip.json")).read_text())
    by_panel = {}
    for p in out["points"]:
        by_panel.setdefault(p["panel"], []).append(p)
    assert sorted((p["image_size"], p["backend"], p["batch"]) for p in by_panel["batch"]) == [
        (336, "openvino-int8-bf16", 1), (518, "openvino-int8-bf16", 1), (518, "openvino-int8-bf16", 4),
        (518, "torch-bf16", 1)]
    assert sorted((p["backend"], p["image_size"], p["p50_ms_per_image"]) for p in by_panel["size"]) == [
        ("openvino-int8-bf16", 336, 450.0), ("openvino-int8-bf16", 518, 1200.0)]
    assert [(p["concurrency"], p["images_per_s"], p["ov_hint"]) for p in by_panel["served"]] == [
        (2, 0.97, "throughput")]
    md = next((tmp_path / "out").glob("*.md")).read_text()
    assert "| bagclip | openvino-int8-bf16 | 336 | 450.0 |" in md and "cpu X" in md
    assert {f.suffix for f in (tmp_path / "out").iterdir()} == {".json", ".csv", ".md", ".png"}
    c = _result_file(tmp_path / "c.json", "cpu Y", 518, [])
    res = CliRunner().invoke(bench_cli, ["--curves", str(a), "--curves", str(c), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "one machine" in res.stderr and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_cpu_backends_share_one_onnx_export(monkeypatch):
    """ort, ort-int8 and openvino-fp32 in one run export each stage to ONNX once (each backend opens its own Scratch
    on the run's folder, as its worker process would: shared through files), and each backend still matches torch
    fp32. In this process (isolate=False), so the export counter sees every call."""
    pytest.importorskip("openvino")
    from zsad.bench.model_bench import bench_model

    exported = []
    export = torch.onnx.export

    def counting_export(*args, **kwargs):
        exported.append(tuple(kwargs["output_names"]))
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting_export)
    method, _, rows = bench_model("anomalyclip", "tiny", None, [1], ["ort", "ort-int8", "openvino-fp32"], "cpu",
                                  iters=1, warmup=0, checkpoint=None, served_url=None, concurrency=[1],
                                  served_seconds=1.0, progress=False, log=lambda *a: None, isolate=False)
    assert sorted(exported) == sorted(tuple(st.outputs) for st in method.stages())
    assert [(r["backend"], r["precision"], r["status"]) for r in rows] == [
        ("ort", "fp32", "ok"), ("ort-int8", "int8", "ok"), ("openvino-fp32", "fp32", "ok")], rows
    # int8's parity on the tiny model is test_openvino's subject; fp32 must match torch here
    assert all(r["parity_ok"] and r["parity_map_max_rel"] <= 1e-3 for r in rows if r["precision"] == "fp32")


@pytest.mark.server
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_bench_served_sweep(tmp_path, precision):
    """The server this file starts: the stages served by OpenVINO (python-openvino), swept with and without
    dynamic batching; fp32's served outputs match torch fp32; auto's rows name the precision the export kept, one
    that zsad.cpu proposes for this CPU, and pass that precision's parity."""
    pytest.importorskip("openvino")
    from zsad.cpu import precision_preference, read_cpu

    proposed = [p for p, _ in precision_preference(read_cpu(measure=False).flags)]
    if precision == "fp32" and proposed == ["fp32"]:
        pytest.skip("auto proposes fp32 alone on this CPU: the 'auto' run is this one")
    data, _, md = _run(tmp_path, "served", ["--concurrency", "1,2", "--served-seconds", "2",
                                            "--served-backend", "python-openvino", "--served-precision", precision])
    served = [r for r in data["rows"] if r["backend"] == "served"]
    kept = {r["precision"] for r in served}
    if precision == "fp32":
        assert kept == {"fp32"}, served
    else:
        assert len(kept) == 1 and kept <= set(proposed), served
    if kept == {"fp32"}:
        assert all(r["parity_map_max_rel"] <= 1e-3 for r in served), served
    assert {(r["concurrency"], r["dynamic_batching"]) for r in served} == {(1, True), (2, True), (1, False),
                                                                          (2, False)}
    for r in served:
        assert r["status"] == "ok" and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
        assert r["parity_ok"] and r["note"].startswith("0 errors")
    assert "dyn. batching" in md and "no batching" in md


# every method outside the AnomalyCLIP family (the tests above bench anomalyclip, whose stage chain bagclip shares)
@pytest.mark.slow
@pytest.mark.parametrize("model", [n for n in M.available()
                                   if not issubclass(M.METHODS[n], M.METHODS["anomalyclip"])])
def test_bench_takes_every_method(model):
    """Each method through torch and ONNX Runtime: rows complete, parity within tolerance, FLOPs per stage. In this
    process (isolate=False: the subject is the methods, and two workers per method would cost ~10 s each here)."""
    from zsad.bench.model_bench import bench_model

    _, flops, rows = bench_model(model, "tiny", None, [1], ["torch-fp32", "ort"], "cpu", iters=2, warmup=1,
                                 checkpoint=None, served_url=None, concurrency=[1], served_seconds=1.0,
                                 progress=False, log=lambda *a: None, isolate=False)
    assert {r["backend"] for r in rows} == {"torch-fp32", "ort"} and all(r["status"] == "ok" for r in rows)
    assert all(r["parity_ok"] and r["parity_map_max_rel"] <= 1e-3 for r in rows)
    stages = {st.name for st in M.create(model, "tiny").stages()}
    assert set(flops) == stages | {"total"} and flops["total"] > 0


@pytest.mark.parametrize("model", M.available())
def test_every_chain_is_free_of_capture_hazards(tiny_method, model):
    """No method's stage chain synchronises with the host or makes tensors without a device: what would break its
    capture as one CUDA graph (the cuda-graphs* backends), checked on the CPU."""
    from zsad.bench.backends import capture_hazards

    m = tiny_method(model)
    assert capture_hazards(m, torch.randn(2, 3, m.image_size, m.image_size)) == []


def test_capture_hazards_finds_host_syncs_and_deviceless_tensors(tiny_method, monkeypatch):
    """The check itself: a chain that reads a value on the host, indexes by a mask, or adds a tensor made without
    a device is reported, each with its own reason."""
    import dataclasses

    from zsad.bench.backends import capture_hazards

    m = tiny_method("anomalyclip")
    stages = m.stages()
    post = stages[-1]

    class Hazard(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def forward(self, *xs):
            score, amap = post.module(*xs)
            if self.kind == "item" and score.sum() > -1e9:  # `if tensor:` reads the value on the host
                score = score + 0
            if self.kind == "mask":
                score = score + amap[amap > 0].sum() * 0
            if self.kind == "deviceless":
                score = score + torch.zeros(score.shape[0])
            return score, amap

    x = torch.randn(1, 3, m.image_size, m.image_size)
    found = {}
    for kind in ("item", "mask", "deviceless"):
        monkeypatch.setattr(m, "stages",
                            lambda kind=kind: stages[:-1] + [dataclasses.replace(post, module=Hazard(kind))])
        found[kind] = capture_hazards(m, x)
    assert len(found["item"]) == 1 and ".item()" in found["item"][0]
    assert any("boolean-mask indexing" in f for f in found["mask"])
    assert len(found["deviceless"]) == 1 and "without an explicit device" in found["deviceless"][0]


def test_paper_latency_line_only_beside_comparable_rows():
    pytest.importorskip("matplotlib")
    from zsad.bench.report import plot_figure

    paper = [{"quantity": "latency_ms", "component": None, "method": "BAG-CLIP", "value": 121.6},
             {"quantity": "latency_ms", "component": "GCN", "method": "BAG-CLIP", "value": 9.0}]

    def row(profile, size, device):
        return {"backend": "torch-fp32", "status": "ok", "batch": 1, "p50_ms_per_image": 5.0, "profile": profile,
                "image_size": size, "device": device}

    def paper_lines(fig):
        return [ln for ln in fig.axes[0].lines if ln.get_gid() == "paper"]

    same = plot_figure("bagclip", [row("paper", 518, "cuda")], paper, paper_image_size=518)
    assert [ln.get_ydata()[0] for ln in paper_lines(same)] == [121.6]  # the whole-model figure, not the component
    assert "not comparable" not in same.axes[0].get_title()
    for rows, why in (([row("tiny", 224, "cpu")], "tiny profile, 224 px, CPU"),
                      ([row("paper", 518, "cpu")], "CPU"),
                      ([row("paper", 336, "cuda")], "336 px")):
        fig = plot_figure("bagclip", rows, paper, paper_image_size=518)
        assert paper_lines(fig) == []
        assert fig.axes[0].get_title().endswith(f"paper latency (121.6 ms, GPU) not comparable: ours is {why}")


def test_a_second_run_the_same_day_keeps_the_first_runs_files(tmp_path):
    from zsad.bench.report import environment, write_results

    env = environment("cpu")
    rows = [{"model": "afclip", "profile": "tiny", "backend": "torch-fp32", "precision": "-", "batch": 1,
             "status": "skipped", "reason": "run 1"}]
    first = write_results(tmp_path, "afclip", "tiny", rows, env, [], {"total": 1.0}, "zsad-bench (run 1)")
    before = {p: p.read_bytes() for p in first.values()}
    second = write_results(tmp_path, "afclip", "tiny", [{**rows[0], "reason": "run 2"}], env, [], {"total": 1.0},
                           "zsad-bench (run 2)")
    assert {p: p.read_bytes() for p in first.values()} == before  # untouched
    assert second["json"].name == first["json"].name.replace(".json", "-2.json")
    assert "run 2" in second["md"].read_text() and "run 1" not in second["md"].read_text()


@pytest.mark.slow
def test_bench_parity_takes_near_tie_selections_and_refuses_others(trained_run):
    """zsad-bench's parity columns on a trained BAG-CLIP: a backend whose kNN selection breaks a near-tie the
    other way (its outputs computed on that selection) passes, with the differing selection counted; one that
    swaps in a far neighbour fails, however close its map happens to be."""
    from zsad.bench.model_bench import reference_outputs
    from zsad.bench.one_backend import build_method
    from zsad.methods import run_stages

    method, _ = build_method("bagclip", "tiny", None, str(trained_run("bagclip")))
    ref = reference_outputs(method)
    env, k = ref.env, method.config.graph.knn_k
    spec = next(st for st in ref.stages if st.name == "graph").selections["knn_index"]
    scores = spec.raw_scores(env["fused"])
    n = scores.shape[1]
    scores[:, np.arange(n), np.arange(n)] = -np.inf
    rounded = np.round(scores * 2.0 ** spec.resolution_bits) / 2.0 ** spec.resolution_bits
    order = np.argsort(-rounded, axis=-1, kind="stable")  # the rule: rounded similarity, then the lower index
    gaps = np.take_along_axis(scores, order[..., k - 1:k], -1) - np.take_along_axis(scores, order[..., k:k + 1], -1)
    b, row = np.unravel_index(np.argmin(gaps[..., 0]), gaps.shape[:2])
    assert gaps[b, row, 0] < 1e-4  # the trained features have near-ties (the point of training first)

    def outputs(knn):
        rest = [st for st in ref.stages if st.name in ("head", "postprocess")]
        feed = {k_: torch.from_numpy(env[k_]) for k_ in ("global_embedding", "taps", "fused")}
        with torch.no_grad():
            out = run_stages(rest, **feed, knn_index=torch.from_numpy(knn))
        return {"score": out["score"].numpy(), "anomaly_map": out["anomaly_map"].numpy(), "knn_index": knn}

    near = env["knn_index"].copy()
    near[b, row] = np.sort(np.r_[order[b, row, :k - 1], order[b, row, k]])  # the (k+1)-th for the k-th
    p = ref.parity(outputs(near), "fp32")
    assert p["parity_ok"] and p["parity_selection_differing"] == 1 and p["parity_selection_max_gap"] < 1e-4
    far = env["knn_index"].copy()
    far[b, row] = np.sort(np.r_[order[b, row, :k - 1], order[b, row, -2]])  # the least similar other patch
    p = ref.parity(outputs(far), "fp32")
    assert not p["parity_ok"] and p["parity_selection_differing"] == 1
    assert ref.parity(outputs(env["knn_index"].copy()), "fp32")["parity_selection_differing"] == 0


def test_only_what_zsad_registers_is_timed_in_a_worker(monkeypatch):
    """A spawned worker imports zsad alone: a method or backend registered by the caller's own code is timed
    in-process (else the worker cannot find it and the rows come back skipped)."""
    from zsad.bench.model_bench import _rebuilt_by_a_worker
    from zsad.methods import METHODS

    assert _rebuilt_by_a_worker("anomalyclip", "ort") and _rebuilt_by_a_worker("bagclip", "torch-fp32")
    plugin = type("PluginMethod", (METHODS["anomalyclip"],), {"__module__": "my_plugin"})
    monkeypatch.setitem(METHODS, "plugin-method", plugin)
    assert not _rebuilt_by_a_worker("plugin-method", "ort")
