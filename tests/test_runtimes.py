"""The runtime registry (zsad.export.runtimes): every backend says whether it runs here, export refuses one that
does not with its reason, and a backend added as one class (here, in this file) is offered by zsad-export, written
by the repository writer and timed by zsad-bench with no edit anywhere else."""
import json

import pytest
from click.testing import CliRunner

from zsad import ZsadError
from zsad.bench.cli import main as bench_cli
from zsad.export import runtimes
from zsad.export.cli import main as export_cli
from zsad.export.runtimes.onnx_runtime import OnnxStages
from zsad.export.runtimes.runners import stage_chain_runner
from zsad.export.triton_repo import validate_config


def test_every_runtime_says_whether_it_runs_here():
    assert set(runtimes.names()) >= {"onnxruntime", "python-ort", "python-torch", "openvino", "python-openvino",
                                     "tensorrt"}
    for name, rt in runtimes.RUNTIMES.items():
        reason = rt.available()
        assert reason is None or (isinstance(reason, str) and reason.strip()), name
        assert rt.name == name and rt.summary and rt.default_device in ("cpu", "gpu")
    assert len(set(runtimes.bench_names())) == len(runtimes.bench_names())  # one owner per zsad-bench backend
    with pytest.raises(ZsadError, match="backend must be one of"):
        runtimes.get("no-such-backend")


def test_cpu_bench_variants_are_refused_on_a_gpu_before_anything_is_built():
    """ort-int8 and every openvino precision are CPU backends: zsad-bench skips them on --device cuda up front (no
    worker started) and tries them on the CPU; ort fp32 runs on both."""
    cpu_only = {"ort-int8", "openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-int8-bf16"}
    for variant in cpu_only | {"ort"}:
        owner = runtimes.bench_owner(variant)
        on_gpu = owner.bench_skip(variant, "cuda")
        assert (on_gpu == f"{variant} is a CPU backend: run it with --device cpu") == (variant in cpu_only), on_gpu
        assert on_gpu is None or variant in cpu_only
        assert owner.bench_skip(variant, "cpu") is None


def test_a_runtime_cannot_take_another_runtimes_name_or_bench_backend():
    with pytest.raises(ZsadError, match="claims zsad-bench backends"):
        @runtimes.register
        class Thief(OnnxStages):
            name = "thief"
            summary = "takes ort"
            bench_variants = ("ort",)
    assert "thief" not in runtimes.RUNTIMES
    with pytest.raises(ZsadError, match="two runtimes are named onnxruntime"):
        @runtimes.register
        class Twin(OnnxStages):
            name = "onnxruntime"
            summary = "a second onnxruntime"
    assert type(runtimes.get("onnxruntime")).__name__ == "OnnxRuntime"


class _Fake(OnnxStages):
    """A backend defined in one class: ONNX stages under Triton's ORT backend, marked by a parameter."""

    name = "test-fake"
    summary = "a test's own runtime"
    default_device = "cpu"
    bench_variants = ("test-fake-ort",)

    def runs_on(self):
        return {"platform": "onnxruntime_onnx"}

    def parameters(self, opts, stage, precision):
        return {"registered_in": "tests/test_runtimes.py"}

    def bench_runner(self, variant, method, device, max_batch, scratch):
        from zsad.export.parity import ort_runner

        files = scratch.onnx(method, max_batch)
        runs = [(st, ort_runner(files[st.name][0])) for st in method.stages()]
        return stage_chain_runner(method, runs, variant, "fp32", "the test's runtime")


class _Missing(_Fake):
    name = "test-missing"
    bench_variants = ()

    def available(self):
        return "test-missing needs a library this machine lacks (the reason export shows)"


@pytest.fixture
def registered():
    """Register the test's runtimes for one test, and take them out again."""
    for cls in (_Fake, _Missing):
        runtimes.register(cls)
    yield
    for cls in (_Fake, _Missing):
        runtimes.RUNTIMES.pop(cls.name)


@pytest.mark.slow
def test_a_new_backend_is_one_class(tmp_path, registered):
    help_text = CliRunner().invoke(export_cli, ["--help"]).output
    assert "test-fake" in help_text  # offered by --backend
    out = tmp_path / "repo"
    res = CliRunner().invoke(export_cli, ["--model", "anomalyclip", "--profile", "tiny", "--backend", "test-fake",
                                          "--out", str(out), "--max-batch", "2", "--parity-images", "2"])
    assert res.exit_code == 0, res.output
    for stage in ("encoder", "head", "postprocess"):
        text = (out / f"anomalyclip_{stage}" / "config.pbtxt").read_text()
        cfg = validate_config(text)
        assert cfg.platform == "onnxruntime_onnx" and "tests/test_runtimes.py" in text
        assert (out / f"anomalyclip_{stage}" / "1" / "model.onnx").is_file()
    assert json.loads((out / "anomalyclip" / "parity_report.json").read_text())["backend"] == "test-fake"
    assert "backend `test-fake`" in (out / "anomalyclip" / "README.md").read_text()

    bench = tmp_path / "bench"
    res = CliRunner().invoke(bench_cli, ["--model", "anomalyclip", "--profile", "tiny", "--batch", "1", "--backend",
                                         "test-fake-ort", "--device", "cpu", "--iters", "1", "--warmup", "0", "--out",
                                         str(bench), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = json.loads(next(bench.glob("*.json")).read_text())["rows"]
    assert [(r["backend"], r["status"], r["parity_ok"]) for r in rows] == [("test-fake-ort", "ok", True)]


def test_export_refuses_an_unavailable_runtime_with_its_reason(tmp_path, registered):
    res = CliRunner().invoke(export_cli, ["--model", "anomalyclip", "--profile", "tiny", "--backend", "test-missing",
                                          "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "needs a library this machine lacks" in res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "r").exists()
