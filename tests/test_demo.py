"""`make demo`'s script end to end (one epoch, to keep the suite fast): every promised file appears, the exported
model is served by a real tritonserver and scored."""
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
def test_demo_runs_offline(tmp_path):
    spec = importlib.util.spec_from_file_location("zsad_demo", ROOT / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    result = demo.run(tmp_path, "bagclip", epochs=1, progress=False)
    ckpt = tmp_path / "bagclip-tiny"
    assert (ckpt / "checkpoint.safetensors").is_file() and (ckpt / "history.csv").is_file()
    report = json.loads((ckpt / "eval" / "metrics.json").read_text())
    assert report["dataset"] == "synthetic" and set(report["per_class"]) == {"gravel", "tissue", "nut", "capsule"}
    assert 0.0 <= report["mean"]["pixel_auroc"] <= 1.0 and report["note"]  # random-weight note is recorded
    pngs = list((ckpt / "eval" / "heatmaps").rglob("*.png"))
    assert len(pngs) == 16 and Image.open(pngs[0]).mode == "RGB"
    assert (tmp_path / "data" / "preview.png").is_file()
    assert set(result["steps"]) == {"data", "train", "evaluate", "export", "serve", "bench"}
    assert (tmp_path / "model_repository" / "bagclip" / "parity_report.json").is_file()
    scored = (tmp_path / "served" / "scores.csv").read_text().splitlines()
    assert len(scored) > 2 and all(line.split(",")[2] in ("OK", "NG") for line in scored[1:])
