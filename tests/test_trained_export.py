"""Every registered method, trained, through every comparison the project makes (issue 27).

The comparisons had met only untrained weights, and a BAG-CLIP trained for one epoch could not be exported (its
clustered patch features put the kNN selection on near-ties). Here each method is trained at the tiny profile
(tests/conftest.py ``trained_run``), then, with the default gates:

- exported to a python-ort repository (ONNX + the fp32 parity gate, maps restored to the input size), all five
  served by one real tritonserver and compared with eager over HTTP and gRPC (selections by the tie rule, everything
  else at 1e-4), each repository holding its own stages, and Bayes-PFL's class name travelling with each request
  through its own text model to its own text-encoder stage (zsad-infer --class-name included);
- the same ONNX stages through OpenVINO at fp32 (the parity gate), bf16 (where the CPU has it) and int8 (the
  precision gate), and the python-torch export (the chain rebuilt from the shipped checkpoint);
- BAG-CLIP, the method that broke, through export_model on every other CPU backend as a user runs it.

int8 on the tiny profile's random-weight CLIP is not what int8 is calibrated for: where its gate refuses a method,
the refusal must be one line naming the quantised stage (docs/methods/*.md record which, measured).
"""
import csv
import json

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from helpers import png_bytes
from PIL import Image
from tritonclient.grpc import model_config_pb2

import zsad.methods as M
from zsad import ZsadError
from zsad.checkpoint import load_checkpoint
from zsad.data.transforms import resize_map
from zsad.export import openvino_export as OV
from zsad.export import parity
from zsad.export.exporter import ExportOptions, export_model

