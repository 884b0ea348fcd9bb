"""docs/protocols.md run as written: every ```lang test=NAME block is executed against a real tritonserver serving a
tiny BAG-CLIP export (curl in bash, python blocks in a subprocess that cannot import zsad or torch) and its answer is
compared with zsad's own AnomalyClient for the same image; the metric names and the miscount caveat are checked
against the server's /metrics. One export, one server start."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from zsad.export.exporter import ExportOptions, export_model
from zsad.serve.client import AnomalyClient
from zsad.serve.server import TritonServer

pytestmark = pytest.mark.server

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocols.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)
MODEL = "bagclip"
# python blocks run with only tritonclient, numpy and Pillow: importing any of these fails
NO_ZSAD = "import sys\nfor _m in ('zsad', 'torch', 'open_clip'):\n    sys.modules[_m] = None\n"


def doc_blocks() -> tuple[dict, dict]:
    """({tag: (language, code)} of the runnable blocks, {name: value} of the doc's `bash env` block)."""
    runnable, env = {}, {}
    for lang, info, code in FENCE.findall(DOC.read_text()):
        tag = re.search(r"\btest=([\w-]+)", info)
        if tag:
            assert tag.group(1) not in runnable, f"two blocks tagged {tag.group(1)}"
            runnable[tag.group(1)] = (lang, code)
        elif info.strip() == "env":
            env.update(re.findall(r"^export (ZSAD_\w+)=(\S+)", code, re.M))
    return runnable, env


BLOCKS, DOC_ENV = doc_blocks()


def metrics(srv) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def counter(text: str, name: str, model: str, reason: str | None = None) -> float:
    labels = f'model="{model}"' + (f',reason="{reason}"' if reason else "") + ',version="1"'
    m = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("protocol_docs")
    export_model(ExportOptions(model=MODEL, profile="tiny", backend="python-ort", out=work / "repo", max_batch=4,
                               parity_images=2), log=lambda *a: None)
    image = work / "image.png"  # not square, so a swapped H/W would show
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
    with TritonServer(work / "repo") as srv:
        ref = AnomalyClient(srv.http_url, MODEL).infer([image])[0]
        env = dict(os.environ, ZSAD_URL=srv.http_url, ZSAD_GRPC_URL=srv.grpc_url,
                   ZSAD_METRICS_URL=f"127.0.0.1:{srv.metrics_port}", ZSAD_MODEL=MODEL, ZSAD_IMAGE=str(image))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # python3 w/ Pillow
        yield SimpleNamespace(srv=srv, ref=ref, env=env, work=work)


def run_block(served, tag: str, env: dict | None = None) -> str:
    lang, code = BLOCKS[tag]
    if lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        assert lang == "python", lang
        cmd = [sys.executable, "-c", NO_ZSAD + code]
    res = subprocess.run(cmd, cwd=served.work, env=env or served.env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"{tag} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


def test_doc_defines_every_variable_its_blocks_use():
    assert set(BLOCKS) == {"curl-bytes", "curl-raw", "tritonclient-http", "tritonclient-grpc", "perf-analyzer",
                           "metrics", "admin-403"}
    assert set(DOC_ENV) == {"ZSAD_URL", "ZSAD_GRPC_URL", "ZSAD_METRICS_URL", "ZSAD_MODEL", "ZSAD_IMAGE"}
    used = set()
    for _, code in BLOCKS.values():
        used |= set(re.findall(r"\$\{?(ZSAD_\w+)", code)) | set(re.findall(r"environ\[\"(ZSAD_\w+)\"\]", code))
    assert used == set(DOC_ENV)


@pytest.mark.parametrize("tag", ["curl-bytes", "curl-raw"])
def test_curl_blocks_answer_the_clients_score(served, tag):
    answer = json.loads(run_block(served, tag))
    (out,) = answer["outputs"]
    assert out["name"] == "score" and out["shape"] == [1, 1]
    assert abs(out["data"][0] - served.ref.score) <= 1e-5


@pytest.mark.parametrize("tag", ["tritonclient-http", "tritonclient-grpc"])
def test_tritonclient_blocks_answer_the_clients_score_and_map(served, tag):
    text = run_block(served, tag)
    score = float(re.search(r"^score (\S+)$", text, re.M).group(1))
    shape, mean = re.search(r"^anomaly_map \(([\d, ]+)\) mean (\S+)$", text, re.M).groups()
    assert abs(score - served.ref.score) <= 1e-5
    assert tuple(int(d) for d in shape.split(",")) == (1,) + served.ref.anomaly_map.shape
    assert abs(float(mean) - float(served.ref.anomaly_map.mean())) <= 1e-5


def test_python_blocks_cannot_import_zsad(served):
    res = subprocess.run([sys.executable, "-c", NO_ZSAD + "import zsad"], capture_output=True, text=True)
    assert res.returncode != 0 and "import of zsad halted" in res.stderr


def test_admin_block_is_refused_without_the_key(served):
    answer = json.loads(run_block(served, "admin-403"))
    assert answer == {"error": "This API is restricted, expecting header 'zsad-admin-key'"}


def test_metric_names_in_the_doc_are_the_servers(served):
    run_block(served, "curl-bytes")  # at least one request through the ensemble
    text = metrics(served.srv)
    served_names = set(re.findall(r"^# HELP (nv_\w+)", text, re.M))
    table = set(re.findall(r"^\| `(nv_\w+)`", DOC.read_text(), re.M))
    assert len(table) >= 10 and table <= served_names, table - served_names
    lines = run_block(served, "metrics").splitlines()
    assert lines and all(line.startswith(("nv_inference_request_success{", "nv_inference_request_failure{",
                                          "nv_inference_count{")) and f'model="{MODEL}"' in line for line in lines)
    assert counter("\n".join(lines), "nv_inference_request_success", MODEL) >= 1


def _send_undecodable(srv) -> int:
    blob = b"not an image"
    header = json.dumps({"inputs": [{"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob) + 4}}]}).encode()
    body = header + len(blob).to_bytes(4, "little") + blob
    req = urllib.request.Request(f"http://{srv.http_url}/v2/models/{MODEL}/infer", data=body,
                                 headers={"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"})
    try:
        urllib.request.urlopen(req, timeout=60)
        return 200
    except urllib.error.HTTPError as err:
        return err.code


def test_python_backend_failures_are_miscounted_as_the_doc_says(served):
    pre = f"{MODEL}_preprocess"

    def snapshot():
        t = metrics(served.srv)
        return (counter(t, "nv_inference_request_success", pre),
                sum(counter(t, "nv_inference_request_failure", pre, r) for r in ("REJECTED", "CANCELED", "BACKEND",
                                                                                 "OTHER")),
                counter(t, "nv_inference_request_failure", MODEL, "OTHER"),
                counter(t, "nv_inference_request_success", MODEL))

    before = snapshot()
    assert _send_undecodable(served.srv) == 400
    deadline = time.monotonic() + 5
    while (after := snapshot()) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    # preprocess: +1 success, no failure; ensemble: +2 failures (OTHER), no success
    assert np.subtract(after, before).tolist() == [1, 0, 2, 0]


@pytest.fixture(scope="module")
def perf_analyzer() -> str:
    path = os.environ.get("ZSAD_PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not path:
        pytest.skip("no perf_analyzer (set ZSAD_PERF_ANALYZER or put it on PATH; setup in docs/protocols.md)")
    res = subprocess.run([path, "--version"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"perf_analyzer at {path} does not start (see docs/protocols.md for its libraries): "
                    f"{(res.stderr or res.stdout).strip()[:200]}")
    return path


def test_perf_analyzer_block_measures_without_failures(perf_analyzer, served):  # skips before the server starts
    path = perf_analyzer
    env = dict(served.env, PATH=os.pathsep.join([str(Path(path).parent), served.env["PATH"]]))
    t0 = metrics(served.srv)
    run_block(served, "perf-analyzer", env)
    t1 = metrics(served.srv)
    rows = (served.work / "perf.csv").read_text().splitlines()
    assert rows[0].startswith("Concurrency,Inferences/Second")
    table = {int(r.split(",")[0]): float(r.split(",")[1]) for r in rows[1:] if r and r[0].isdigit()}
    assert set(table) == {1, 2} and min(table.values()) > 0, rows
    # the input file decoded as an image every time: the ensemble answered, and failed nothing
    assert counter(t1, "nv_inference_request_success", MODEL) - counter(t0, "nv_inference_request_success", MODEL) > 0
    assert counter(t1, "nv_inference_request_failure", MODEL, "OTHER") == \
        counter(t0, "nv_inference_request_failure", MODEL, "OTHER")
