"""Every exported stage file describes itself in ONNX ``metadata_props``, read back with onnx's own loader."""
import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import zsad
import zsad.methods as M
from zsad.checkpoint import save_checkpoint
from zsad.export.exporter import ExportOptions, export_model
from zsad.export.onnx_export import stamp_metadata


def _props(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.slow
def test_exported_stages_carry_their_metadata(tmp_path):
    method = M.create("anomalyclip", "tiny")
    ckpt = save_checkpoint(tmp_path / "ckpt", method)
    sha = hashlib.sha256((ckpt / "checkpoint.safetensors").read_bytes()).hexdigest()
    res = export_model(ExportOptions(checkpoint=str(ckpt), backend="onnxruntime", out=tmp_path / "repo", max_batch=2,
                                     parity_images=2), log=lambda *a: None)
    files = sorted(res.repo.glob("*/1/model.onnx"))
    stages = [s.name for s in method.stages()]
    assert len(files) == len(stages) >= 2
    for f in files:
        onnx.checker.check_model(str(f))  # still a valid model after stamping
        props = _props(f)
        assert props["zsad.stage"] == f.parent.parent.name.removeprefix("anomalyclip_")
        assert props["zsad.method"] == "anomalyclip" and props["zsad.profile"] == "tiny"
        assert props["zsad.image_size"] == str(method.image_size)
        assert props["zsad.trained"] == "true" and props["zsad.precision"] == "fp32"
        assert props["zsad.version"] == zsad.__version__
        assert props["zsad.checkpoint_sha256"] == sha
        # OpenAI CLIP's published normalisation, typed in here independently of zsad.data
        np.testing.assert_allclose([float(v) for v in props["zsad.mean"].split(",")],
                                   [0.48145466, 0.4578275, 0.40821073], rtol=0, atol=1e-9)
        np.testing.assert_allclose([float(v) for v in props["zsad.std"].split(",")],
                                   [0.26862954, 0.26130258, 0.27577711], rtol=0, atol=1e-9)
    assert {_props(f)["zsad.stage"] for f in files} == set(stages)


@pytest.mark.slow
def test_untrained_export_says_so_and_has_no_checkpoint_hash(tmp_path):
    res = export_model(ExportOptions(model="anomalyclip", profile="tiny", backend="onnxruntime", out=tmp_path / "repo",
                                     max_batch=2, parity_images=2), log=lambda *a: None)
    for f in res.repo.glob("*/1/model.onnx"):
        props = _props(f)
        assert props["zsad.trained"] == "false"
        assert "zsad.checkpoint_sha256" not in props


def test_stamp_keeps_other_keys_and_external_weights(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"author": "someone", "zsad.method": "old"})
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data_before = (tmp_path / "model.onnx.data").read_bytes()

    stamp_metadata(path, {"zsad.method": "bagclip", "zsad.image_size": "518"})

    assert _props(path) == {"author": "someone", "zsad.method": "bagclip", "zsad.image_size": "518"}
    assert (tmp_path / "model.onnx.data").read_bytes() == data_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp file left
    x = np.ones((2, 3), np.float32)
    (y,) = ReferenceEvaluator(onnx.load(str(path))).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w)
