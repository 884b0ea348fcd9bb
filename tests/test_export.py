"""Export without a server: configs against Triton's schema for all four backends, the parity gate (passing and
refusing), fp16 / TensorRT refusals, the fp16 conversion's structure, and ViT-L at the paper profile (slow)."""
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from zsad import ZsadError
from zsad.export import exporter, parity, runtimes
from zsad.export.cli import main as export_cli
from zsad.export.onnx_export import export_stage
from zsad.export.runtimes import onnx_runtime
from zsad.export.runtimes.python_torch import torch_config
from zsad.export.triton_repo import (
    RepoOptions,
    ensemble_config,
    preprocess_config,
    restore_config,
    tensor_config,
    to_pbtxt,
    validate_config,
)


def _parse(cfg: dict):
    return text_format.Parse(to_pbtxt(cfg), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", runtimes.names())
def test_every_generated_config_parses_as_triton_modelconfig(backend, tiny_method):
    stages = tiny_method("bagclip").stages()
    kind = "KIND_CPU" if backend in ("python-ort", "openvino", "python-openvino") else "KIND_GPU"
    opts = RepoOptions(name="bag", backend=backend, max_batch=16, instance_kind=kind, fp16=backend == "tensorrt")
    stage_config = runtimes.get(backend).triton_config
    for st in stages:
        m = _parse(stage_config(opts, st, f"bag_{st.name}"))
        assert m.max_batch_size == 16 and m.name == f"bag_{st.name}"
        # Triton's batcher guide: no preferred sizes unless asked for (--preferred-batch-size), a small delay
        assert list(m.dynamic_batching.preferred_batch_size) == []
        assert m.dynamic_batching.max_queue_delay_microseconds == 200
        assert m.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value(kind)
        assert [i.name for i in m.input] == list(st.inputs) and [o.name for o in m.output] == list(st.outputs)
        assert m.model_warmup[0].batch_size == 1
        if backend == "onnxruntime":
            assert m.platform == "onnxruntime_onnx"
        elif backend == "tensorrt":
            assert m.platform == "tensorrt_plan"
        elif backend == "openvino":
            assert m.backend == "openvino"
        else:
            assert m.backend == "python"
    by_name = {st.name: st for st in stages}
    head = _parse(stage_config(opts, by_name["head"], "bag_head"))
    prob = {o.name: o for o in head.output}["image_prob"]
    assert list(prob.dims) == [1] and list(prob.reshape.shape) == []  # per-item scalar
    assert list({i.name: i for i in head.input}["taps"].dims) == [4, 196, 128]
    # the kNN neighbours travel between the graph and head models as int64 [196, 8] per image
    graph = _parse(stage_config(opts, by_name["graph"], "bag_graph"))
    knn_out = {o.name: o for o in graph.output}["knn_index"]
    knn_in = {i.name: i for i in head.input}["knn_index"]
    for t in (knn_out, knn_in):
        assert t.data_type == model_config_pb2.TYPE_INT64 and list(t.dims) == [196, 8]
    for raw in (False, True):
        pre = _parse(preprocess_config(opts, "bag_pre", raw, 224, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
        assert pre.input[0].data_type == (model_config_pb2.TYPE_UINT8 if raw else model_config_pb2.TYPE_STRING)
        assert pre.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    _parse(restore_config(opts, "bag_restore", 224))
    _parse(torch_config(opts, "bag_torch", [tensor_config("images", ("B", 3, 224, 224), torch.float32)],
                        [tensor_config("score", ("B",), torch.float32)]))
    ens = _parse(ensemble_config(opts, "bag", [tensor_config("images", ("B", 3, 224, 224), torch.float32)],
                                 [tensor_config("score", ("B",), torch.float32)],
                                 [("bag_encoder", {"images": "images"}, {"taps": "taps"})]))
    assert ens.platform == "ensemble" and ens.ensemble_scheduling.step[0].model_name == "bag_encoder"
    assert not ens.output[0].HasField("reshape")


def test_config_validation_rejects_a_typo():
    with pytest.raises(ZsadError, match="does not parse"):
        validate_config('name: "x"\nmax_batch_sise: 4\n')
    with pytest.raises(ZsadError, match="does not parse"):
        validate_config('name: "x"\ninstance_group { kind: KIND_TPU }\n')


def test_compare_and_ranking_are_what_they_say():
    row = parity.compare("s", "c", "t", np.array([1.0, -4.0]), np.array([1.0, -4.0002]), 1e-4)
    assert row.max_abs == pytest.approx(2e-4) and row.max_rel == pytest.approx(5e-5) and row.ok
    assert not parity.compare("s", "c", "t", np.ones(3), np.ones(4), 1e-4).ok  # shape mismatch
    assert not parity.compare("s", "c", "t", np.ones(3), np.array([1, np.nan, 1]), 1e-4).ok
    assert parity._ranking_row(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.6, 0.7]), 1e-4, 3).ok
    assert not parity._ranking_row(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.95, 0.7]), 1e-4, 3).ok
    # a swap inside the tolerance is not a ranking change
    assert parity._ranking_row(np.array([0.5, 0.50000001]), np.array([0.50000001, 0.5]), 1e-4, 2).ok


