"""The backends zsad-bench times, each a way to run a method's stage chain on a batch of images.

``make_backend_runner(backend, ...)`` returns a ``BackendRunner``: ``predict`` maps a CPU float32 image batch to
{"score" [B], "anomaly_map" [B,S,S], and the chain's selections (zsad.selection)} numpy arrays for the parity
check, and ``make_step(images)`` returns the call that
is timed, which runs on inputs already placed where the backend wants them (so a torch CUDA timing excludes the
host-to-device copy of the images; ORT's includes its numpy in/out, as ORT is used). A backend that cannot run
here raises ``Skip`` with the reason, which lands in the report.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("torch-fp32", "torch-fp16", "torch-bf16", "torch-compile", "cuda-graphs", "cuda-graphs-fp16",
            "cuda-graphs-bf16", "ort", "ort-int8", "openvino-fp32", "openvino-bf16", "openvino-int8",
            "openvino-int8-bf16", "tensorrt", "served")
GPU_ONLY = {"torch-fp16": "fp16 matmuls are a GPU feature (CPU fp16 is emulated and slow, not a deployment target)",
            "cuda-graphs": "CUDA graphs need CUDA", "cuda-graphs-fp16": "CUDA graphs need CUDA",
            "cuda-graphs-bf16": "CUDA graphs need CUDA"}
# autocast dtype per backend: matmuls/convs in half precision, LayerNorm / softmax / reductions kept in fp32 by
# autocast's own op lists (CLIP's residual stream overflows fp16 in LayerNorm otherwise)
AUTOCAST = {"torch-fp16": torch.float16, "torch-bf16": torch.bfloat16, "cuda-graphs-fp16": torch.float16,
            "cuda-graphs-bf16": torch.bfloat16}


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


def stage_feed(method, images):
    """The stage chain's inputs for a benchmark batch (zsad.data.feeds.synthetic_feed), so every backend sees what
    the torch reference saw."""
    from zsad.data.feeds import synthetic_feed

    return synthetic_feed(method, images)


def chain_outputs(stages) -> list[str]:
    """What a backend's ``predict`` returns: the score, the map, and every selection of the chain."""
    return ["score", "anomaly_map", *[n for st in stages for n in st.selections]]


def _chain(method):
    from zsad.methods import run_stages

    stages = method.stages()
    names = chain_outputs(stages)

    def run(images):
        env = run_stages(stages, **stage_feed(method, images))
        return {n: env[n] for n in names}

    return run


def _numpy(out: dict) -> dict[str, np.ndarray]:
    return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in out.items()}


