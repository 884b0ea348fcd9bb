"""The backends zsad-bench times, each a way to run a method's stage chain on a batch of images.

Every runner maps a CPU float32 image batch to (score [B], anomaly_map [B,S,S]) numpy arrays for the parity check,
and exposes ``step()`` for timing, which runs on inputs already placed where the backend wants them (so a torch
CUDA timing excludes the host-to-device copy of the images; ORT's includes its numpy in/out, as ORT is used).
A backend that cannot run here raises ``Skip`` with the reason, which lands in the report.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

BACKENDS = ("torch-fp32", "torch-fp16", "torch-bf16", "torch-compile", "cuda-graphs", "ort", "tensorrt", "served")
GPU_ONLY = {"torch-fp16": "fp16 matmuls are a GPU feature (CPU fp16 is emulated and slow, not a deployment target)",
            "cuda-graphs": "CUDA graphs need CUDA"}


class Skip(Exception):
    """This backend cannot run here; the message is the reason recorded in the report."""


@dataclass
class Runner:
    backend: str
    precision: str
    predict: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]
    make_step: Callable[[torch.Tensor], Callable[[], object]]  # images -> zero-argument timed call
    note: str = ""


def stage_feed(method, images):
    """The stage chain's inputs for a benchmark batch: the images, plus the synthetic images' class names for
    methods that take text per image (Bayes-PFL), so every backend sees what the torch reference saw."""
    from zsad.export.parity import synthetic_class_names

    return method.stage_inputs(images, synthetic_class_names(images.shape[0]) if method.text_inputs() else None)


def _chain(method):
    from zsad.methods import run_stages

    stages = method.stages()

    def run(images):
        env = run_stages(stages, **stage_feed(method, images))
        return env["score"], env["anomaly_map"]

    return run


def _numpy(out) -> tuple[np.ndarray, np.ndarray]:
    return out[0].float().cpu().numpy(), out[1].float().cpu().numpy()


def _torch_runner(method, device: str, backend: str) -> Runner:
    method = method.to(device).eval()
    chain = _chain(method)
    dtype = {"torch-fp16": torch.float16, "torch-bf16": torch.bfloat16}.get(backend)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    # inference_mode tensors cannot be traced by torch.compile ("Cannot set version_counter"): no_grad there
    grad_off = torch.no_grad if backend == "torch-compile" else torch.inference_mode

    def call(x):
        with grad_off(), torch.autocast(dev_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return chain(x)

    fn = call
    note = ""
    if backend == "torch-compile":
        fn = torch.compile(call, dynamic=False)
        note = "torch.compile default mode (inductor)"
    if backend == "cuda-graphs":
        return _cuda_graph_runner(call, device)
    try:
        fn(torch.zeros(1, 3, method.image_size, method.image_size, device=device))
        if dev_type == "cuda":
            torch.cuda.synchronize()
    except Exception as err:  # e.g. no autocast kernel for this dtype on this device, or no compiler
        raise Skip(f"{backend} failed on {device}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from err

    def make_step(x):
        xd = x.to(device)
        return lambda: fn(xd)

    precision = {"torch-fp16": "fp16", "torch-bf16": "bf16"}.get(backend, "fp32")
    return Runner(backend, precision, lambda x: _numpy(fn(x.to(device))), make_step, note)


def _cuda_graph_runner(call, device: str) -> Runner:
    graphs: dict = {}

    def graph_for(x):
        key = tuple(x.shape)
        if key not in graphs:
            static_in = x.to(device).clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm up kernels / allocator outside the capture
                    call(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = call(static_in)
            graphs[key] = (g, static_in, static_out)
        return graphs[key]

    def predict(x):
        g, static_in, static_out = graph_for(x)
        static_in.copy_(x.to(device))
        g.replay()
        return _numpy(static_out)

    def make_step(x):
        g, static_in, _ = graph_for(x)
        static_in.copy_(x.to(device))
        return g.replay

    return Runner("cuda-graphs", "fp32", predict, make_step, "torch.cuda.CUDAGraph per batch size, fp32")


def _ort_runner(method, device: str, workdir: Path, max_batch: int) -> Runner:
    from zsad.export.onnx_export import export_stage
    from zsad.export.parity import ort_runner

    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("onnxruntime has no CUDA provider in this environment (install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    stages = method.stages()
    runs = [(st, ort_runner(export_stage(st, workdir / f"{st.name}.onnx", max(max_batch, 2)), providers))
            for st in stages]

    def predict(x):
        env = {k: v.cpu().numpy() for k, v in stage_feed(method, x.cpu()).items()}
        for st, run in runs:
            env.update(run({n: env[n] for n in st.inputs}))
        return env["score"], env["anomaly_map"]

    def make_step(x):
        xc = x.cpu()
        return lambda: predict(xc)

    return Runner("ort", "fp32", predict, make_step,
                  f"ONNX Runtime {ort.__version__}, {providers[0]}, one session per stage")


def make_runner(backend: str, method, device: str, max_batch: int, workdir: Path | None = None) -> Runner:
    cuda = device.startswith("cuda")
    if backend in GPU_ONLY and not cuda:
        raise Skip(GPU_ONLY[backend] + ("" if torch.cuda.is_available() else "; no CUDA device on this machine"))
    if cuda and not torch.cuda.is_available():
        raise Skip("no CUDA device on this machine")
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise Skip("TensorRT is not installed here (pip install 'zsad[gpu]' on a TensorRT machine)") from None
        raise Skip("time TensorRT through the served mode (zsad-export --backend tensorrt + a GPU tritonserver)")
    if backend == "ort":
        return _ort_runner(method, device, workdir or Path(tempfile.mkdtemp(prefix="zsad-bench-")), max_batch)
    if backend.startswith("torch-") or backend == "cuda-graphs":
        return _torch_runner(method, device, backend)
    raise Skip(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
