"""Every registered method (``zsad.methods.available()``, tiny, untrained) exported through the parity gate
(python-ort backend, maps restored to the input size) into ONE repository and served by ONE real tritonserver:
served equals eager over HTTP and gRPC for each, and Bayes-PFL's class name travels with each request through its
own text model to its own text-encoder stage."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format
from helpers import png_bytes
from PIL import Image
from tritonclient.grpc import model_config_pb2

import zsad.methods as M
from zsad import ZsadError
from zsad.data import preprocess
from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample
from zsad.data.transforms import resize_map
from zsad.export.exporter import ExportOptions, export_model
from zsad.export.parity import reference_on_selections
from zsad.serve.client import AnomalyClient
from zsad.serve.server import TritonServer

pytestmark = pytest.mark.server

METHODS = M.available()
NAMES = ["bottle", "metal_nut", "screw"]  # one class name per test image (Bayes-PFL)


@pytest.fixture(scope="module")
def images():
    return [render_sample(SYNTHETIC_TEST_CLASSES[i], "test_defect", 10 + i, image_size=s).image
            for i, s in enumerate((256, 224, 240))]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo_methods")
    results = {name: export_model(ExportOptions(model=name, profile="tiny", backend="python-ort", out=repo, max_batch=4,
                                                parity_images=2, resize_to_input=True), log=lambda *a: None)
               for name in METHODS}
    with TritonServer(repo) as srv:
        yield srv, results


def _eager(name, arrays, class_names=None, served_selections=None):
    """Eager score and map; with ``served_selections`` (the served chain's selection outputs) the torch chain takes
    them where they are near-ties of its own (zsad.export.parity.reference_on_selections), as the gate does."""
    m = M.create(name, "tiny")
    x = torch.from_numpy(np.stack([preprocess(a, m.image_size) for a in arrays]))
    if served_selections:
        feed = {k: v.numpy() for k, v in m.stage_inputs(x, class_names).items()}
        ref, rows = reference_on_selections(m.stages(), feed, served_selections, 1e-4)
        assert rows and all(r.ok for r in rows), [r.detail for r in rows]
        return ref["score"], ref["anomaly_map"]
    with torch.no_grad():
        out = m(x, class_names=class_names)
    return out.score.numpy(), out.anomaly_map.numpy()


def test_each_export_passed_the_gate_with_its_own_stages(served):
    srv, results = served
    for name, res in results.items():
        report = json.loads(res.report.read_text())
        # one tolerance for every stage and the chain end to end (selections are compared by their tie rule)
        assert report["method"] == name and report["worst"] <= 1e-4
        stages = [s.name for s in M.create(name, "tiny").stages()]
        assert {r["stage"] for r in report["rows"]} == set(stages) | {"end-to-end"}
        assert all(f"{name}_{s}" in res.models for s in stages)
    # Bayes-PFL: the text encoder is its own model; the ensemble takes the class name beside the image
    assert {"bayespfl_text_encoder", "bayespfl_text_class_name"} <= set(results["bayespfl"].models)
    ens = text_format.Parse((srv.repo / "bayespfl" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [i.name for i in ens.input] == ["image_bytes", "class_name"]
    assert [s.model_name for s in ens.ensemble_scheduling.step][:2] \
        == ["bayespfl_preprocess", "bayespfl_text_class_name"]
    # SOWA: the position-bias MLP is folded into per-head bias tables (constants; no ReLU left in the graph)
    import onnx

    head = onnx.load(str(srv.repo / "sowa_head" / "1" / "model.onnx"))
    assert "Relu" not in {n.op_type for n in head.graph.node}
    assert any(tuple(t.dims) == (4, 8, 49, 49) for t in head.graph.initializer)
    afclip_ens = text_format.Parse((srv.repo / "afclip" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [i.name for i in afclip_ens.input] == ["image_bytes"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name", METHODS)
def test_served_equals_eager(served, images, name, protocol):
    srv, _ = served
    url = srv.http_url if protocol == "http" else srv.grpc_url
    client = AnomalyClient(f"{protocol}://{url}", name)
    # one request, three sizes (and the selections, BAG-CLIP's knn_index, which the ensemble also returns)
    selections = [n for st in M.create(name, "tiny").stages() for n in st.selections]
    preds = client.infer([png_bytes(a) for a in images], class_names=NAMES, outputs=selections)
    served_sel = {n: np.stack([p.extra[n] for p in preds]) for n in selections}
    # the class names are ignored by methods without text inputs
    score, amap = _eager(name, images, NAMES, served_sel)
    tol = 1e-4  # the export gate's tolerance, end to end
    for i, p in enumerate(preds):
        assert p.score == pytest.approx(float(score[i]), rel=tol, abs=1e-6)
        h, w = images[i].shape[:2]
        assert p.anomaly_map.shape == (h, w)  # exported with resize_to_input
        np.testing.assert_allclose(p.anomaly_map, resize_map(amap[i], h, w), rtol=tol, atol=tol * np.abs(amap).max())
    for i in (0, 1):  # the uint8 HWC ensemble (one shape per request, so a batch of one): the same answer
        raw = client.infer([images[i]], class_names=NAMES[i])
        assert raw[0].score == pytest.approx(preds[i].score, rel=1e-5)


def test_bayespfl_class_name_is_part_of_the_request(served, images):
    srv, _ = served
    client = AnomalyClient(srv.http_url, "bayespfl")
    png = png_bytes(images[0])
    a = client.infer([png], class_names="bottle")[0]
    b = client.infer([png], class_names="wood")[0]
    ref_a, ref_b = _eager("bayespfl", images[:1], "bottle")[0], _eager("bayespfl", images[:1], "wood")[0]
    assert a.score == pytest.approx(float(ref_a[0]), rel=1e-4) and b.score == pytest.approx(float(ref_b[0]), rel=1e-4)
    assert abs(a.score - b.score) > 1e-4  # the name reaches the prompts
    with pytest.raises(ZsadError, match="class name"):
        client.infer([png])
    with pytest.raises(ZsadError, match="bad input: .*class name .* at most"):
        client.infer([png], class_names="an extremely long and wordy name of an industrial part")
    assert srv.ready()


def test_zsad_infer_takes_the_class_name(served, images, tmp_path):
    from zsad.serve.cli import infer_main

    srv, _ = served
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(images[:2]):
        Image.fromarray(a).save(folder / f"img{i}.png")
    base = [str(folder), "--url", srv.http_url, "--model", "bayespfl", "--no-progress", "--no-heatmaps"]
    res = CliRunner().invoke(infer_main, base + ["--out", str(tmp_path / "o1")])
    assert res.exit_code != 0 and "--class-name" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(infer_main, base + ["--class-name", "bottle", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "o2" / "scores.json").read_text())
    ref = _eager("bayespfl", images[:2], "bottle")[0]
    assert got["class_name"] == "bottle"
    assert [r["score"] for r in got["images"]] == pytest.approx(ref.tolist(), rel=1e-4)