def test_an_undeclared_discontinuity_fails_end_to_end():
    """A stage within 1e-4 whose small error a discontinuous next stage amplifies: with the discontinuity not
    declared as a selection (zsad.selection) the chain fails at 1e-4 (no allowance exists); a stage over 1e-4 on
    identical inputs fails first."""
    from torch import nn

    from zsad.methods import Stage

    class Step(nn.Module):  # a threshold: a tiny input change flips whole outputs (like a kNN selection)
        def forward(self, x):
            return x + 5e-4 * (x > 0.0).float()

    stages = [Stage("encoder", nn.Identity(), {"images": ("B", 3)}, {"feat": ("B", 3)}),
              Stage("head", Step(), {"feat": ("B", 3)}, {"out": ("B", 3)})]
    images = np.array([[1e-5, 0.5, 1.0], [-1e-5, 0.2, 1.0]], np.float32)

    def runners(encoder_shift):
        return {"encoder": lambda f: {"feat": f["images"] - encoder_shift},
                "head": lambda f: {"out": f["feat"] + 5e-4 * (f["feat"] > 0).astype(np.float32)}}

    with pytest.raises(parity.ParityError, match="end-to-end"):
        parity.check_stages(stages, runners(np.float32(2e-5)), {"images": images}, 1e-4)
    rows = parity.check_stages(stages, runners(np.float32(0.0)), {"images": images}, 1e-4)
    assert all(r.tol == 1e-4 and r.ok for r in rows)
    with pytest.raises(parity.ParityError, match="stage 'encoder'"):
        parity.check_stages(stages, runners(np.float32(5e-4)), {"images": images}, 1e-4)


