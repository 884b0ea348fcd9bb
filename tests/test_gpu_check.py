"""bench/gpu_check.py on the CPU: the orchestrator (caps, statuses, summary written after every step), the goals
judged from hand-made rows, and the kernels' rebuild when TRITON_INTERPRET changes. The whole CPU run
(`make gpu-check DEVICE=cpu`) is CI's job, not this file's (minutes)."""
import json
from functools import partial

import pytest

from zsad.bench import gpu_check as G


def _row(backend, batch, p50, model="bagclip", parity=True, device="cuda", profile="paper"):
    return {"model": model, "backend": backend, "batch": batch, "p50_ms": p50, "images_per_s": 1000.0 * batch / p50,
            "status": "ok", "parity_ok": parity, "device": device, "profile": profile, "precision": "fp16"}


def test_goals_from_rows_by_hand():
    rows = [_row("torch-fp32", 1, 100.0), _row("cuda-graphs-fp16", 1, 3.5), _row("cuda-graphs-fp16", 32, 64.0),
            _row("torch-fp16", 1, 1.0, parity=False),  # fast but wrong: must not count
            _row("torch-fp32", 1, 300.0, model="bayespfl"), _row("cuda-graphs-bf16", 1, 12.0, model="bayespfl")]
    kernels = [dict(kernel="knn_graph", batch=1, nodes=1369, dim=1024, k=8, impl="triton", status="ok",
                    median_ms=0.5, config=None),
               dict(kernel="knn_graph", batch=1, nodes=1369, dim=1024, k=8, impl="torch_reference", status="ok",
                    median_ms=0.9, config=None)]
    judged = {g["goal"].split(",")[0]: g for g in G.goals(rows, kernels, "cuda")}
    assert judged["BAG-CLIP batch-1 p50 ms"]["measured"] == 3.5
    assert judged["BAG-CLIP batch-1 p50 ms"]["status"] == "met"
    assert judged["BAG-CLIP images/s"]["measured"] == 500.0  # 32 images in 64 ms
    assert judged["BAG-CLIP images/s"]["status"] == "not met"
    assert judged["BAG-CLIP best path vs torch eager fp32"]["measured"] == pytest.approx(100 / 3.5, abs=0.01)
    assert judged["BAG-CLIP best path vs torch eager fp32"]["status"] == "met"
    assert judged["Bayes-PFL batch-1 p50 ms"]["measured"] == 12.0
    assert judged["Bayes-PFL batch-1 p50 ms"]["status"] == "not met"
    knn = next(g for g in G.goals(rows, kernels, "cuda") if g["goal"].startswith("knn_graph"))
    assert knn["measured"] == 1.8 and knn["status"] == "not met"  # 0.9 / 0.5 < 2
    dual = next(g for g in G.goals(rows, kernels, "cuda") if g["goal"].startswith("dual_attention"))
    assert dual["measured"] is None and dual["status"] == "not measured"
    cpu = G.goals([_row("torch-fp32", 1, 50.0, device="cpu", profile="tiny")], [], "cpu")
    assert cpu[0]["measured"] == 50.0 and cpu[0]["status"].startswith("not measured")