METHODS = M.available()
HAS_BF16 = "BF16" in __import__("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
QUIET = dict(log=lambda *a: None)


def _history(run):
    with open(run / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_training_left_the_random_start(trained_run, name):
    run = trained_run(name)
    hist = _history(run)
    assert len(hist) >= 3 and hist[-1]["total"] < hist[0]["total"], hist
    trained = load_checkpoint(run)[0].trainable_state_dict()
    fresh = M.create(name, "tiny").trainable_state_dict()  # the same seeded init the run started from
    assert trained.keys() == fresh.keys()
    moved = {k: float((trained[k] - fresh[k]).abs().max()) for k in trained}
    # every parameter group the loss reaches moved; most of them by far more than float noise
    assert sum(v > 1e-4 for v in moved.values()) >= 0.8 * len(moved), moved


@pytest.fixture(scope="module")
def served_trained(tmp_path_factory, trained_run):
    """The five trained methods exported (python-ort, default gate) into one repository and served."""
    from zsad.serve.server import TritonServer

    repo = tmp_path_factory.mktemp("trained_repo")
    results = {name: export_model(ExportOptions(checkpoint=str(trained_run(name)), backend="python-ort", out=repo,
                                                max_batch=4, parity_images=4, resize_to_input=True), **QUIET)
               for name in METHODS}
    with TritonServer(repo) as srv:
        yield srv, results, repo


@pytest.mark.server
def test_trained_exports_pass_the_default_gate(served_trained):
    srv, results, _ = served_trained
    for name, res in results.items():
        report = json.loads(res.report.read_text())
        assert report["trained"] and report["tolerance"] == 1e-4 and report["worst"] <= 1e-4, name
        assert all(r["ok"] for r in report["rows"])
        if name == "bagclip":  # the selection rows are reported, with their count and largest gap
            assert report["selections"]["max_tie_gap"] < 1e-3 and report["selections"]["differing"] >= 0
        # one tolerance for every stage and the chain end to end, each stage its own model
        stages = [s.name for s in M.create(name, "tiny").stages()]
        assert report["method"] == name and {r["stage"] for r in report["rows"]} == set(stages) | {"end-to-end"}
        assert all(f"{name}_{s}" in res.models for s in stages) and f"{name}_restore" in res.models
    # Bayes-PFL: the text encoder is its own model; the ensemble takes the class name beside the image
    assert {"bayespfl_text_encoder", "bayespfl_text_class_name"} <= set(results["bayespfl"].models)
    ens = text_format.Parse((srv.repo / "bayespfl" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [i.name for i in ens.input] == ["image_bytes", "class_name"]
    assert [s.model_name for s in ens.ensemble_scheduling.step][:2] \
        == ["bayespfl_preprocess", "bayespfl_text_class_name"]
    afclip_ens = text_format.Parse((srv.repo / "afclip" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [i.name for i in afclip_ens.input] == ["image_bytes"]
    # SOWA: the position-bias MLP is folded into per-head bias tables (constants; no ReLU left in the graph)
    import onnx

    head = onnx.load(str(srv.repo / "sowa_head" / "1" / "model.onnx"))
    assert "Relu" not in {n.op_type for n in head.graph.node}
    assert any(tuple(t.dims) == (4, 8, 49, 49) for t in head.graph.initializer)


def _batch(method, arrays) -> torch.Tensor:
    """The images preprocessed as the served preprocess model does, at the method's size."""
    from zsad.data import preprocess

    return torch.from_numpy(np.stack([preprocess(a, method.image_size) for a in arrays]))


def _images():
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample

    return [render_sample(SYNTHETIC_TEST_CLASSES[i], "test_defect" if i < 3 else "test_good", 40 + i,
                          image_size=s).image for i, s in enumerate((224, 256, 200, 224))]


@pytest.mark.server
@pytest.mark.parametrize("name", METHODS)
def test_trained_served_equals_eager(served_trained, trained_run, name):
    from zsad.serve.client import AnomalyClient

    srv, _, _ = served_trained
    method = load_checkpoint(trained_run(name))[0].eval()
    stages = method.stages()
    selections = [n for st in stages for n in st.selections]
    arrays = _images()
    names = ["gravel", "tissue", "nut", "capsule"]
    feed = {k: v.numpy() for k, v in method.stage_inputs(_batch(method, arrays), names).items()}
    pngs = [png_bytes(a) for a in arrays]
    for url in (srv.http_url, f"grpc://{srv.grpc_url}"):
        # one request, three sizes (the selections, BAG-CLIP's knn_index, are returned by the ensemble too)
        preds = AnomalyClient(url, name).infer(pngs, class_names=names, outputs=selections)
        got = {n: np.stack([p.extra[n] for p in preds]) for n in selections}
        ref, rows = parity.reference_on_selections(stages, feed, got, 1e-4)
        assert all(r.ok for r in rows), [r.detail for r in rows]
        assert len(rows) == len(selections)
        row = parity.compare("served", url, "score", ref["score"], np.array([p.score for p in preds]), 1e-4)
        assert row.ok, (name, url, row)
        for i, p in enumerate(preds):  # exported with resize_to_input: each map at its image's size
            h, w = arrays[i].shape[:2]
            row = parity.compare("served", url, f"anomaly_map[{i}]", resize_map(ref["anomaly_map"][i], h, w),
                                 p.anomaly_map, 1e-4)
            assert row.ok, (name, url, row)
    for i in (0, 1):  # the uint8 HWC ensemble (one shape per request, so a batch of one): the same answer
        raw = AnomalyClient(srv.http_url, name).infer([arrays[i]], class_names=names[i])
        assert raw[0].score == pytest.approx(preds[i].score, rel=1e-5)


@pytest.mark.server
def test_served_head_refuses_out_of_range_neighbours(served_trained):
    """bagclip_head takes knn_index from the graph model; a client calling it directly gets a 400 for an index
    outside 0..N-1, and the server stays up."""
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    srv, _, repo = served_trained
    client = tc.InferenceServerClient(srv.http_url)
    meta = {t["name"]: t for t in client.get_model_metadata("bagclip_head")["inputs"]}
    inputs = []
    for name, t in meta.items():
        shape = [1 if d == -1 else d for d in t["shape"]]
        data = np.zeros(shape, np.int64 if t["datatype"] == "INT64" else np.float32)
        if name == "knn_index":
            data[0, 0, 0] = shape[1]  # N: one past the last patch
        inp = tc.InferInput(name, shape, t["datatype"])
        inp.set_data_from_numpy(data)
        inputs.append(inp)
    with pytest.raises(InferenceServerException, match="knn_index") as err:
        client.infer("bagclip_head", inputs)
    assert err.value.status() == "400", err.value
    assert srv.ready()


def _eager_scores(method, arrays, class_names) -> np.ndarray:
    with torch.no_grad():
        return method(_batch(method, arrays), class_names=class_names).score.numpy()


@pytest.mark.server
def test_bayespfl_class_name_is_part_of_the_request(served_trained, trained_run):
    from zsad.serve.client import AnomalyClient

    srv, _, _ = served_trained
    method = load_checkpoint(trained_run("bayespfl"))[0].eval()
    image = _images()[0]
    client = AnomalyClient(srv.http_url, "bayespfl")
    png = png_bytes(image)
    a = client.infer([png], class_names="bottle")[0]
    b = client.infer([png], class_names="wood")[0]
    ref_a, ref_b = _eager_scores(method, [image], "bottle")[0], _eager_scores(method, [image], "wood")[0]
    assert a.score == pytest.approx(float(ref_a), rel=1e-4) and b.score == pytest.approx(float(ref_b), rel=1e-4)
    assert abs(a.score - b.score) > 1e-4  # the name reaches the prompts
    with pytest.raises(ZsadError, match="class name"):
        client.infer([png])
    with pytest.raises(ZsadError, match="bad input: .*class name .* at most"):
        client.infer([png], class_names="an extremely long and wordy name of an industrial part")
    assert srv.ready()


@pytest.mark.server
def test_zsad_infer_takes_the_class_name(served_trained, trained_run, tmp_path):
    from click.testing import CliRunner

    from zsad.serve.cli import infer_main

    srv, _, _ = served_trained
    arrays = _images()[:2]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"img{i}.png")
    base = [str(folder), "--url", srv.http_url, "--model", "bayespfl", "--no-progress", "--no-heatmaps"]
    res = CliRunner().invoke(infer_main, base + ["--out", str(tmp_path / "o1")])
    assert res.exit_code != 0 and "--class-name" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(infer_main, base + ["--class-name", "bottle", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "o2" / "scores.json").read_text())
    ref = _eager_scores(load_checkpoint(trained_run("bayespfl"))[0].eval(), arrays, "bottle")
    assert got["class_name"] == "bottle"
    assert [r["score"] for r in got["images"]] == pytest.approx(ref.tolist(), rel=1e-4)


def _repo_onnx(repo, name, stages) -> dict:
    """The ONNX files a python-ort export wrote for each stage (the gated ones), to gate them in OpenVINO too."""
    return {st.name: sorted((repo / f"{name}_{st.name}" / "1").glob("model.onnx*")) for st in stages}


@pytest.mark.server
@pytest.mark.parametrize("name", METHODS)
def test_trained_stages_pass_the_openvino_and_torch_gates(served_trained, trained_run, tmp_path, name):
    _, _, repo = served_trained
    method = load_checkpoint(trained_run(name))[0].eval()
    stages = method.stages()
    files = _repo_onnx(repo, name, stages)
    images = parity.synthetic_images(method.image_size, n=4)
    names = parity.synthetic_class_names(4)
    feed = {"images": images, **{ti.tensor: ti.encode(names).numpy() for ti in method.text_inputs()}}
    runners, _, _ = OV.build_openvino_stages(method, stages, files, "fp32", tmp_path / "fp32", **QUIET)
    rows = parity.check_stages(stages, runners, feed, parity.FP32_TOL)  # raises ParityError on failure
    assert max(r.max_rel for r in rows) <= 1e-4
    if HAS_BF16:
        runners, _, _ = OV.build_openvino_stages(method, stages, files, "bf16", tmp_path / "bf16", **QUIET)
        section = OV.precision_gate(method, stages, runners, "bf16")
        assert section["passed"] and section["score_swaps"] == 0, section
        if name == "bagclip":  # bf16 moves similarities by ~1e-2: other neighbours in places, counted in the report
            n_rows = OV.GATE_IMAGES * method.backbone.info.grid ** 2
            assert 0 < section["selection_differing"]["knn_index"] < n_rows
    runners, _, info = OV.build_openvino_stages(method, stages, files, "int8", tmp_path / "int8", **QUIET)
    quantised = [q["stage"] for q in info["quantized_stages"]]
    assert quantised == ["encoder"]
    try:
        section = OV.precision_gate(method, stages, runners, "int8", quantized=quantised)
        assert section["passed"]
    except OV.PrecisionGateError as err:  # the tiny random CLIP: documented per method, one line naming the stage
        msg = str(err)
        assert "\n" not in msg and "stage 'encoder'" in msg and "int8" in msg, msg
    # python-torch serves the chain rebuilt from the checkpoint the export ships: the gate compares exactly that
    res = export_model(ExportOptions(checkpoint=str(trained_run(name)), backend="python-torch", device="cpu",
                                     out=tmp_path / "torch_repo", max_batch=2, parity_images=2), **QUIET)
    assert json.loads(res.report.read_text())["worst"] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend,precision", [("onnxruntime", "fp32"), ("openvino", "fp32"),
                                               ("python-openvino", "fp32"), ("python-openvino", "int8-bf16")])
def test_trained_bagclip_exports_on_every_cpu_backend(trained_run, tmp_path, backend, precision):
    """The method the gate refused after one epoch, exported as a user does on each remaining CPU backend
    (python-ort and python-torch above)."""
    if precision == "int8-bf16" and not HAS_BF16:
        pytest.skip("this CPU has no bf16 (AVX-512 BF16 / AMX)")
    try:
        res = export_model(ExportOptions(checkpoint=str(trained_run("bagclip")), backend=backend, precision=precision,
                                         out=tmp_path / "repo", max_batch=2, parity_images=2), **QUIET)
    except OV.PrecisionGateError as err:
        msg = str(err)
        assert "\n" not in msg and "stage 'encoder'" in msg, msg
        pytest.xfail(f"documented: {msg}")
    report = json.loads(res.report.read_text())
    assert report["trained"] and report["worst"] <= 1e-4 and report["backend"] == backend
    assert (tmp_path / "repo" / "bagclip_graph" / "config.pbtxt").is_file()