def test_onnx_stage_matches_torch_with_dynamic_batch(tmp_path, tiny_method):
    import onnxruntime as ort

    st = tiny_method("anomalyclip").stages()[2]  # postprocess: small and quick
    path = export_stage(st, tmp_path / "post.onnx", max_batch=8)
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["image_prob", "patch_map"]
    assert model.graph.input[1].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3, 8):
        x = st.example_inputs(b, torch.Generator().manual_seed(b))
        ref = st.module(*x)
        got = sess.run(None, {"image_prob": x[0].numpy(), "patch_map": x[1].numpy()})
        np.testing.assert_allclose(got[1], ref[1].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_export_writes_a_repository_that_passed_the_gate(tmp_path):
    res = CliRunner().invoke(export_cli, ["--model", "anomalyclip", "--profile", "tiny", "--backend", "python-ort",
                                          "--out", str(tmp_path / "repo"), "--max-batch", "8", "--parity-images", "3",
                                          "--resize-to-input"])
    assert res.exit_code == 0, res.output
    repo = tmp_path / "repo"
    names = sorted(p.name for p in repo.iterdir())
    assert names == ["anomalyclip", "anomalyclip_encoder", "anomalyclip_head", "anomalyclip_postprocess",
                     "anomalyclip_preprocess", "anomalyclip_preprocess_raw", "anomalyclip_raw", "anomalyclip_restore"]
    for d in repo.iterdir():
        validate_config((d / "config.pbtxt").read_text())
    assert (repo / "anomalyclip_encoder" / "1" / "model.onnx").is_file()
    assert (repo / "anomalyclip_encoder" / "1" / "model.py").is_file()
    report = json.loads((repo / "anomalyclip" / "parity_report.json").read_text())
    cases = {(r["stage"], r["case"]) for r in report["rows"]}
    for stage in ("encoder", "head", "postprocess"):
        for case in ("random b=1", "random b=3", "images b=1", "images b=3"):
            assert (stage, case) in cases
    assert ("end-to-end", "images b=3") in cases and all(r["ok"] for r in report["rows"])
    assert report["worst"] <= 1e-4 and report["trained"] is False
    assert "max rel" in res.output and "UNTRAINED" in res.output


@pytest.mark.slow
def test_failing_stage_is_not_written_and_named(tmp_path, monkeypatch):
    """Sabotage the head's exported copy (its baked text rows swapped): the gate must refuse and write nothing."""
    real = export_stage

    def sabotaged(stage, path, max_batch=32):
        if stage.name != "head":
            return real(stage, path, max_batch)
        text = stage.module.text.clone()
        stage.module.text.copy_(text.flip(0))
        try:
            return real(stage, path, max_batch)
        finally:
            stage.module.text.copy_(text)

    monkeypatch.setattr(onnx_runtime, "export_stage", sabotaged)  # the ONNX backends' stage export
    res = CliRunner().invoke(export_cli, ["--model", "anomalyclip", "--profile", "tiny", "--backend", "python-ort",
                                          "--out", str(tmp_path / "repo"), "--max-batch", "4", "--parity-images", "2"])
    assert res.exit_code == 2
    assert "stage 'head'" in res.stderr and "tensor 'image_prob'" in res.stderr and "max relative error" in res.stderr
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
    assert not list(tmp_path.glob(".anomalyclip-export-*"))  # scratch space cleaned up


def test_fp16_and_tensorrt_are_refused_clearly_where_they_cannot_run(tmp_path):
    import onnxruntime as ort

    args = ["--model", "anomalyclip", "--profile", "tiny", "--out", str(tmp_path / "r")]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        res = CliRunner().invoke(export_cli, args + ["--fp16", "--backend", "onnxruntime"])
        assert res.exit_code == 2 and "CUDA provider" in res.stderr and "fp16" in res.stderr
    if not torch.cuda.is_available():
        res = CliRunner().invoke(export_cli, args + ["--fp16", "--backend", "python-torch", "--device", "cpu"])
        assert res.exit_code == 2 and "needs CUDA" in res.stderr
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        res = CliRunner().invoke(export_cli, args + ["--backend", "tensorrt"])
        assert res.exit_code == 2 and "TensorRT" in res.stderr and "not installed" in res.stderr
    assert not (tmp_path / "r").exists()



def test_an_unknown_method_or_profile_is_the_only_line(tmp_path):
    """A mistyped --model or --profile without --checkpoint is one error line, not the 'exporting UNTRAINED' warning
    about a method that does not exist followed by the error."""
    import warnings

    for args, msg in ((["--model", "bagclp"], "unknown method 'bagclp'"),
                      (["--model", "bagclip", "--profile", "tinny"], "unknown profile 'tinny'")):
        with warnings.catch_warnings(record=True) as caught:  # pytest would keep a warning off the output
            warnings.simplefilter("always")
            res = CliRunner().invoke(export_cli, args + ["--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and res.stderr.startswith(f"error: {msg}") and res.stderr.count("\n") == 1
        assert not [w for w in caught if "UNTRAINED" in str(w.message)], res.output
    assert not (tmp_path / "r").exists()

@pytest.mark.slow
def test_fp16_conversion_keeps_normalisation_in_fp32(tmp_path, tiny_method):
    from zsad.export.fp16 import KEEP_FP32, convert_to_fp16

    st = tiny_method("anomalyclip").stages()[0]
    path = convert_to_fp16(export_stage(st, tmp_path / "enc.onnx", max_batch=4))
    model = onnx.load(str(path))
    init = {i.name: i.data_type for i in model.graph.initializer}
    ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert ln, "the encoder has LayerNorms"
    for node in ln:  # scale / bias of every LayerNorm stay fp32 and its input is cast up to fp32
        assert all(init[i] == onnx.TensorProto.FLOAT for i in node.input[1:] if i in init)
    assert any(t == onnx.TensorProto.FLOAT16 for t in init.values())  # the GEMM weights are fp16
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays fp32
    assert "LayerNormalization" in KEEP_FP32


@pytest.mark.gpu
def test_fp16_onnx_parity_on_cuda(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here")
    res = exporter.export_model(exporter.ExportOptions(model="anomalyclip", profile="tiny", backend="onnxruntime",
                                                       fp16=True, out=tmp_path / "repo",
                                                       max_batch=4), log=lambda *a: None)
    assert all(r.ok for r in res.parity_rows) and res.parity_rows[0].tol == parity.FP16_TOL


def test_tensorrt_engine_builds(tmp_path, tiny_method):
    pytest.importorskip("tensorrt")
    res = exporter.export_model(exporter.ExportOptions(model="anomalyclip", profile="tiny", backend="tensorrt",
                                                       out=tmp_path / "repo", max_batch=4), log=lambda *a: None)
    assert (tmp_path / "repo" / "anomalyclip_encoder" / "1" / "model.plan").stat().st_size > 0
    assert res.ensembles == ["anomalyclip", "anomalyclip_raw"]


@pytest.mark.slow
def test_python_torch_backend_ships_a_checkpoint(tmp_path):
    res = exporter.export_model(exporter.ExportOptions(model="bagclip", profile="tiny", backend="python-torch",
                                                       device="cpu", out=tmp_path / "repo", max_batch=4,
                                                       parity_images=2), log=lambda *a: None)
    mdir = tmp_path / "repo" / "bagclip_torch" / "1"
    assert (mdir / "model.py").is_file() and (mdir / "checkpoint" / "checkpoint.safetensors").is_file()
    assert res.models.count("bagclip_torch") == 1 and all(r.ok for r in res.parity_rows)


@pytest.mark.slow
def test_vit_l_paper_profile_exports_on_this_box(tmp_path):
    """The real ViT-L-14-336 at 518 px (random weights) through the whole export: single-file ONNX under 2 GB,
    every stage and the chain within the fp32 tolerance (batch 1 only, to keep CPU time reasonable)."""
    res = exporter.export_model(exporter.ExportOptions(model="anomalyclip", profile="paper", clip_weights=None,
                                                       backend="python-ort", out=tmp_path / "repo", max_batch=4,
                                                       parity_images=1, overrides={"backbone": {"pretrained": None}}),
                                log=lambda *a: None)
    enc = tmp_path / "repo" / "anomalyclip_encoder" / "1"
    assert (enc / "model.onnx").stat().st_size < 2 * 1024 ** 3 and not (enc / "model.onnx.data").exists()
    assert all(r.ok for r in res.parity_rows)
    taps = [r for r in res.parity_rows if r.tensor == "taps"]
    assert taps and all(r.max_rel <= parity.FP32_TOL for r in taps)


@pytest.mark.slow
def test_few_shot_export_bakes_the_memory_bank(tmp_path):
    """AF-CLIP+ with a 2-image support folder: the few-shot stage is exported and its ONNX chain reproduces the
    eager few-shot model fitted on the same images (an independent run, not the exporter's own report)."""
    from PIL import Image

    import zsad.methods as M
    from zsad.data import preprocess, read_image
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample

    cls = SYNTHETIC_TEST_CLASSES[0]
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(render_sample(cls, "test_good", i).image).save(folder / f"good{i}.png")
    repo = tmp_path / "repo"
    res = CliRunner().invoke(export_cli, ["--model", "afclip", "--profile", "tiny", "--backend", "onnxruntime",
                                          "--out", str(repo), "--max-batch", "4", "--parity-images", "2",
                                          "--support", str(folder), "--shots", "2", "--name", "afclip_part"])
    assert res.exit_code == 0, res.output
    assert (repo / "afclip_part_fewshot" / "1" / "model.onnx").is_file()
    # eager: the same two images the seeded draw picks, fitted by hand
    from zsad.evaluate import support_images

    picked = support_images(folder, ["x"], 2)["x"]
    m = M.create("afclip", "tiny")
    m.fit_memory(torch.stack([torch.from_numpy(preprocess(read_image(p), m.image_size)) for p in picked]))
    x = parity.synthetic_images(m.image_size, n=2, seed=5)
    with torch.no_grad():
        ref = m(torch.from_numpy(x))
    env = {"images": x}
    for st in m.stages():
        env.update(parity.ort_runner(repo / f"afclip_part_{st.name}" / "1" / "model.onnx")(
            {n: env[n] for n in st.inputs}))
    np.testing.assert_allclose(env["score"], ref.score.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(env["anomaly_map"], ref.anomaly_map.numpy(), rtol=1e-4,
                               atol=1e-4 * float(ref.anomaly_map.abs().max()))
    # a method without a few-shot mode says so
    res = CliRunner().invoke(export_cli, ["--model", "bagclip", "--profile", "tiny", "--out", str(tmp_path / "r2"),
                                          "--support", str(folder), "--shots", "2"])
    assert res.exit_code != 0 and "no few-shot mode" in res.output and "Traceback" not in res.output


def _snapshot(root):
    """Every file and folder under root with its bytes: to prove a tree was left byte-identical."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_export_never_touches_folders_it_did_not_write(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "anomalyclip_head" / "1").mkdir(parents=True)  # a user's folder that happens to clash with a model
    (repo / "anomalyclip_head" / "1" / "weights.bin").write_bytes(b"user data \x00\x01")
    (repo / "mine").mkdir()
    (repo / "mine" / "notes.txt").write_text("keep me")
    before = _snapshot(repo)
    args = ["--model", "anomalyclip", "--profile", "tiny", "--backend", "python-ort", "--max-batch", "2",
            "--parity-images", "1"]

    def no_export_work(*a, **k):
        raise AssertionError("export work started before the output was checked")

    monkeypatch.setattr(onnx_runtime, "export_stage", no_export_work)
    res = CliRunner().invoke(export_cli, args + ["--out", str(repo)])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert res.stderr.count("\n") == 1 and "anomalyclip_head" in res.stderr and "--force" in res.stderr
    assert _snapshot(repo) == before

    a_file = tmp_path / "repo.txt"
    a_file.write_text("not a folder")
    res = CliRunner().invoke(export_cli, args + ["--out", str(a_file)])
    assert res.exit_code == 2 and "is a file" in res.stderr and a_file.read_text() == "not a folder"

    for bad in ("./../../x", "../x", "a/b", ".hidden", "x" * 65, ""):
        res = CliRunner().invoke(export_cli, args + ["--out", str(repo), "--name", bad])
        assert res.exit_code == 2 and "not a plain identifier" in res.stderr, (bad, res.output)
    assert _snapshot(repo) == before and sorted(p.name for p in tmp_path.iterdir()) == ["repo", "repo.txt"]

    # --force replaces the clashing folder only; the user's other files stay byte-identical
    monkeypatch.undo()
    res = CliRunner().invoke(export_cli, args + ["--out", str(repo), "--force"])
    assert res.exit_code == 0, res.output
    assert not (repo / "anomalyclip_head" / "1" / "weights.bin").exists()
    assert (repo / "mine" / "notes.txt").read_text() == "keep me"
    models = sorted(p.name for p in repo.iterdir() if p.name != "mine")
    assert models == ["anomalyclip", "anomalyclip_encoder", "anomalyclip_head", "anomalyclip_postprocess",
                      "anomalyclip_preprocess", "anomalyclip_preprocess_raw", "anomalyclip_raw"]
    for m in models:
        assert json.loads((repo / m / exporter.MARKER_NAME).read_text())["written_by"] == "zsad-export"
    # a second export replaces its own (marked) folders without --force: replaced, not merged
    (repo / "anomalyclip_encoder" / "stale.txt").write_text("from the last export")
    res = CliRunner().invoke(export_cli, args + ["--out", str(repo)])
    assert res.exit_code == 0, res.output
    assert not (repo / "anomalyclip_encoder" / "stale.txt").exists()
    assert (repo / "anomalyclip_encoder" / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in repo.iterdir()) == sorted(models + ["mine"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "repo.txt"]  # no build folder left beside it
