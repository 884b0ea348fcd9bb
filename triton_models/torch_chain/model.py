"""Triton python backend: a zsad method's whole stage chain in PyTorch (the `python-torch` backend).

For GPU servers without TensorRT: the method is rebuilt from the checkpoint shipped beside this file and its
``stages()`` run in order in one process, so the encoder's taps never cross a model boundary. On CUDA it can run
in fp16 (LayerNorm kept in fp32 by torch autocast) and capture CUDA graphs per batch size (torch.compile
"reduce-overhead"). Each request is checked first (finite floats, non-negative integers: clients can reach this
model directly); valid requests of a dynamic batch are concatenated, run once and split back per request, and if
that run fails, each runs alone so only a request that fails by itself gets an error
(zsad_common.guard.run_stage_requests, copied beside this file at export). zsad's input errors (``ZsadError``)
leave the run as the guard's ``BadInput``: that request's HTTP 400.
"""
import json
import os

import torch
import triton_python_backend_utils as pb_utils

from zsad import ZsadError
from zsad.checkpoint import load_checkpoint
from zsad.methods import run_stages

from zsad_common.guard import BadInput, run_stage_requests


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        self.model_name = args["model_name"]
        self.device = p.get("device", "cpu") if torch.cuda.is_available() else "cpu"
        self.fp16 = p.get("fp16", "False") == "True" and self.device.startswith("cuda")
        clip = os.path.join(here, p["clip_weights"]) if p.get("clip_weights") else None
        self.method, _ = load_checkpoint(os.path.join(here, p["checkpoint"]), clip_weights=clip, device=self.device)
        self.stages = self.method.stages()
        for st in self.stages:
            st.module.to(self.device)
        self.chain = self._run
        if p.get("cuda_graphs", "False") == "True" and self.device.startswith("cuda"):
            self.chain = torch.compile(self._run, mode="reduce-overhead", dynamic=False)
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]

    def _run(self, **feed):
        env = run_stages(self.stages, **feed)
        return [env[n] for n in self.outputs]

    def _run_numpy(self, batch):
        feed = {n: torch.from_numpy(x).to(self.device) for n, x in batch.items()}
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
                # float outputs leave as fp32 (fp16 autocast inside); integer ones (selections) keep their type
                return [(o.float() if o.is_floating_point() else o).cpu().numpy() for o in self.chain(**feed)]
        except ZsadError as err:  # zsad's input error: the guard (zsad-free) knows it as BadInput
            raise BadInput(str(err)) from err

    def execute(self, requests):
        return run_stage_requests(pb_utils, requests, self.inputs, self.outputs, self._run_numpy, self.model_name)
