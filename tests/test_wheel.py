"""The wheel holds everything: built from the tree, installed NON-editable into a fresh venv, it exports, serves and
answers (the repository README's curl example, run as written; a base64 JSON request gets a 400 that says what to
do). The fresh venv borrows the dev venv's third-party packages through a .pth (torch etc. are not reinstalled);
the dev venv's editable zsad finder is not on that path, so zsad comes from the wheel alone."""
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp / "dist"),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # setuptools' own warnings (license format, unlisted packages, package data) must not come back; pip's
    # "byte-compiling is disabled" notes are its environment, not the project
    warnings = [ln for ln in build.stdout.splitlines() if re.search(r"warn", ln, re.I) and "byte-compiling" not in ln]
    assert not warnings, warnings
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    wheel = next((tmp / "dist").glob("zsad-*.whl"))
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dev_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
    return py, tmp


def test_wheel_installs_and_exports_serves_answers(wheel_venv):
    py, tmp = wheel_venv
    script = textwrap.dedent(f"""
        import base64, io, json, subprocess, sys, urllib.error, urllib.request
        from pathlib import Path
        import numpy as np
        from PIL import Image
        import zsad
        from zsad.export.exporter import ExportOptions, export_model
        from zsad.serve.client import AnomalyClient
        from zsad.serve.server import TritonServer

        repo = Path({str(tmp / "repo")!r})
        export_model(ExportOptions(model="bagclip", profile="tiny", backend="python-ort", out=repo, max_batch=2,
                                   parity_images=2), log=lambda *a: None)
        readme = (repo / "bagclip" / "README.md").read_text()
        curl = readme.split("## Query with curl")[1].split("```bash")[1].split("```")[0]
        arr = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
        img = repo.parent / "image.png"
        Image.fromarray(arr).save(img)
        with TritonServer(repo) as srv:
            url = "http://" + srv.http_url
            run = subprocess.run(["bash", "-c", curl.replace("URL=http://localhost:8000", "URL=" + url)],
                                 cwd=img.parent, capture_output=True, text=True)
            answer = json.loads(run.stdout)
            assert "outputs" in answer, (answer, run.stderr)
            curl_score = answer["outputs"][0]["data"][0]
            raw_score = float(AnomalyClient(srv.http_url, "bagclip").infer([arr])[0].score)  # NAME_raw
            body = json.dumps({{"inputs": [{{"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES",
                                           "data": [base64.b64encode(img.read_bytes()).decode()]}}]}}).encode()
            try:
                urllib.request.urlopen(urllib.request.Request(url + "/v2/models/bagclip/infer", data=body))
                b64 = (200, "")
            except urllib.error.HTTPError as err:
                b64 = (err.code, err.read().decode())
        print(json.dumps({{"zsad": zsad.__file__, "curl": curl_score, "raw": raw_score, "b64": b64}}))
    """)
    res = subprocess.run([str(py), "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["zsad"].startswith(str(tmp / "venv")), out["zsad"]  # the wheel's copy, not the editable tree
    assert abs(out["curl"] - out["raw"]) <= 1e-5 * max(1.0, abs(out["raw"]))  # PNG bytes == the same pixels
    code, text = out["b64"]
    assert code == 400 and "binary-data extension" in text, out["b64"]
