"""Every registered method, trained, through every comparison the project makes (issue 27).

The comparisons had met only untrained weights, and a BAG-CLIP trained for one epoch could not be exported (its
clustered patch features put the kNN selection on near-ties). Here each method is trained at the tiny profile
(tests/conftest.py ``trained_run``), then, with the default gates:

- exported to a python-ort repository (ONNX + the fp32 parity gate), all five served by one real tritonserver and
  compared with eager over HTTP and gRPC (selections by the tie rule, everything else at 1e-4);
- the same ONNX stages through OpenVINO at fp32 (the parity gate), bf16 (where the CPU has it) and int8 (the
  precision gate), and the python-torch export (the chain rebuilt from the shipped checkpoint);
- BAG-CLIP, the method that broke, through export_model on every other CPU backend as a user runs it.

int8 on the tiny profile's random-weight CLIP is not what int8 is calibrated for: where its gate refuses a method,
the refusal must be one line naming the quantised stage (docs/methods/*.md record which, measured).
"""
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import zsad.methods as M
from zsad.checkpoint import load_checkpoint
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
                                                max_batch=4, parity_images=4), **QUIET)
               for name in METHODS}
    with TritonServer(repo) as srv:
        yield srv, results, repo


@pytest.mark.server
def test_trained_exports_pass_the_default_gate(served_trained):
    _, results, _ = served_trained
    for name, res in results.items():
        report = json.loads(res.report.read_text())
        assert report["trained"] and report["tolerance"] == 1e-4 and report["worst"] <= 1e-4, name
        assert all(r["ok"] for r in report["rows"])
        if name == "bagclip":  # the selection rows are reported, with their count and largest gap
            assert report["selections"]["max_tie_gap"] < 1e-3 and report["selections"]["differing"] >= 0


def _images():
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, render_sample

    return [render_sample(SYNTHETIC_TEST_CLASSES[i], "test_defect" if i < 3 else "test_good", 40 + i,
                          image_size=s).image for i, s in enumerate((224, 256, 200, 224))]


@pytest.mark.server
@pytest.mark.parametrize("name", METHODS)
def test_trained_served_equals_eager(served_trained, trained_run, name):
    from zsad.data import preprocess
    from zsad.serve.client import AnomalyClient

    srv, _, _ = served_trained
    method = load_checkpoint(trained_run(name))[0].eval()
    stages = method.stages()
    selections = [n for st in stages for n in st.selections]
    arrays = _images()
    names = ["gravel", "tissue", "nut", "capsule"]
    x = torch.from_numpy(np.stack([preprocess(a, method.image_size) for a in arrays]))
    feed = {k: v.numpy() for k, v in method.stage_inputs(x, names).items()}
    pngs = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        pngs.append(buf.getvalue())
    for url in (srv.http_url, f"grpc://{srv.grpc_url}"):
        preds = AnomalyClient(url, name).infer(pngs, class_names=names, outputs=selections)
        got = {"score": np.array([p.score for p in preds]), "anomaly_map": np.stack([p.anomaly_map for p in preds]),
               **{n: np.stack([p.extra[n] for p in preds]) for n in selections}}
        ref, rows = parity.reference_on_selections(stages, feed, got, 1e-4)
        assert all(r.ok for r in rows), [r.detail for r in rows]
        assert len(rows) == len(selections)
        for key in ("score", "anomaly_map"):
            row = parity.compare("served", url, key, ref[key], got[key], 1e-4)
            assert row.ok, (name, url, row)


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
