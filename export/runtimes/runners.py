"""What a runtime hands zsad-bench: a ``BackendRunner`` over a method's stage chain, and the shared pieces.

``predict`` maps a CPU float32 image batch to {"score" [B], "anomaly_map" [B,S,S], and the chain's selections
(zsad.selection)} numpy arrays for the parity check, and ``make_step(images)`` returns the call that is timed, which
runs on inputs already placed where the backend wants them (so a torch CUDA timing excludes the host-to-device copy
of the images; ORT's includes its numpy in/out, as ORT is used). A backend that cannot run here raises ``Skip`` with
the reason, which lands in the report.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zsad.data.feeds import synthetic_feed


class Skip(Exception):
    """This backend cannot run here; the message is the reason recorded in the report."""


@dataclass
class BackendRunner:
    """One backend of one method, ready to run (see the module docstring)."""

    backend: str
    precision: str
    predict: Callable[[torch.Tensor], dict[str, np.ndarray]]
    make_step: Callable[[torch.Tensor], Callable[[], object]]  # images -> zero-argument timed call
    note: str = ""
    # per-stage timing (ORT / OpenVINO backends): images -> [(stage name, zero-argument call of that stage alone)]
    stage_steps: Callable[[torch.Tensor], list] | None = None
    # inside the stages (OpenVINO): images -> {stage name: {kind of node: ms}}, see openvino_export.op_profile
    op_profile: Callable[[torch.Tensor], dict] | None = None


def chain_outputs(stages) -> list[str]:
    """What a backend's ``predict`` returns: the score, the map, and every selection of the chain."""
    return ["score", "anomaly_map", *[n for st in stages for n in st.selections]]


def as_numpy(out: dict) -> dict[str, np.ndarray]:
    return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in out.items()}


def stage_chain_runner(method, runs, backend: str, precision: str, note: str, profilers=None) -> BackendRunner:
    """A BackendRunner over per-stage callables ``runs`` [(stage, feed dict -> output dict)], with per-stage timing;
    ``profilers`` {stage name: feed dict -> {kind: ms}} give the op profile of those stages."""
    from zsad.methods.stages import walk_stages

    stages = [st for st, _ in runs]
    by_name = {st.name: run for st, run in runs}

    def walk(x, on_stage=None):
        feed = {k: v.cpu().numpy() for k, v in synthetic_feed(method, x.cpu()).items()}
        return walk_stages(stages, feed, lambda st, inputs: by_name[st.name](inputs), on_stage=on_stage)

    def predict(x):
        env = walk(x)
        return {n: env[n] for n in chain_outputs(stages)}

    def make_step(x):
        xc = x.cpu()
        return lambda: predict(xc)

    def stage_feeds(x):
        """[(stage, run, its real inputs)]: the chain run once, each stage's inputs kept."""
        out: list[tuple] = []
        walk(x, on_stage=lambda st, inputs, _: out.append((st, by_name[st.name], inputs)))
        return out

    def stage_steps(x):
        return [(st.name, lambda run=run, feed=feed: run(feed)) for st, run, feed in stage_feeds(x)]

    def op_profile(x):
        return {st.name: profilers[st.name](feed) for st, _, feed in stage_feeds(x) if st.name in profilers}

    return BackendRunner(backend, precision, predict, make_step, note, stage_steps,
                         op_profile if profilers else None)


class Scratch:
    """What the CPU backends of one model's bench run share, through files in ``workdir``: one ONNX export of the
    stages (made on first use, at the run's largest batch) and one set of calibration images, so ort, ort-int8 and
    each openvino precision do not re-export a ViT-L or re-render the calibration set. Files, not memory: each
    backend runs in its own worker process (zsad.bench.worker), which opens a Scratch on the same ``workdir``.
    The backends run one after another, so nothing is written by two at once."""

    def __init__(self, workdir: str | Path | None = None, calibration_images: int = 16):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zsad-bench-"))
        self.calibration_images = calibration_images

    def onnx(self, method, max_batch: int) -> dict:
        """{stage name: [model.onnx]} of ``method``'s stages (each exported once, with its own parity check; the
        marker file is written last, so an export cut short is made again)."""
        from zsad.export.onnx_export import export_stage

        files = {st.name: [self.workdir / "onnx" / st.name / "model.onnx"] for st in method.stages()}
        done = self.workdir / "onnx" / "exported"
        if not done.is_file():
            for st in method.stages():
                export_stage(st, files[st.name][0], max(max_batch, 2))
            done.write_text("every stage exported\n")
        return files

    def calibration(self, method) -> np.ndarray:
        """Preprocessed calibration images [N,3,S,S] from the synthetic training classes (rendered once, kept as
        .npy: read back without pickle)."""
        from zsad.export.openvino_export import calibration_images

        path = self.workdir / f"calibration-{self.calibration_images}.npy"
        if not path.is_file():
            np.save(path.with_suffix(".tmp.npy"), calibration_images(None, method.image_size, self.calibration_images))
            path.with_suffix(".tmp.npy").rename(path)
        return np.load(path, allow_pickle=False)