@pytest.mark.slow
def test_orchestrator_caps_steps_and_keeps_going(tmp_path, monkeypatch):
    """A step over its cap is stopped and marked, the next one still runs (here: a skip with its reason), and the
    summary and steps.json are complete; a step left without budget is 'not run'."""
    real_plan = G.plan

    def plan(device):
        steps = real_plan(device)
        for s in steps:
            if s.name == "env":
                s.cap_s = 0.2  # importing torch alone takes longer
        return steps

    monkeypatch.setattr(G, "plan", plan)
    rc = G.orchestrate(tmp_path, "cpu", None, ["env", "bench-compile"], budget_s=120)
    assert rc == 1
    data = json.loads((tmp_path / "steps.json").read_text())
    status = {s["name"]: s for s in data["steps"]}
    assert [s["name"] for s in data["steps"]] == ["install", "env", "bench-compile"]
    assert status["install"]["status"] == "ok"
    assert status["env"]["status"] == "timeout" and "cap" in status["env"]["detail"]
    assert status["bench-compile"]["status"] == "skipped" and "inductor" in status["bench-compile"]["detail"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| env |" in summary and "timeout" in summary and "**not measured**" in summary
    assert "BAG-CLIP" in summary and "121.6" in summary  # the paper's row beside the goals
    assert (tmp_path / "env.log").exists() and (tmp_path / "bench-compile.log").exists()

    step = G.Step("tests", "x", 60)
    G.run_step(step, tmp_path, "cpu", deadline=0.0, extra=[])
    assert step.status == "not run" and "budget" in step.detail


def test_unknown_step_is_refused(tmp_path, capsys):
    assert G.orchestrate(tmp_path, "cpu", None, ["tets"], budget_s=10) == 2
    assert "unknown step" in capsys.readouterr().out


def test_kernels_rebuild_when_triton_interpret_changes(monkeypatch):
    """Interpreted under TRITON_INTERPRET=1, compiled without it, interpreted again (and still correct): one process
    can run the interpreter tests and the GPU tests (`pytest -m gpu`)."""
    pytest.importorskip("triton")
    import torch

    from zsad.kernels import knn_graph as KG
    from zsad.kernels._common import for_current_mode

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(for_current_mode(KG._knn_topk_kernel)).__name__ == "InterpretedFunction"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = for_current_mode(KG._knn_topk_kernel)
    assert type(compiled).__name__ == "JITFunction"
    assert type(compiled.fn.__globals__["_rank_key"]).__name__ == "JITFunction"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 37, 16, generator=torch.Generator().manual_seed(0))
    got = KG.knn_graph_triton(x, 3, topk_blocks=(16, 16, 16), norm_blocks=(16, 16))
    assert type(for_current_mode(KG._knn_topk_kernel)).__name__ == "InterpretedFunction"
    torch.testing.assert_close(got.double(), KG.knn_graph_reference(x.double(), 3), rtol=1e-5, atol=1e-6)


def test_aot_step_skips_only_what_the_committed_table_proves(tmp_path, monkeypatch):
    """The aot step skips when the newest committed table has this tree's fingerprint and passed, on the CPU (CI)
    only if that table's triton is the installed one; a stale or failing table builds (stubbed here:
    tests/test_kernels_aot.py builds for real); a failing build fails the step."""
    pytest.importorskip("triton")
    from zsad.kernels import aot

    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(G, "RESULTS", results)
    monkeypatch.setattr(aot, "collect", lambda sites, targets=(): [])  # the fingerprint is stubbed below
    monkeypatch.setattr(aot, "fingerprint", lambda launches: "now")
    monkeypatch.setattr(aot, "_triton_version", lambda: "3.9.0")
    built = []

    def fake_run(out_dir, targets, jobs, failed=0, **kw):
        built.append(out_dir)
        meta = {"wall_s": 1.0, "summary": {"launches": 1, "rows": 3, "failed": failed}}
        return [], meta

    monkeypatch.setattr(aot, "run", fake_run)

    def table(name, fingerprint, failed, triton="3.9.0"):
        meta = {"fingerprint": fingerprint, "versions": {"triton": triton},
                "summary": {"launches": 5, "targets": ["sm_80", "sm_89", "sm_90a"], "failed": failed}}
        (results / name).write_text(json.dumps({"meta": meta, "rows": []}))

    G.step_aot(tmp_path / "out", "cuda")  # no table at all: builds
    table("2026-12-01-kernels-aot.json", "now", 0)
    table("2026-11-01-kernels-aot.json", "old", 0)  # an older table does not count
    for device in ("cuda", "cpu"):
        with pytest.raises(G.StepSkip, match="proved by the committed table: 2026-12-01-kernels-aot.json: 5 launches"):
            G.step_aot(tmp_path / "out", device)
    assert len(built) == 1
    table("2026-12-02-kernels-aot.json", "now", 0, triton="3.10.0")  # another triton: the GPU trusts it, CI builds
    with pytest.raises(G.StepSkip):
        G.step_aot(tmp_path / "out", "cuda")
    G.step_aot(tmp_path / "out", "cpu")
    assert len(built) == 2
    table("2026-12-03-kernels-aot.json", "other sources", 0)  # the newest table is stale: build on the GPU too
    G.step_aot(tmp_path / "out", "cuda")
    table("2026-12-04-kernels-aot.json", "now", 2)  # current but failing: not proved anywhere
    G.step_aot(tmp_path / "out", "cuda")
    G.step_aot(tmp_path / "out", "cpu")
    assert len(built) == 5
    monkeypatch.setattr(aot, "run", partial(fake_run, failed=2))
    with pytest.raises(SystemExit, match="2 kernel build"):
        G.step_aot(tmp_path / "out", "cpu")