def _torch_runner(method, device: str, backend: str) -> BackendRunner:
    method = method.to(device).eval()
    chain = _chain(method)
    dtype = AUTOCAST.get(backend)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    names: dict[torch.dtype | None, str] = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    precision = names.get(dtype, "fp32")
    if backend.startswith("cuda-graphs"):
        return _cuda_graph_runner(method, device, backend, precision, dtype)

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
    try:
        fn(torch.zeros(1, 3, method.image_size, method.image_size, device=device))
        if dev_type == "cuda":
            torch.cuda.synchronize()
    except Exception as err:  # e.g. no autocast kernel for this dtype on this device, or no compiler
        raise Skip(f"{backend} failed on {device}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from err

    def make_step(x):
        xd = x.to(device)
        return lambda: fn(xd)

    return BackendRunner(backend, precision, lambda x: _numpy(fn(x.to(device))), make_step, note)


class GraphedChain:
    """A method's whole stage chain captured as one CUDA graph per input shape, replayed on static buffers.

    The chain's inputs (images, and Bayes-PFL's class-name token ids, tokenised on the host before capture) are
    copied into static tensors; one replay runs every kernel of the chain, the Triton ones included (``dispatch``
    picks them for CUDA tensors at inference), with no Python in between. Capture follows the PyTorch recipe:
    warm-up iterations on a side stream first (Triton JIT compilation, cuBLAS handles and the allocator's pool all
    happen there, outside the capture), and autocast with ``cache_enabled=False`` (its weight-cast cache would
    otherwise hold tensors freed after capture). Nothing in the chain may synchronise with the host
    (``capture_hazards`` checks that on the CPU).
    """

    def __init__(self, method, device: str, dtype: torch.dtype | None = None, warmup: int = 3):
        from zsad.methods import run_stages

        self.method, self.device, self.dtype, self.warmup = method, device, dtype, warmup
        self.stages = method.stages()
        self._run_stages = run_stages
        self.graphs: dict = {}

    def _forward(self, feed: dict) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), torch.autocast("cuda", dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None, cache_enabled=False):
            env = self._run_stages(self.stages, **feed)
            return {n: env[n] for n in chain_outputs(self.stages)}

    def _capture(self, feed: dict):
        static = {k: v.to(self.device).clone() for k, v in feed.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(static)
        return graph, static, out

    def load(self, images: torch.Tensor):
        """Copy a batch into the static inputs of its shape's graph (captured on first use); returns the graph and
        its static outputs (``chain_outputs``: score [B], anomaly_map [B,S,S], selections), valid after
        ``graph.replay()``."""
        feed = stage_feed(self.method, images.cpu())
        key = tuple((k, tuple(v.shape)) for k, v in sorted(feed.items()))
        if key not in self.graphs:
            self.graphs[key] = self._capture(feed)
        graph, static, out = self.graphs[key]
        for k, v in feed.items():
            static[k].copy_(v.to(self.device))
        return graph, out

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        graph, out = self.load(images)
        graph.replay()
        return out


def _cuda_graph_runner(method, device: str, backend: str, precision: str, dtype) -> BackendRunner:
    graphed = GraphedChain(method, device, dtype)
    try:
        graphed(torch.zeros(1, 3, method.image_size, method.image_size))
        torch.cuda.synchronize()
    except Exception as err:  # a capture error names the op that synchronised or allocated outside the pool
        raise Skip(f"{backend} capture failed on {device}: {type(err).__name__}: "
                   f"{str(err).splitlines()[0][:200]}") from err

    def make_step(x):
        graph, _ = graphed.load(x)
        return graph.replay

    return BackendRunner(backend, precision, lambda x: _numpy(graphed(x)), make_step,
                  f"whole chain as one torch.cuda.CUDAGraph per batch size, {precision}"
                  + (" autocast" if dtype is not None else ""))


# ops that make the host wait for the device (a value read back, an output whose size depends on the data):
# each breaks CUDA-graph capture and stalls the pipeline even when not captured
_READ = "a tensor value read on the host (.item(), bool/int/float(tensor), `if tensor:`)"
_MASK = "nonzero / argwhere / boolean-mask indexing (data-dependent output size)"
SYNC_OPS = {"_local_scalar_dense": _READ, "item": _READ, "is_nonzero": _READ, "nonzero": _MASK,
            "masked_select": "masked_select (data-dependent output size)",
            "_unique2": "unique (data-dependent output size)", "unique_dim": "unique (data-dependent output size)",
            "unique_consecutive": "unique_consecutive (data-dependent output size)",
            "lift_fresh": "torch.tensor(...) from host data inside the chain (a host-to-device copy on a GPU)"}


def capture_hazards(method, images: torch.Tensor) -> list[str]:
    """What in ``method``'s stage chain would break CUDA-graph capture, found on the CPU: ops that synchronise
    with the host (``SYNC_OPS``, seen by a dispatch mode), and tensors created without an explicit device (run
    with the default device set to ``meta``: such a tensor is meta, and mixing it with the real ones fails; on a GPU
    it would be a CPU tensor copied to the device on every call). Empty list: capturable as far as the CPU can tell.
    The chain's inputs are made outside, as the graph runner does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from zsad.methods import run_stages

    found: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func._schema.name.split("::")[-1]
            why = SYNC_OPS.get(op)
            if op.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                why = _MASK  # x[mask] / x[mask] = v: a nonzero inside
            if why and why not in found:
                found.append(why)
            return func(*args, **(kwargs or {}))

    feed = stage_feed(method, images)
    stages = method.eval().stages()
    with torch.inference_mode(), Watch():
        run_stages(stages, **feed)
    try:
        with torch.inference_mode(), torch.device("meta"):
            run_stages(stages, **feed)
    except Exception as err:
        found.append(f"a tensor made without an explicit device: {type(err).__name__}: {str(err).splitlines()[0]}")
    return found


def _stage_chain_runner(method, runs, backend: str, precision: str, note: str, profilers=None) -> BackendRunner:
    """A BackendRunner over per-stage callables ``runs`` [(stage, feed dict -> output dict)], with per-stage timing;
    ``profilers`` {stage name: feed dict -> {kind: ms}} give the op profile of those stages."""
    from zsad.methods.base import walk_stages

    stages = [st for st, _ in runs]
    by_name = {st.name: run for st, run in runs}

    def walk(x, on_stage=None):
        feed = {k: v.cpu().numpy() for k, v in stage_feed(method, x.cpu()).items()}
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
    """What the CPU backends of one model's bench run share: one ONNX export of the stages (made on first use, at
    the run's largest batch) and one set of calibration images, so ort, ort-int8 and each openvino precision do not
    re-export a ViT-L or re-render the calibration set."""

    def __init__(self, workdir: Path | None = None, calibration_images: int = 16):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zsad-bench-"))
        self.calibration_images = calibration_images
        self._onnx: dict | None = None
        self._calibration: np.ndarray | None = None

    def onnx(self, method, max_batch: int) -> dict:
        """{stage name: [model.onnx]} of ``method``'s stages (each exported once, with its own parity check)."""
        from zsad.export.onnx_export import export_stage

        if self._onnx is None:
            self._onnx = {st.name: [export_stage(st, self.workdir / "onnx" / st.name / "model.onnx",
                                                 max(max_batch, 2))] for st in method.stages()}
        return self._onnx

    def calibration(self, method) -> np.ndarray:
        """Preprocessed calibration images [N,3,S,S] from the synthetic training classes."""
        from zsad.export.openvino_export import calibration_images

        if self._calibration is None:
            self._calibration = calibration_images(None, method.image_size, self.calibration_images)
        return self._calibration


def _openvino_runner(method, scratch: Scratch, max_batch: int, precision: str) -> BackendRunner:
    try:
        from zsad.export.openvino_export import (
            QUANTIZED,
            build_openvino_stages,
            check_precision,
            op_profile,
            require_openvino,
        )

        ov = require_openvino()
        check_precision(precision)
    except Exception as err:  # not installed, or no bf16 on this CPU
        raise Skip(str(err)) from None
    stages = method.stages()
    cal = scratch.calibration(method) if precision in QUANTIZED else None
    runners, files, info = build_openvino_stages(method, stages, scratch.onnx(method, max_batch), precision,
                                                 scratch.workdir / f"openvino-{precision}", cal, log=lambda *a: None)
    profilers = {st.name: lambda feed, xml=files[st.name][0]: op_profile(ov.Core().read_model(str(xml)), precision,
                                                                        feed) for st in stages}
    quant = ""
    if cal is not None:  # int8, int8-bf16
        quant = (f"; int8 stages {[q['stage'] for q in info['quantized_stages']]} (NNCF, {len(cal)} synthetic "
                 f"calibration images)")
    return _stage_chain_runner(method, [(st, runners[st.name]) for st in stages], f"openvino-{precision}", precision,
                               f"OpenVINO {ov.__version__} CPU, INFERENCE_PRECISION_HINT "
                               f"{info['inference_precision_hint']}{quant}, one compiled model per stage", profilers)


def _ort_int8_runner(method, scratch: Scratch, max_batch: int) -> BackendRunner:
    """ONNX Runtime static int8 (QDQ, per-channel weights) of the encoder's MatMul/Conv, calibrated on the synthetic
    set's training classes; CLIP's final projection (found by value) stays fp32, as in the OpenVINO int8 path."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from zsad.export.openvino_export import stage_calibration_feeds
    from zsad.export.parity import ort_runner
    from zsad.methods.base import EncoderStage

    class Reader(CalibrationDataReader):
        """The calibration feeds, one image per step; ``set_range`` lets ORT calibrate in strides (below)."""

        def __init__(self, feeds):
            self.feeds = feeds
            self.set_range(0, len(feeds))

        def __len__(self):
            return len(self.feeds)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(self.feeds[start_index:end_index])

        def get_next(self):
            return next(self.it, None)

    stages = method.stages()
    files = scratch.onnx(method, max_batch)
    proj = method.backbone.visual.proj.detach().cpu().numpy()
    cal = scratch.calibration(method)
    runs = []
    for st in stages:
        path = files[st.name][0]
        if isinstance(st.module, EncoderStage):
            model = onnx.load(str(path))
            inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
            keep = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(
                i in inits and any(inits[i].shape == p.shape and np.array_equal(inits[i], p) for p in (proj, proj.T))
                for i in n.input)]
            feeds = stage_calibration_feeds(method, stages, st, cal)
            qpath = scratch.workdir / "ort-int8" / st.name / "model.onnx"
            qpath.parent.mkdir(parents=True, exist_ok=True)
            quantize_static(str(path), str(qpath), Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul", "Conv", "Gemm"], nodes_to_exclude=keep,
                            # min/max one image at a time, merged: ORT otherwise holds every intermediate tensor of
                            # every calibration image (a paper-profile ViT-L ran a 24 GB machine out of memory)
                            extra_options={"CalibStridedMinMax": 1})
            path = qpath
        runs.append((st, ort_runner(path)))
    return _stage_chain_runner(method, runs, "ort-int8", "int8",
                               f"ONNX Runtime {ort.__version__} CPU, static int8 QDQ (per-channel weights) of the "
                               f"encoder's MatMul/Conv, final projection fp32, {len(cal)} synthetic calibration images")


def _ort_runner(method, device: str, scratch: Scratch, max_batch: int) -> BackendRunner:
    import onnxruntime as ort

    from zsad.export.parity import ort_runner

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("onnxruntime has no CUDA provider in this environment (install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    stages = method.stages()
    files = scratch.onnx(method, max_batch)
    runs = [(st, ort_runner(files[st.name][0], providers)) for st in stages]
    return _stage_chain_runner(method, runs, "ort", "fp32",
                               f"ONNX Runtime {ort.__version__}, {providers[0]}, one session per stage")


def make_backend_runner(backend: str, method, device: str, max_batch: int,
                        scratch: Scratch | None = None) -> BackendRunner:
    """The runner of ``backend``; ``scratch`` is shared by the calls of one model's run (ONNX exported once)."""
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
        return _ort_runner(method, device, scratch or Scratch(), max_batch)
    if backend in ("ort-int8",) or backend.startswith("openvino-"):
        if cuda:
            raise Skip(f"{backend} is a CPU backend: run it with --device cpu")
        scratch = scratch or Scratch()
        if backend == "ort-int8":
            return _ort_int8_runner(method, scratch, max_batch)
        return _openvino_runner(method, scratch, max_batch, backend.split("-", 1)[1])
    if backend.startswith(("torch-", "cuda-graphs")):
        return _torch_runner(method, device, backend)
    raise Skip(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
