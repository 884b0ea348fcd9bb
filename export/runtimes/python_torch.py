"""``python-torch``: the whole PyTorch stage chain in one python model, NAME_torch (triton_models/torch_chain),
rebuilt from the shipped checkpoint (fp16 / CUDA graphs / zsad's kernels on GPU servers without TensorRT). One
model keeps the encoder's taps (up to 22 MB per image) out of Triton's inter-model traffic.

zsad-bench times the torch chain in eager fp32 / fp16 / bf16 (autocast), torch.compile (fp32, and bf16 autocast),
and as one CUDA graph (``GraphedChain``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from zsad import ZsadError
from zsad.data.feeds import synthetic_feed
from zsad.export.runtimes.base import Runtime, register
from zsad.export.runtimes.runners import BackendRunner, Skip, as_numpy, chain_outputs
from zsad.export.triton_repo import ensemble_step, model_config, python_model_files, tensor_config, write_model

GPU_ONLY = {"torch-fp16": "fp16 matmuls are a GPU feature (CPU fp16 is emulated and slow, not a deployment target)",
            "cuda-graphs": "CUDA graphs need CUDA", "cuda-graphs-fp16": "CUDA graphs need CUDA",
            "cuda-graphs-bf16": "CUDA graphs need CUDA"}
# autocast dtype per backend: matmuls/convs in half precision, LayerNorm / softmax / reductions kept in fp32 by
# autocast's own op lists (CLIP's residual stream overflows fp16 in LayerNorm otherwise)
AUTOCAST = {"torch-fp16": torch.float16, "torch-bf16": torch.bfloat16, "torch-compile-bf16": torch.bfloat16,
            "cuda-graphs-fp16": torch.float16, "cuda-graphs-bf16": torch.bfloat16}
# what a user gets from torch alone (eager, autocast, torch.compile): zsad-bench's "best plain torch" comparator
PLAIN_TORCH = ("torch-fp32", "torch-fp16", "torch-bf16", "torch-compile", "torch-compile-bf16")


def torch_config(opts, model_name: str, chain_inputs: list[dict], chain_outputs: list[dict]) -> dict:
    """NAME_torch's config: the chain's outside inputs and the ensemble's outputs."""
    gpu = opts.instance_kind == "KIND_GPU"
    return model_config(opts, model_name, {"backend": "python"}, chain_inputs, chain_outputs,
                        {"checkpoint": "checkpoint", "fp16": opts.fp16, "device": "cuda" if gpu else "cpu",
                         "cuda_graphs": gpu})


@register
class PythonTorch(Runtime):
    name = "python-torch"
    summary = "the PyTorch chain in one python model (GPU servers without TensorRT)"
    bench_variants = (*PLAIN_TORCH, "cuda-graphs", "cuda-graphs-fp16", "cuda-graphs-bf16")

    def gate_runtime(self):
        return "torch"

    def runs_on(self):
        return {"backend": "python"}  # the whole chain's model (torch_config); no per-stage models are written

    def check_fp16(self, device):
        if device != "gpu":
            raise ZsadError("--fp16 with python-torch needs CUDA: there is no fast fp16 on the CPU. Export fp32 "
                            "for CPU serving (--device cpu), or export on the GPU server with --device gpu.")
        if not torch.cuda.is_available():
            raise ZsadError("--fp16 with python-torch needs CUDA on this machine to run the parity gate")

    def build_stages(self, method, stages, opts, scratch, log):
        # the served code is the torch stage chain rebuilt from the shipped checkpoint: check exactly that
        from zsad.checkpoint import load_checkpoint, save_checkpoint
        from zsad.export.parity import torch_runner

        ckpt = save_checkpoint(scratch / "checkpoint", method, exported=True)
        rebuilt = load_checkpoint(ckpt, clip_weights=method.config.backbone.weights)[0]
        runners = {st.name: torch_runner(st2.module, list(st2.inputs), list(st2.outputs))
                   for st, st2 in zip(stages, rebuilt.stages(), strict=True)}
        return runners, {"__checkpoint__": ckpt}

    def model_names(self, name, stages):
        return [f"{name}_torch"]

    def write_chain(self, repo, opts, method, stages, stage_files, precision, chain_in, out_tensors):
        """NAME_torch, the whole stage chain rebuilt from the shipped checkpoint (and CLIP weights)."""
        mname = f"{opts.name}_torch"
        inputs = [tensor_config(n, shp, dt) for n, (shp, dt) in chain_in.items()]
        cfg = torch_config(opts, mname, inputs, out_tensors)
        files = {**python_model_files("torch_chain"), "checkpoint": stage_files["__checkpoint__"]}
        clip = method.config.backbone.weights
        if clip:
            files[f"clip_weights{Path(clip).suffix}"] = Path(clip)
            cfg["parameters"].append({"key": "clip_weights",
                                      "value": {"string_value": f"clip_weights{Path(clip).suffix}"}})
        write_model(repo, cfg, files=files)
        return [mname], [ensemble_step(mname, chain_in, [t["name"] for t in out_tensors])]

    def bench_skip(self, variant, device):
        if variant in GPU_ONLY and not device.startswith("cuda"):
            return GPU_ONLY[variant] + ("" if torch.cuda.is_available() else "; no CUDA device on this machine")
        return None

    def bench_runner(self, variant, method, device, max_batch, scratch):
        return _torch_runner(method, device, variant)


def _chain(method):
    from zsad.methods import run_stages

    stages = method.stages()
    names = chain_outputs(stages)

    def run(images):
        env = run_stages(stages, **synthetic_feed(method, images))
        return {n: env[n] for n in names}

    return run


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
    compiled = backend.startswith("torch-compile")
    grad_off = torch.no_grad if compiled else torch.inference_mode

    def call(x):
        with grad_off(), torch.autocast(dev_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return chain(x)

    fn = call
    note = ""
    if compiled:
        fn = torch.compile(call, dynamic=False)
        note = "torch.compile default mode (inductor)" + (f", {precision} autocast" if dtype is not None else "")
    try:
        fn(torch.zeros(1, 3, method.image_size, method.image_size, device=device))
        if dev_type == "cuda":
            torch.cuda.synchronize()
    except Exception as err:  # e.g. no autocast kernel for this dtype on this device, or no compiler
        raise Skip(f"{backend} failed on {device}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from err

    def make_step(x):
        xd = x.to(device)
        return lambda: fn(xd)

    return BackendRunner(backend, precision, lambda x: as_numpy(fn(x.to(device))), make_step, note)


class GraphedChain:
    """A method's whole stage chain captured as one CUDA graph per input shape, replayed on static buffers.

    The chain's inputs (images, and Bayes-PFL's class-name token ids, tokenised on the host before capture) are
    copied into static tensors; one replay runs every kernel of the chain, the Triton ones included (``dispatch``
    picks them for CUDA tensors at inference), with no Python in between. Capture follows the PyTorch recipe:
    warm-up iterations on a side stream first (Triton JIT compilation, cuBLAS handles and the allocator's pool all
    happen there, outside the capture), and autocast with ``cache_enabled=False`` (its weight-cast cache would
    otherwise hold tensors freed after capture). Nothing in the chain may synchronise with the host
    (``zsad.bench.backends.capture_hazards`` checks that on the CPU).
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
        feed = synthetic_feed(self.method, images.cpu())
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

    return BackendRunner(backend, precision, lambda x: as_numpy(graphed(x)), make_step,
                         f"whole chain as one torch.cuda.CUDAGraph per batch size, {precision}"
                         + (" autocast" if dtype is not None else ""))
