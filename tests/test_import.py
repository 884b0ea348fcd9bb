"""zsad-import: the authors' released checkpoints -> zsad checkpoints.

Every released file here is built by hand from the released code's key names and shapes (zqhang/AnomalyCLIP
prompt_ensemble.py, Faustinaqq/AF-CLIP clip/adaptor.py, xiaozhen228/Bayes-PFL models/VPB.py + PFL.py,
huzongxiang/sowa anomaly_clip.py + adapter.py), never from zsad's modules. At the paper widths each imports,
builds, runs one forward (small image size: ViT-L on 2 cores) and carries its tensors over exactly; at the tiny
widths an independent re-computation of the released forward math (open_clip's frozen CLIP blocks and hand-written
attention / flows / adapters, not zsad's modules) must match zsad's stage outputs on the imported weights.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from zsad import ZsadError
from zsad import load as zsad_load
from zsad.checkpoint import checkpoint_paths, load_checkpoint
from zsad.importers import import_checkpoint, read_torch_file
from zsad.methods import run_stages

G = torch.Generator().manual_seed(0)


def rnd(*shape, scale=0.1):
    return torch.randn(*shape, generator=G) * scale


# zsad's stages and the hand re-computations below order their fp32 sums differently, and which kernels do the
# summing differs per CPU: the gap measured 1e-6..4e-6 on a Zen 3 box and 1.05e-5 on a CI box (AF-CLIP's 12
# summed cosines / 0.07). The bugs these tests exist for are far louder: AF-CLIP's temperature off by 1% moves
# its outputs by 3e-2.
FP32_TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def load(out: Path, size: int | None = None):
    """The imported checkpoint as zsad-eval / zsad-export load it (random CLIP unless it carries weights)."""
    meta = json.loads((out / "checkpoint.json").read_text())
    bb = {"pretrained": None} if meta["config"]["backbone"]["weights"] is None else {}
    if size:
        bb["image_size"] = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_checkpoint(out, overrides={"backbone": bb})


def assert_table_is_the_model(method) -> None:
    """The shape table the import checked against (no model built) is the built model's trainable parameters."""
    from zsad.importers.shapes import trainable_shapes

    assert trainable_shapes(method.name, method.config) == {k: tuple(p.shape)
                                                            for k, p in method.trainable_parameters().items()}


# -- released layouts, by hand --------------------------------------------------------------------------------------
def anomalyclip_file(path: Path, width: int, n_ctx: int = 12, depth: int = 9, t_n_ctx: int = 4,
                     dtype=torch.float32) -> dict:
    sd = {"ctx_pos": rnd(1, 1, n_ctx, width), "ctx_neg": rnd(1, 1, n_ctx, width)}
    for j in range(depth - 1):
        sd[f"compound_prompts_text.{j}"] = rnd(t_n_ctx, width)
        sd[f"compound_prompt_projections.{j}.weight"] = rnd(896, width)
        sd[f"compound_prompt_projections.{j}.bias"] = rnd(896)
    for s in ("pos", "neg"):
        sd[f"token_prefix_{s}"] = rnd(1, 1, 1, width)
        sd[f"token_suffix_{s}"] = rnd(1, 1, 77 - 1 - n_ctx, width)
        sd[f"tokenized_prompts_{s}"] = torch.zeros(1, 1, 77, dtype=torch.int32)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"prompt_learner": sd}, path)
    return sd


def bayespfl_file(path: Path, embed: int, text: int, vision: int, layers: int = 4, k: int = 10, banks: int = 3,
                  p: int = 5, q: int = 5, unique: list | None = None) -> dict:
    """Context_Prompting.state_dict(): d_theta = vision // 2; shared encoders/decoders appear under two names."""
    h = vision // 2

    def block(prefix):  # InferenceBlock: Linear -> Softplus -> Linear -> Softplus -> Linear
        return {f"{prefix}.module.0.weight": rnd(h, embed), f"{prefix}.module.0.bias": rnd(h),
                f"{prefix}.module.2.weight": rnd(h, h), f"{prefix}.module.2.bias": rnd(h),
                f"{prefix}.module.4.weight": rnd(embed, h), f"{prefix}.module.4.bias": rnd(embed)}

    enc = {n: {**block("weight_mean"), **block("weight_log_variance")} for n in ("context", "state")}
    dec = {n: block("weight_mean") for n in ("context", "state")}
    sd = {"prompt_context": rnd(banks, p, text), "prompt_state_normal": rnd(banks, q, text),
          "prompt_state_abnormal": rnd(banks, q, text), "temperature_pixel": torch.tensor(math.log(1 / 0.07)),
          "temperature_image": torch.tensor(math.log(1 / 0.07))}
    for n in ("context", "state"):
        sd.update({f"{n}_encoder.{key}": v for key, v in enc[n].items()})
        sd.update({f"{n}_decoder.{key}": v for key, v in dec[n].items()})
    sd.update({"PFL_context.amor_u.weight": rnd(k * embed, embed, scale=0.01),
               "PFL_context.amor_u.bias": rnd(k * embed),
               "PFL_context.amor_w.weight": rnd(k * embed, embed, scale=0.01),
               "PFL_context.amor_w.bias": rnd(k * embed),
               "PFL_context.amor_b.weight": rnd(k, embed), "PFL_context.amor_b.bias": rnd(k)})
    for branch, n in (("PFL_context", "context"), ("PFL_normal", "state"), ("PFL_abnormal", "state")):
        sd.update({f"{branch}.encoder.{key}": v for key, v in enc[n].items()})  # the same tensors (shared)
        sd.update({f"{branch}.decoder.{key}": v for key, v in dec[n].items()})
        sd[f"{branch}.p_mu.0.weight"], sd[f"{branch}.p_mu.0.bias"] = rnd(embed, embed), rnd(embed)
    for branch in ("PFL_normal", "PFL_abnormal"):
        sd.update({f"{branch}.amor_u": rnd(1, k, embed, 1), f"{branch}.amor_w": rnd(1, k, 1, embed),
                   f"{branch}.amor_b": rnd(1, k, 1, 1), f"{branch}.state": rnd(1, embed)})
    sd.update({"fuse.fuse_modules.weight": rnd(h, vision * layers, scale=0.02), "fuse.fuse_modules.bias": rnd(h),
               "fuse.compress.weight": rnd(1, h), "fuse.compress.bias": rnd(1),
               "fuse.post_process.weight": rnd(text, h), "fuse.post_process.bias": rnd(text),
               "RCA.q_proj_pre.weight": rnd(text, text, 1), "RCA.q_proj_pre.bias": rnd(text),
               "class_mapping.weight": rnd(text, text), "class_mapping.bias": rnd(text),
               "image_mapping.weight": rnd(text, text), "image_mapping.bias": rnd(text)})
    for layer in range(layers):
        sd[f"RCA.linear_proj.{layer}.weight"] = rnd(text, vision)
    if unique is not None:  # values in distinct tensors (a state dict lists shared ones twice)
        seen = {}
        for v in sd.values():
            seen[v.data_ptr()] = v.numel()
        unique.append(sum(seen.values()))
    torch.save({"MyModel": sd}, path)
    return sd


# SOWA's own classes the Lightning checkpoint pickles by name, defined here under the released module names (read off
# huzongxiang/sowa: configs/model/sowa_hfwa.yaml, configs/data/sowa_{mvt,visa}.yaml, src/models/components/loss.py,
# src/data/components/{anomal_dataset,kshot_dataset,transform}.py). Unpickling any of them records it in UNPICKLED.
UNPICKLED: list[str] = []


def _recorded_setstate(self, state):
    UNPICKLED.append(type(self).__qualname__)
    self.__dict__.update(state)


def _sowa_classes(kshot: str) -> dict[str, types.ModuleType]:
    """src.models.components.loss.{FocalLoss, BinaryDiceLoss} (nn.Modules), the datasets (partial targets) and the
    transforms (instantiated by Hydra inside the dataset partials), as modules to put in sys.modules."""
    mods = {n: types.ModuleType(n) for n in ("src", "src.models", "src.models.components",
                                            "src.models.components.loss", "src.data", "src.data.components",
                                            "src.data.components.anomal_dataset", "src.data.components.kshot_dataset",
                                            "src.data.components.transform")}

    class FocalLoss(nn.Module):
        def __init__(self, apply_nonlin=None, alpha=None, gamma=2, balance_index=0, smooth=1e-5, size_average=True):
            super().__init__()
            self.apply_nonlin, self.alpha, self.gamma = apply_nonlin, alpha, gamma
            self.balance_index, self.smooth, self.size_average = balance_index, smooth, size_average

    class BinaryDiceLoss(nn.Module):
        pass

    class ImageTransform:
        def __init__(self, image_size):
            self.image_size = image_size

    class MaskTransform(ImageTransform):
        pass

    classes = [("src.models.components.loss", FocalLoss), ("src.models.components.loss", BinaryDiceLoss),
               ("src.data.components.transform", ImageTransform), ("src.data.components.transform", MaskTransform)]
    for module, name in (("src.data.components.anomal_dataset", "MVTecDataset"),
                         ("src.data.components.anomal_dataset", "VisaDataset"),
                         ("src.data.components.kshot_dataset", kshot)):
        classes.append((module, type(name, (), {})))
    for module, c in classes:
        c.__module__, c.__qualname__ = module, c.__name__
        c.__setstate__ = _recorded_setstate
        setattr(mods[module], c.__name__, c)
    return mods


class _FakeModules:
    """Put modules into sys.modules for a block, then restore what was there."""

    def __init__(self, mods: dict[str, types.ModuleType]):
        self.mods, self.saved = mods, {}

    def __enter__(self):
        self.saved = {k: sys.modules.get(k) for k in self.mods}
        sys.modules.update(self.mods)
        return self.mods

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def sowa_file(path: Path, width: int, text: int, taps: list[int], heads: int = 8, cpb: int = 64,
              clip_state: dict | None = None, dataset: str = "mvtec") -> dict:
    """A Lightning checkpoint of SOWA's AnomalyCLIPModule as its trainer writes it: ``state_dict`` (the module's, an
    OrderedDict with ``_metadata``) under ``net.``, loops / callbacks / optimizer and scheduler states, and the
    Hydra-built ``hyper_parameters`` (save_hyperparameters(ignore=['net']): optimizer / scheduler partials, the loss
    DictConfig of instantiated losses, the kwargs) and ``datamodule_hyper_parameters`` (data_dir and the dataset
    partials as DictConfigs) made with the real omegaconf, Hydra's allow_objects flag set as hydra.utils.instantiate
    does. ``dataset``: mvtec (trained on VisA, k-shot MVTecKShotDataset) or visa (VisaKShotDataset)."""
    import functools

    omegaconf = pytest.importorskip("omegaconf")
    sd = {"net.prompt_learner.ctx_pos": rnd(1, 1, 12, text), "net.prompt_learner.ctx_neg": rnd(1, 1, 12, text),
          "net.cross_fusion.linear.weight": rnd(text, text), "net.cross_fusion.linear.bias": rnd(text)}
    for s in ("pos", "neg"):
        sd[f"net.prompt_learner.tokenized_prompts_{s}"] = torch.zeros(1, 1, 77, dtype=torch.int32)
        sd[f"net.prompt_learner.token_prefix_{s}"] = rnd(1, 1, 1, text)
        sd[f"net.prompt_learner.token_suffix_{s}"] = rnd(1, 1, 64, text)
    for i, t in enumerate(taps):
        a = f"net.visual_encoder.adapters.{i}.blocks.0."
        sd.update({a + "norm1.weight": 1 + rnd(width), a + "norm1.bias": rnd(width),
                   a + "norm2.weight": 1 + rnd(width), a + "norm2.bias": rnd(width),
                   a + "mlp.layers.0.weight": rnd(width, width),
                   a + "attn.logit_scale": rnd(heads, 1, 1) + math.log(10),
                   a + "attn.cpb_mlp.0.weight": rnd(cpb, 2), a + "attn.cpb_mlp.0.bias": rnd(cpb),
                   a + "attn.cpb_mlp.2.weight": rnd(heads, cpb), a + "attn.relative_coords_table": rnd(1, 3, 3, 2),
                   a + "attn.relative_position_index": torch.zeros(4, 4, dtype=torch.int64)})
        if clip_state is not None:
            blk = f"visual.transformer.resblocks.{t - 1}.attn."
            sd[a + "attn.qkv"] = clip_state[blk + "in_proj_weight"]
            sd[a + "attn.proj.weight"] = clip_state[blk + "out_proj.weight"]
            sd[a + "attn.proj.bias"] = clip_state[blk + "out_proj.bias"]
        else:
            sd[a + "attn.qkv"], sd[a + "attn.proj.weight"], sd[a + "attn.proj.bias"] = (
                rnd(3 * width, width), rnd(width, width), rnd(width))
    if clip_state is not None:  # one CLIP, registered under four owners (the same tensors: stored once)
        for prefix in ("net.clip_model.", "net.prompt_learner.clip_model.", "net.visual_encoder.clip_model."):
            sd.update({prefix + k: v for k, v in clip_state.items()})
        sd["net.visual_encoder.proj"] = clip_state["visual.proj"]
        sd.update({"net.text_encoder." + k: v for k, v in clip_state.items()  # TextMapEncoder's borrowed parts
                   if k.startswith(("transformer.", "ln_final.")) or k in ("positional_embedding", "text_projection")})
    state_dict = OrderedDict(sd)
    state_dict._metadata = OrderedDict({"": {"version": 1}, "net": {"version": 1}})  # what Module.state_dict() sets

    kshot = {"mvtec": "MVTecKShotDataset", "visa": "VisaKShotDataset"}[dataset]
    with _FakeModules(_sowa_classes(kshot)) as m:
        loss_mod, data_mod = m["src.models.components.loss"], m["src.data.components.anomal_dataset"]
        transform = m["src.data.components.transform"]

        def data_partial(cls, **extra):
            return functools.partial(cls, transform=transform.ImageTransform(336),
                                     mask_transform=transform.MaskTransform(336), preload=False, **extra)

        flags = {"allow_objects": True}  # hydra.utils.instantiate keeps instantiated objects inside DictConfigs
        hparams = {
            "optimizer": functools.partial(torch.optim.AdamW, lr=0.001, weight_decay=0.2),
            "scheduler": functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", factor=0.1,
                                           patience=5),
            "loss": omegaconf.DictConfig({"cross_entropy": nn.CrossEntropyLoss(), "focal": loss_mod.FocalLoss(),
                                          "dice": loss_mod.BinaryDiceLoss()}, flags=flags),
            "enable_validation": False, "compile": False, "k_shot": False, "filter": True}
        datamodule = {
            "data_dir": omegaconf.DictConfig({"train": "/data/Visa", "valid": "/data/MVTec-AD",
                                              "test": "/data/MVTec-AD"}, flags=flags),
            "dataset": omegaconf.DictConfig({
                "train": data_partial(data_mod.VisaDataset), "valid": data_partial(data_mod.MVTecDataset, aug_rate=0.0),
                "test": data_partial(data_mod.MVTecDataset, aug_rate=0.0),
                "kshot": data_partial(getattr(m["src.data.components.kshot_dataset"], kshot), k_shot=1)},
                flags=flags),
            "batch_size": 8, "image_size": 336, "num_workers": 6, "pin_memory": False}
        trained = [p for k, p in sd.items() if "clip_model" not in k and p.is_floating_point()][:3]
        opt = torch.optim.AdamW([nn.Parameter(p.clone()) for p in trained], lr=1e-3, weight_decay=0.2)
        for q in opt.param_groups[0]["params"]:
            q.grad = torch.ones_like(q)
        opt.step()
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=5)
        sched.step(1.0)
        ckpt = {"epoch": 0, "global_step": 216, "pytorch-lightning_version": "2.2.1", "state_dict": state_dict,
                "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 216},
                                       "epoch_progress": {"total": {"ready": 1, "started": 1, "processed": 1,
                                                                    "completed": 0}}}},
                "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, "
                              "'every_n_epochs': 1, 'train_time_interval': None}": {
                                  "monitor": None, "best_model_score": None, "best_model_path": "",
                                  "current_score": None, "dirpath": "/logs/checkpoints", "best_k_models": {},
                                  "kth_best_model_path": "", "kth_value": torch.tensor(float("inf")),
                                  "last_model_path": "/logs/checkpoints/last.ckpt"}},
                "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
                "hparams_name": "kwargs", "hyper_parameters": hparams,
                "datamodule_hparams_name": "kwargs", "datamodule_hyper_parameters": datamodule}
        torch.save(ckpt, path)
    return sd


# the public pickle scan of HF zongxiang/sowa mvtec.ckpt (issue 21); visa.ckpt names VisaKShotDataset instead
RELEASED_SOWA_GLOBALS = {
    "torch.FloatStorage", "torch.IntStorage", "torch.LongStorage", "torch._utils._rebuild_tensor_v2",
    "collections.OrderedDict", "collections.defaultdict", "__builtin__.dict", "__builtin__.set", "typing.Any",
    "functools.partial", "torch.optim.adamw.AdamW", "torch.optim.lr_scheduler.ReduceLROnPlateau",
    "torch.nn.modules.loss.CrossEntropyLoss", "src.models.components.loss.FocalLoss",
    "src.models.components.loss.BinaryDiceLoss", "src.data.components.anomal_dataset.MVTecDataset",
    "src.data.components.anomal_dataset.VisaDataset", "src.data.components.kshot_dataset.MVTecKShotDataset",
    "src.data.components.transform.ImageTransform", "src.data.components.transform.MaskTransform",
    "omegaconf.dictconfig.DictConfig", "omegaconf.nodes.AnyNode", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata"}


def pickle_globals(path: Path) -> set[str]:
    """The globals a torch.save archive's data.pkl names, read off its opcodes as module.name."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    names = set()
    for op, arg, _pos in pickletools.genops(data):
        assert op.name != "STACK_GLOBAL", "torch.save writes protocol 2: globals are GLOBAL opcodes"
        if op.name == "GLOBAL":
            module, name = str(arg).split(" ")
            names.add(f"{module}.{name}")
    return names


def _adaptor_classes():
    """AF-CLIP's module tree (attention.norm / attention.attn.to_q ... to_out.0) under the name clip.adaptor."""

    class Attention(nn.Module):
        def __init__(self, dim, heads, dim_head):
            super().__init__()
            inner = heads * dim_head
            self.heads, self.scale = heads, dim_head ** -0.5
            self.to_q, self.to_k = nn.Linear(dim, inner, bias=False), nn.Linear(dim, inner, bias=False)
            self.to_v = nn.Linear(dim, inner, bias=False)
            self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    class PreNormAttention(nn.Module):
        def __init__(self, dim, heads, dim_head):
            super().__init__()
            self.norm, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dim_head)

    class Adaptor(nn.Module):
        def __init__(self, dim, heads, dim_head):
            super().__init__()
            self.attention = PreNormAttention(dim, heads, dim_head)

    mod = types.ModuleType("clip.adaptor")
    for c in (Attention, PreNormAttention, Adaptor):
        c.__module__, c.__qualname__ = "clip.adaptor", c.__name__
        setattr(mod, c.__name__, c)
    return mod


def afclip_files(folder: Path, text: int, vision: int, heads: int, dim_head: int) -> tuple[Path, Path, dict]:
    """weight/<data>_prompt.pt (a pickled Parameter) + weight/<data>_adaptor.pt (a pickled whole module)."""
    mod = _adaptor_classes()
    pkg = types.ModuleType("clip")
    pkg.adaptor = mod
    saved = {k: sys.modules.get(k) for k in ("clip", "clip.adaptor")}
    sys.modules.update({"clip": pkg, "clip.adaptor": mod})
    try:
        adaptor = mod.Adaptor(vision, heads, dim_head)
        with torch.no_grad():
            for prm in adaptor.parameters():
                prm.copy_(rnd(*prm.shape) + (1 if prm.dim() == 1 and prm is adaptor.attention.norm.weight else 0))
        prompt = nn.Parameter(rnd(1, 12, text, scale=0.01))
        torch.save(prompt, folder / "mvtec_prompt.pt")
        torch.save(adaptor, folder / "mvtec_adaptor.pt")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    state = {"prompt": prompt.detach().clone(), **{k: v.detach().clone() for k, v in adaptor.state_dict().items()}}
    return folder / "mvtec_prompt.pt", folder / "mvtec_adaptor.pt", state


# -- reference math written from the released code (frozen CLIP modules from open_clip, no zsad) -------------------
def ref_attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask=None, vv: bool = False):
    """CLIP's multi-head attention from in_proj / out_proj by hand; ``vv``: also q = k = v (AnomalyCLIP surgery)."""
    b, n, d = x.shape
    h = attn.num_heads
    q, k, v = (x @ attn.in_proj_weight.t() + attn.in_proj_bias).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    out = []
    for qq, kk in ((q, k), (v, v)) if vv else ((q, k),):
        a = qq @ kk.transpose(-1, -2) * (d // h) ** -0.5
        if mask is not None:
            a = a + mask
        o = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        out.append(o @ attn.out_proj.weight.t() + attn.out_proj.bias)
    return out if vv else out[0]


def ref_block(blk, x, mask=None):
    x = x + ref_attention(blk.attn, blk.ln_1(x), mask)
    return x + blk.mlp(blk.ln_2(x))


def ref_embed(visual, images):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    return visual.ln_pre(x)


def ref_text(clip, embeddings, eot, deep=()):
    """Text tower over ready embeddings [P,77,W]; deep prompts replace positions 1..n at blocks 2.. (AnomalyCLIP)."""
    x = embeddings + clip.positional_embedding
    mask = torch.full((77, 77), float("-inf")).triu(1)
    for i, blk in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].expand(x.shape[0], -1, -1), x[:, 1 + deep[i - 1].shape[0]:]], dim=1)
        x = ref_block(blk, x, mask)
    x = clip.ln_final(x)[torch.arange(x.shape[0]), eot]
    return x @ clip.text_projection


def tokens(method, texts):
    return method.backbone.tokenize(texts)


# -- tests: file reading is safe ---------------------------------------------------------------------------------
class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _torch_zip(path: Path, obj) -> None:
    """A torch.save-shaped archive whose data.pkl is ``pickle.dumps(obj)`` (pickling runs nothing)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("fn,arg_of", [(os.system, lambda m: f"touch {m}"),
                                       (exec, lambda m: f"open({str(m)!r}, 'w').close()"),
                                       (subprocess.call, lambda m: ["touch", str(m)])])
def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, fn, arg_of):
    marker = tmp_path / "pwned"
    bad = tmp_path / "mvtec_adaptor.pt"
    _torch_zip(bad, {"adaptor": _Payload(fn, arg_of(marker))})
    name = f"{fn.__module__}.{fn.__name__}"
    with pytest.raises(ZsadError, match=name.replace(".", r"\.")):
        read_torch_file(bad)
    prompt = tmp_path / "mvtec_prompt.pt"
    torch.save(nn.Parameter(torch.zeros(1, 12, 128)), prompt)
    with pytest.raises(ZsadError, match="refused"):
        import_checkpoint("afclip", [prompt, bad], tmp_path / "out", profile="tiny")
    assert not marker.exists()
    assert not (tmp_path / "out" / "checkpoint.json").exists()


# hand-assembled pickles (protocol 2 opcodes), for what pickle.dumps cannot write
def op_global(name: str) -> bytes:
    module, _, attr = name.rpartition(".")
    return b"c" + module.encode() + b"\n" + attr.encode() + b"\n"


def op_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


PROTO, STOP, MARK, TUPLE, TUPLE1, TUPLE2 = b"\x80\x02", b".", b"(", b"t", b"\x85", b"\x86"
REDUCE, BUILD, EMPTY_TUPLE, EMPTY_DICT, SETITEM, NONE = b"R", b"b", b")", b"}", b"s", b"N"


def call(fn: str, *args: bytes) -> bytes:
    """``fn(*args)`` as GLOBAL + args tuple + REDUCE."""
    return op_global(fn) + MARK + b"".join(args) + TUPLE + REDUCE


def tensor_record(key: str, numel: int, size: tuple, stride: tuple, offset: int = 0) -> bytes:
    """``torch._utils._rebuild_tensor_v2`` over persistent storage ('storage', FloatStorage, key, 'cpu', numel)."""
    pid = MARK + op_str("storage") + op_global("torch.FloatStorage") + op_str(key) + op_str("cpu") + op_int(numel) \
        + TUPLE + b"Q"
    def ints(xs):
        return MARK + b"".join(op_int(x) for x in xs) + TUPLE

    return call("torch._utils._rebuild_tensor_v2", pid, op_int(offset), ints(size), ints(stride), b"\x89",
                call("collections.OrderedDict"))


def crafted_file(path: Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A torch.save-shaped archive (entries stored) holding ``pickle_bytes`` as data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for k, v in (storages or {}).items():
            z.writestr(f"archive/data/{k}", v)
        z.writestr("archive/version", "3\n")
    return path


HOSTILE = {  # name: (data.pkl, storages, what the one-line refusal says)
    "getattr": (call("builtins.getattr", call("collections.OrderedDict"), op_str("__class__")), None,
                r"global 'builtins\.getattr'"),
    "eval-py2-name": (call("__builtin__.eval", op_str("1")), None, r"global 'builtins\.eval'"),
    "torch-load": (call("torch.load", op_str("x.pt")), None, r"global 'torch\.load'"),
    "torch-storage-from-bytes": (call("torch.storage._load_from_bytes", op_str("x")), None,
                                 r"global 'torch\.storage\._load_from_bytes'"),
    "copy-reg-reconstructor": (call("copy_reg._reconstructor", call("collections.OrderedDict")), None,
                               r"global 'copyreg\._reconstructor'"),
    "defaultdict-os-system": (call("collections.defaultdict", op_global("os.system")), None, r"global 'os\.system'"),
    "dict-of-object": (call("builtins.dict", call("src.x.Y")), None, r"calls builtins\.dict with a Y"),
    "set-of-object": (call("__builtin__.set", call("src.x.Y")), None, r"calls builtins\.set with something other"),
    "ordereddict-of-object": (call("collections.OrderedDict", call("src.x.Y")), None,
                            r"calls collections\.OrderedDict with a Y"),
    "ordereddict-keys-attribute": (call("collections.OrderedDict") + EMPTY_DICT + op_str("keys")
                                   + op_global("builtins.set") + SETITEM + BUILD, None, r"other than _metadata"),
    "call-a-partial": (op_global("functools.partial") + op_global("src.x.Y") + TUPLE1 + REDUCE + EMPTY_TUPLE + REDUCE,
                       None, r"could not read .*TypeError"),
    "dict-as-newobj-class": (op_global("builtins.dict") + EMPTY_TUPLE + b"\x81", None, r"could not read"),
    "build-on-a-stand-in-class": (op_global("src.x.Y") + NONE + EMPTY_DICT + op_str("__setstate__")
                                  + op_global("builtins.set") + SETITEM + TUPLE2 + BUILD, None, r"could not read"),
    "re-point-a-tensor-record": (tensor_record("0", 4, (4,), (1,)) + EMPTY_DICT + op_str("shape")
                                 + MARK + op_int(100000) + op_int(100000) + TUPLE + SETITEM + BUILD,
                                 {"0": bytes(16)}, r"rebuild a tensor record"),
    "inst-opcode": (b"(i" + b"src.x\nY\n", None, r"opcode INST"),
    "nested-lists": (b"]" * 100_000 + b"a" * 99_999, None, r"nests objects more than 200 levels deep"),
    "view-beyond-storage": (tensor_record("0", 4, (8,), (1,)), {"0": bytes(16)},
                            r"reaches element 8 of a 4-element storage"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pickles_are_refused_in_one_line(tmp_path, case):
    """Every gadget a pickle could reach through what the reader admits: refused by name, before anything runs; the
    guarded dict / set / OrderedDict / defaultdict take only plain containers (no object whose keys / __iter__ /
    factory could be looked up and called), and nothing the reader hands out can be re-pointed by a later BUILD."""
    data, storages, message = HOSTILE[case]
    bad = crafted_file(tmp_path / "bad.pt", PROTO + data + STOP, storages)
    with pytest.raises(ZsadError, match=message) as err:
        read_torch_file(bad)
    assert "\n" not in str(err.value)


def test_guarded_factories_still_build_plain_data(tmp_path):
    """The factories admit what real files hold: dict / OrderedDict of pairs, set of a list, defaultdict(dict) with
    items; defaultdict's factory is dropped (a missing key is a KeyError, nothing is called)."""
    pairs = MARK + MARK + op_str("a") + op_int(1) + TUPLE + b"l"
    data = (EMPTY_DICT + op_str("d") + call("builtins.dict", pairs) + SETITEM
            + op_str("o") + call("collections.OrderedDict", pairs) + SETITEM
            + op_str("s") + call("__builtin__.set", MARK + op_int(3) + op_int(4) + b"l") + SETITEM
            + op_str("dd") + call("collections.defaultdict", op_global("src.x.Y")) + op_str("k") + op_int(5) + SETITEM
            + SETITEM)
    obj = read_torch_file(crafted_file(tmp_path / "ok.pt", PROTO + data + STOP))
    assert obj["d"] == {"a": 1} and type(obj["d"]) is dict
    assert obj["o"] == {"a": 1} and isinstance(obj["o"], OrderedDict)
    assert obj["s"] == {3, 4}
    assert type(obj["dd"]) is dict and obj["dd"] == {"k": 5}
    with pytest.raises(KeyError):
        obj["dd"]["missing"]


def test_restricted_reader_keeps_module_state_as_plain_tensors(tmp_path):
    prompt, adaptor, state = afclip_files(tmp_path, 128, 128, 4, 32)
    assert "clip" not in sys.modules or not hasattr(sys.modules["clip"], "adaptor")  # nothing to import from
    obj = read_torch_file(adaptor)
    assert obj.qualname == "clip.adaptor.Adaptor"
    flat = {k: v.load(state[k].shape) for k, v in obj.tensors().items()}
    assert sorted(flat) == sorted(k for k in state if k != "prompt")
    for k, v in flat.items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("dataset", ["mvtec", "visa"])
def test_sowa_lightning_checkpoint_with_the_released_globals_imports_and_nothing_runs(tmp_path, dataset):
    """The Lightning + Hydra layout (real omegaconf containers, functools.partial, loss / dataset / transform
    classes) pickles exactly the globals the released file's scan lists; zsad reads it with inert stand-ins: even with
    SOWA's classes importable here, none of them is unpickled, and the hyper-parameters stay plain records."""
    omegaconf = pytest.importorskip("omegaconf")
    ckpt = tmp_path / f"{dataset}.ckpt"
    sd = sowa_file(ckpt, 128, 128, [1, 2, 3, 4], dataset=dataset)
    want = set(RELEASED_SOWA_GLOBALS)
    if dataset == "visa":
        want = want - {"src.data.components.kshot_dataset.MVTecKShotDataset"} | {
            "src.data.components.kshot_dataset.VisaKShotDataset"}
    assert pickle_globals(ckpt) == want
    UNPICKLED.clear()
    kshot = {"mvtec": "MVTecKShotDataset", "visa": "VisaKShotDataset"}[dataset]
    with _FakeModules(_sowa_classes(kshot)):
        obj = read_torch_file(ckpt)
        out = import_checkpoint("sowa", [ckpt], tmp_path / "ckpt", profile="tiny")
    assert UNPICKLED == []
    hp, dm = obj["hyper_parameters"], obj["datamodule_hyper_parameters"]
    assert not isinstance(hp["loss"], omegaconf.DictConfig) and hp["loss"].qualname == "omegaconf.dictconfig.DictConfig"
    assert hp["optimizer"].qualname == "functools.partial"
    assert hp["optimizer"].args[0].qualname == "torch.optim.adamw.AdamW"
    assert hp["optimizer"].state[2] == {"lr": 0.001, "weight_decay": 0.2}  # partial's keywords, as data
    assert dm["batch_size"] == 8 and hp["compile"] is False
    w = load_file(str(out / "checkpoint.safetensors"))
    assert torch.equal(w["adapters.1.linear.weight"], sd["net.visual_encoder.adapters.1.blocks.0.mlp.layers.0.weight"])
    assert torch.equal(w["prompts.ctx"][1], sd["net.prompt_learner.ctx_neg"][0, 0])


# -- tests: paper widths ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_anomalyclip_paper_file_imports_and_runs(tmp_path):
    sd = anomalyclip_file(tmp_path / "epoch_15.pth", 768, dtype=torch.float16)  # a CUDA run's fp16 learner
    out = import_checkpoint("anomalyclip", [tmp_path / "epoch_15.pth"], tmp_path / "ckpt",
                            overrides={"backbone": {"image_size": 112}})
    meta = json.loads((out / "checkpoint.json").read_text())
    imp = meta["imported"]
    assert imp["format"] == "anomalyclip" and len(imp["files"][0]["sha256"]) == 64
    assert meta["config"]["taps"] == [24, 24, 24, 24]  # as the released prompts saw them
    assert meta["config"]["backbone"]["pretrained"] == "openai" and meta["config"]["backbone"]["quick_gelu"] is True
    w = load_file(str(out / "checkpoint.safetensors"))
    assert torch.equal(w["prompts.ctx"][0], sd["ctx_pos"][0, 0].float())
    assert torch.equal(w["prompts.ctx"][1], sd["ctx_neg"][0, 0].float())
    for j in range(8):
        assert torch.equal(w[f"prompts.deep.{j}"], sd[f"compound_prompts_text.{j}"].float())
    assert imp["mapping"][0]["source_dtype"] == "float16"
    dropped = {d["key"] for d in imp["dropped"]}
    assert "compound_prompt_projections.*" in dropped and "token_suffix_pos" in dropped
    method, _ = load(out)
    assert_table_is_the_model(method)
    with torch.no_grad():
        o = method(torch.randn(1, 3, 112, 112))
    assert o.anomaly_map.shape == (1, 112, 112) and torch.isfinite(o.score).all()


@pytest.mark.slow
def test_afclip_paper_files_import_and_run(tmp_path, capsys):
    prompt, adaptor, state = afclip_files(tmp_path, 768, 1024, 8, 64)
    out = import_checkpoint("afclip", [adaptor, prompt], tmp_path / "ckpt",  # either order
                            overrides={"backbone": {"image_size": 112}})
    w = load_file(str(out / "checkpoint.safetensors"))
    assert torch.equal(w["prompts.ctx"], state["prompt"])
    assert torch.equal(w["adaptor.to_out.weight"], state["attention.attn.to_out.0.weight"])
    assert torch.equal(w["adaptor.norm.bias"], state["attention.norm.bias"])
    assert sum(v.numel() for v in w.values()) == 2_109_440  # the paper's trainable count
    method, meta = load(out)
    assert_table_is_the_model(method)
    assert meta["imported"]["notes"]["adaptor_class"] == "clip.adaptor.Adaptor"
    # either released file where a checkpoint is taken: imported on the fly with its partner, said on stderr
    on_the_fly = zsad_load.sidecar(prompt)
    assert on_the_fly["method"] == "afclip" and on_the_fly["imported"]["files"][1]["path"] == str(adaptor.resolve())
    assert "released afclip checkpoint" in capsys.readouterr().err
    with torch.no_grad():
        o = method(torch.randn(1, 3, 112, 112))
    assert torch.isfinite(o.anomaly_map).all()


@pytest.mark.slow
def test_bayespfl_paper_file_imports_and_runs(tmp_path):
    unique = []
    sd = bayespfl_file(tmp_path / "train_visa.pth", 768, 768, 1024, unique=unique)
    assert unique[0] == 27_370_017  # the released registered parameter count
    out = import_checkpoint("bayespfl", [tmp_path / "train_visa.pth"], tmp_path / "ckpt",
                            overrides={"backbone": {"image_size": 112}, "sampling": {"samples": 2}})
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["imported"]["values_imported"] == 23_497_505  # what the released model uses at inference
    assert meta["config"]["backbone"]["quick_gelu"] is False
    assert meta["config"]["backbone"]["pos_interpolation"] == "bicubic"
    # the release's resize (open_clip's resize_pos_embed: bicubic with antialias), also in the import record
    assert meta["config"]["backbone"]["pos_antialias"] is True
    assert meta["config"]["backbone"]["pos_align_corners"] is False
    assert meta["imported"]["backbone"]["pos_antialias"] is True
    w = load_file(str(out / "checkpoint.safetensors"))
    assert torch.equal(w["pfl.rca.query.weight"], sd["RCA.q_proj_pre.weight"][..., 0])
    assert torch.equal(w["pfl.state_flows.abnormal.u"], sd["PFL_abnormal.amor_u"].reshape(10, 768))
    assert torch.equal(w["pfl.state_flows.normal.w"], sd["PFL_normal.amor_w"].reshape(10, 768))
    assert torch.equal(w["pfl.context_flow.encoder.log_var.4.bias"],
                       sd["context_encoder.weight_log_variance.module.4.bias"])
    assert torch.equal(w["pfl.fuse.proj.weight"], sd["fuse.fuse_modules.weight"])
    method, _ = load(out)
    assert_table_is_the_model(method)
    assert isinstance(method.backbone.clip.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)
    with torch.no_grad():
        o = method(torch.randn(1, 3, 112, 112), class_names="bottle")
    assert torch.isfinite(o.score).all()


@pytest.mark.slow
def test_sowa_paper_file_imports_and_runs(tmp_path):
    sd = sowa_file(tmp_path / "last.ckpt", 1024, 768, [6, 12, 18, 24])
    out = import_checkpoint("sowa", [tmp_path / "last.ckpt"], tmp_path / "ckpt",
                            overrides={"backbone": {"image_size": 168}})
    w = load_file(str(out / "checkpoint.safetensors"))
    a = "net.visual_encoder.adapters.2.blocks.0."
    assert torch.equal(w["adapters.2.logit_scale"], sd[a + "attn.logit_scale"].reshape(8))
    assert torch.equal(w["adapters.2.linear.weight"], sd[a + "mlp.layers.0.weight"])
    assert torch.equal(w["adapters.2.cpb.mlp.2.weight"], sd[a + "attn.cpb_mlp.2.weight"])
    assert torch.equal(w["text_fusion.bias"], sd["net.cross_fusion.linear.bias"])
    assert sum(v.numel() for v in w.values()) == 4_822_560  # the spec's trainable count
    method, _ = load(out)
    assert_table_is_the_model(method)
    with torch.no_grad():
        o = method(torch.randn(1, 3, 168, 168))
    assert o.anomaly_map.shape == (1, 168, 168)


# -- tests: user mistakes ------------------------------------------------------------------------------------------
def test_file_of_another_method_is_named(tmp_path):
    sowa_file(tmp_path / "last.ckpt", 128, 128, [1, 2, 3, 4])
    torch.save(nn.Parameter(torch.zeros(1, 12, 128)), tmp_path / "p.pt")
    with pytest.raises(ZsadError, match="detected: sowa"):
        import_checkpoint("afclip", [tmp_path / "p.pt", tmp_path / "last.ckpt"], tmp_path / "o", profile="tiny")
    bayespfl_file(tmp_path / "b.pth", 128, 128, 128)
    with pytest.raises(ZsadError, match="detected: bayespfl"):
        import_checkpoint("anomalyclip", [tmp_path / "b.pth"], tmp_path / "o", profile="tiny")


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("ctx_neg"), "missing key 'ctx_neg'"),
    (lambda sd: sd.update(ctx_pos=torch.zeros(1, 1, 11, 128)), "key 'ctx_pos' has shape"),
    (lambda sd: sd.update(extra_head=torch.zeros(3)), "unexpected key 'extra_head'"),
])
def test_missing_misshaped_and_extra_keys_are_one_line_errors(tmp_path, edit, message):
    sd = anomalyclip_file(tmp_path / "e.pth", 128, depth=3)
    edit(sd)
    torch.save({"prompt_learner": sd}, tmp_path / "e.pth")
    with pytest.raises(ZsadError, match=message) as err:
        import_checkpoint("anomalyclip", [tmp_path / "e.pth"], tmp_path / "o", profile="tiny")
    assert "\n" not in str(err.value)


def test_cli_and_on_the_fly_import(tmp_path, capsys):
    from click.testing import CliRunner

    from zsad.importers.cli import main

    anomalyclip_file(tmp_path / "epoch_15.pth", 128, depth=3)
    r = CliRunner().invoke(main, ["--from", "anomalyclip", str(tmp_path / "epoch_15.pth"), "--out",
                                  str(tmp_path / "ckpt"), "--profile", "tiny"])
    assert r.exit_code == 0, r.output
    assert "zsad-export --checkpoint" in r.output
    r = CliRunner().invoke(main, ["--from", "sowa", str(tmp_path / "epoch_15.pth"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "detected: anomalyclip" in r.output and "Traceback" not in r.output
    # a released file where a checkpoint is taken: imported on the fly (paper profile: ViT-L, so a tiny file fails
    # on its shapes; the tiny checkpoint above is the same weights); check the detection and the message
    with pytest.raises(ZsadError, match="ctx_pos"):
        zsad_load.load(tmp_path / "epoch_15.pth")
    assert "released anomalyclip checkpoint" in capsys.readouterr().err


def aliased_clip_state(arch: str, seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A full ``arch`` CLIP state dict (OpenAI's fp16) whose tensors are views of ONE random storage as large as the
    largest tensor (torch.save writes it once: a ViT-L-14-336 file of 76 MB instead of 0.9 GB). Each block's
    in_proj_weight starts at its own offset, so the blocks differ (SOWA finds its taps by them)."""
    from zsad.importers.shapes import clip_state_shapes

    shapes = clip_state_shapes(arch)
    big = max(math.prod(s) for s in shapes.values())
    base = torch.randn(big + 64 * 1024, generator=torch.Generator().manual_seed(seed)).to(dtype)
    state = {}
    for k, shape in shapes.items():
        offset = 1024 * (1 + int(k.split(".")[-3])) if k.endswith("attn.in_proj_weight") else 0
        state[k] = base[offset:offset + math.prod(shape)].view(shape)
    return state


def test_clip_weights_go_into_the_on_the_fly_import(tmp_path, capsys):
    """A released file given where a checkpoint is taken (zsad-eval / zsad-export / zsad-predict --checkpoint) is
    imported with the user's --clip-weights, as zsad-import --clip-weights does: the sidecar records that file, and
    a file that does not fit the profile's CLIP is refused at import in one line (its shapes, nothing read)."""
    anomalyclip_file(tmp_path / "epoch_15.pth", 768)
    torch.save(aliased_clip_state("ViT-L-14-336", 1), tmp_path / "ViT-L-14-336.pt")
    assert (tmp_path / "ViT-L-14-336.pt").stat().st_size < 100 << 20
    meta = zsad_load.sidecar(tmp_path / "epoch_15.pth", clip_weights=tmp_path / "ViT-L-14-336.pt")
    clip = str((tmp_path / "ViT-L-14-336.pt").resolve())
    assert meta["config"]["backbone"]["weights"] == clip and meta["config"]["backbone"]["pretrained"] is None
    assert meta["imported"]["backbone"]["clip_weights"] == clip and meta["clip_weights"] == clip
    assert f"with the CLIP weights {clip}" in capsys.readouterr().err
    plain = zsad_load.sidecar(tmp_path / "epoch_15.pth")  # no --clip-weights: the profile's CLIP, a separate import
    assert plain["imported"]["backbone"]["clip_weights"] == "open_clip:openai"
    torch.save(aliased_clip_state("zsad-tiny", 2), tmp_path / "tiny-clip.pt")
    with pytest.raises(ZsadError, match=r"tiny-clip\.pt does not fit ViT-L-14-336: shape mismatch") as err:
        zsad_load.sidecar(tmp_path / "epoch_15.pth", clip_weights=tmp_path / "tiny-clip.pt")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_sowa_released_file_with_clip_weights_runs_on_them_not_on_its_own_clip(tmp_path):
    """SOWA's checkpoint carries a CLIP; given --clip-weights, the on-the-fly import does not extract it, and the
    model built from the released file runs on the user's CLIP."""
    own, user = aliased_clip_state("ViT-L-14-336", 3), aliased_clip_state("ViT-L-14-336", 4)
    sowa_file(tmp_path / "mvtec.ckpt", 1024, 768, [6, 12, 18, 24], clip_state=own)
    torch.save(user, tmp_path / "user-clip.pt")
    loaded = zsad_load.load(tmp_path / "mvtec.ckpt", clip_weights=tmp_path / "user-clip.pt")
    method, meta = loaded.method, loaded.sidecar
    imported = Path(meta["imported"]["files"][0]["path"])
    assert imported == (tmp_path / "mvtec.ckpt").resolve()
    assert meta["config"]["taps"] == [6, 12, 18, 24]  # found from the file's own CLIP blocks
    assert meta["imported"]["backbone"]["clip_weights"] == str((tmp_path / "user-clip.pt").resolve())
    assert "clip_source" not in meta["imported"]["backbone"]
    _, sidecar = checkpoint_paths(zsad_load.resolve(tmp_path / "mvtec.ckpt", tmp_path / "user-clip.pt"))  # cached
    assert sidecar.parent.name.startswith("zsad-import-") and sidecar.is_file()
    assert not (sidecar.parent / "clip_weights.safetensors").exists()  # its own CLIP was not extracted
    clip = method.backbone.clip
    assert torch.equal(clip.visual.proj.detach(), user["visual.proj"].float())
    assert torch.equal(clip.visual.transformer.resblocks[5].attn.in_proj_weight.detach(),
                       user["visual.transformer.resblocks.5.attn.in_proj_weight"].float())
    assert not torch.equal(clip.visual.proj.detach(), own["visual.proj"].float())


# -- tests: tiny widths, independent re-computation of the released forward ---------------------------------------
def test_anomalyclip_matches_the_released_forward(tmp_path):
    sd = anomalyclip_file(tmp_path / "a.pth", 128, depth=3)
    out = import_checkpoint("anomalyclip", [tmp_path / "a.pth"], tmp_path / "ckpt", profile="tiny")
    method, _ = load(out)
    clip, visual, c = method.backbone.clip, method.backbone.clip.visual, method.config
    images = torch.randn(2, 3, 224, 224, generator=G)
    with torch.no_grad():
        env = run_stages(method.stages()[:2], images=images)
        # text: [SOT] ctx(12) object/damaged object . [EOT], deep prompts at text blocks 2..depth
        tok = tokens(method, [" ".join(["X"] * 12) + " object.", " ".join(["X"] * 12) + " damaged object."])
        emb = clip.token_embedding(tok)
        emb = torch.cat([emb[:, :1], torch.stack([sd["ctx_pos"][0, 0], sd["ctx_neg"][0, 0]]), emb[:, 13:]], dim=1)
        deep = [sd[f"compound_prompts_text.{j}"] for j in range(2)]
        text = F.normalize(ref_text(clip, emb, tok.argmax(-1), deep), dim=-1)
        # vision: DPAM from dual_start; the V-V stream skips the FFN; every tap aliases the last V-V state
        x = ref_embed(visual, images)
        x_vv = None
        for i, blk in enumerate(visual.transformer.resblocks, start=1):
            if i < c.dual_start:
                x = ref_block(blk, x)
                continue
            vv, qk = ref_attention(blk.attn, blk.ln_1(x), vv=True)[::-1]
            x_vv = (x if x_vv is None else x_vv) + vv
            x = x + qk
            x = x + blk.mlp(blk.ln_2(x))
        glob = x[:, 0] @ visual.proj  # no ln_post on the class token (released)
        image_prob = (F.normalize(glob, dim=-1) @ text.t() / 0.07).softmax(-1)[:, 1]
        patch = F.normalize(visual.ln_post(x_vv[:, 1:]) @ visual.proj, dim=-1)
        p = (patch @ text.t() / 0.07).softmax(-1)[..., 1]
        patch_map = (4 * p).reshape(2, 14, 14)  # four identical taps summed
    assert rel_err(env["image_prob"], image_prob) <= FP32_TOL
    assert rel_err(env["patch_map"], patch_map) <= FP32_TOL


def test_afclip_matches_the_released_forward(tmp_path):
    prompt, adaptor, s = afclip_files(tmp_path, 128, 128, 4, 32)
    out = import_checkpoint("afclip", [prompt, adaptor], tmp_path / "ckpt", profile="tiny")
    method, _ = load(out)
    clip, visual = method.backbone.clip, method.backbone.clip.visual
    images = torch.randn(2, 3, 224, 224, generator=G)
    with torch.no_grad():
        env = run_stages(method.stages()[:2], images=images)
        # text: [ctx(12)] + tokens("without defect." / "with defect."), cut to 77; EOT at 12 + argmax
        tok = tokens(method, ["without defect.", "with defect."])
        emb = torch.cat([s["prompt"].expand(2, -1, -1), clip.token_embedding(tok)], dim=1)[:, :77]
        text = F.normalize(ref_text(clip, emb, 12 + tok.argmax(-1)), dim=-1)
        x, taps = ref_embed(visual, images), []
        for i, blk in enumerate(visual.transformer.resblocks, start=1):
            x = ref_block(blk, x)
            if i in (1, 2, 3, 4):
                taps.append(x)
        logits = 0
        for tap in taps:
            for r in (1, 3, 5):  # unfold-weighted Gaussian (sigma 4), zero padding, class token untouched
                g = torch.arange(r, dtype=torch.float64) - r // 2
                kern = torch.exp(-(g[:, None] ** 2 + g[None] ** 2) / 32.0)
                kern = (kern / kern.sum()).float().reshape(1, 1, r * r, 1)
                grid = tap[:, 1:].transpose(1, 2).reshape(2, 128, 14, 14)
                cols = F.unfold(grid, r, padding=r // 2).reshape(2, 128, r * r, 196)
                agg = torch.cat([tap[:, :1], (cols * kern).sum(2).transpose(1, 2)], dim=1)
                u = F.layer_norm(agg, (128,), s["attention.norm.weight"], s["attention.norm.bias"])
                q, k, v = (u @ s[f"attention.attn.to_{n}.weight"].t() for n in "qkv")
                q, k, v = (t.reshape(2, -1, 4, 32).transpose(1, 2) for t in (q, k, v))
                a = ((q @ k.transpose(-1, -2)) * 32 ** -0.5).softmax(-1) @ v
                a = a.transpose(1, 2).reshape(2, -1, 128) @ s["attention.attn.to_out.0.weight"].t() \
                    + s["attention.attn.to_out.0.bias"]
                z = F.normalize(visual.ln_post(a) @ visual.proj, dim=-1)
                logits = logits + z @ text.t() / 0.07
        p = logits.softmax(-1)[..., 1]
    assert rel_err(env["image_prob"], p[:, 0]) <= FP32_TOL
    assert rel_err(env["patch_map"], p[:, 1:].reshape(2, 14, 14)) <= FP32_TOL


def test_bayespfl_matches_the_released_forward(tmp_path):
    sd = bayespfl_file(tmp_path / "b.pth", 128, 128, 128)
    out = import_checkpoint("bayespfl", [tmp_path / "b.pth"], tmp_path / "ckpt", profile="tiny",
                            overrides={"sampling": {"samples": 2}})
    method, _ = load(out)
    clip, visual = method.backbone.clip, method.backbone.clip.visual
    r_n, nb = 2, 3
    images = torch.randn(1, 3, 224, 224, generator=G)

    def lin(x, p):
        return x @ sd[p + ".weight"].t() + sd[p + ".bias"]

    def block(x, p):  # InferenceBlock
        return lin(F.softplus(lin(F.softplus(lin(x, p + ".module.0")), p + ".module.2")), p + ".module.4")

    def planar(z, u, w, b):  # z [W]; u, w [K,W]; b [K]
        for k in range(u.shape[0]):
            z = z + u[k] * torch.tanh(w[k] @ z + b[k])
        return z

    with torch.no_grad():
        env = run_stages(method.stages()[:4], **method.stage_inputs(images, "bottle"))
        x = ref_embed(visual, images)
        taps = []
        for blk in visual.transformer.resblocks:
            x = ref_block(blk, x)
            taps.append(x[:, 1:])
        glob = visual.ln_post(x[:, 0]) @ visual.proj  # [1,E]
        # flows, the released equations: var = exp(0.5 h); z0 = eps * sqrt(var) + mu; then K planar steps
        std = torch.exp(0.5 * block(glob, "context_encoder.weight_log_variance")).sqrt()[0]
        mu = block(glob, "context_encoder.weight_mean")[0]
        u = lin(glob, "PFL_context.amor_u").reshape(10, 128)
        w = lin(glob, "PFL_context.amor_w").reshape(10, 128)
        b = lin(glob, "PFL_context.amor_b").reshape(10)
        phi_e = torch.stack([planar(method.noise_context[r] * std + mu, u, w, b) for r in range(r_n)])
        phi = {}
        for branch, noise in (("PFL_normal", method.noise_normal), ("PFL_abnormal", method.noise_abnormal)):
            xi = sd[branch + ".state"]
            s_std = torch.exp(0.5 * block(xi, "state_encoder.weight_log_variance")).sqrt()[0]
            s_mu = block(xi, "state_encoder.weight_mean")[0]
            phi[branch] = torch.stack([planar(noise[r] * s_std + s_mu, sd[branch + ".amor_u"][0, :, :, 0],
                                              sd[branch + ".amor_w"][0, :, 0], sd[branch + ".amor_b"][0, :, 0, 0])
                                       for r in range(r_n)])
        # text: "X bottle", X replaced by [context + phi_e_r (5), state + phi_s_r (5)]; EOT index + 9
        tok = tokens(method, ["X bottle"])
        emb = clip.token_embedding(tok)[0]
        eot = int((tok[0] == 49407).nonzero()[0]) + 9
        rows = []
        for state_key, branch in (("prompt_state_normal", "PFL_normal"), ("prompt_state_abnormal", "PFL_abnormal")):
            for r in range(r_n):
                vf = torch.cat([sd["prompt_context"] + phi_e[r], sd[state_key] + phi[branch][r]], dim=1)  # [B,10,W]
                seq = torch.cat([emb[None, :1].expand(nb, -1, -1), vf, emb[None, 2:77 - 10 + 1].expand(nb, -1, -1)], 1)
                rows.append(ref_text(clip, seq, torch.full((nb,), eot)))
        text = F.normalize(torch.cat(rows), dim=-1)[None]  # [1, 2*R*B, E], row r*B + b
        t = text.shape[1] // 2
        tm = F.normalize(lin(text, "class_mapping"), dim=-1)
        h = lin(torch.cat(taps, dim=2), "fuse.fuse_modules")
        pooled = (lin(h, "fuse.compress").softmax(dim=1) * h).sum(1)
        im = F.normalize(lin(glob + lin(pooled, "fuse.post_process"), "image_mapping"), dim=-1)
        pro = sd["temperature_image"].exp() * (tm @ im[..., None])[..., 0]
        s_text = torch.stack([pro[:, :t], pro[:, t:]], -1).softmax(-1)[..., 1].mean(-1)
        diffs = []
        for layer, tap in enumerate(taps):  # RCA: q = Conv1d(k=1)(Z), 4 heads, scale E^-1/2, keys = values = F_s
            fs = F.normalize(tap @ sd[f"RCA.linear_proj.{layer}.weight"].t(), dim=-1)
            q = (text @ sd["RCA.q_proj_pre.weight"][..., 0].t() + sd["RCA.q_proj_pre.bias"]).reshape(1, -1, 4, 32)
            kv = fs.reshape(1, -1, 4, 32)
            attn = (torch.einsum("bnkc,bmkc->bknm", q, kv) * 128 ** -0.5).softmax(-1)
            upd = F.normalize(torch.einsum("bknm,bmkc->bnkc", attn, kv).reshape(1, -1, 128) + text, dim=-1)
            amap = sd["temperature_pixel"].exp() * fs @ upd.transpose(1, 2)  # [1,N,2T]
            diffs.append((amap[..., t:] - amap[..., :t]).transpose(1, 2).reshape(1, t, 14, 14))
    assert rel_err(env["text_features"], text) <= FP32_TOL
    assert rel_err(env["image_prob"], s_text) <= FP32_TOL
    assert rel_err(env["pair_logits"], torch.cat(diffs, dim=1)) <= FP32_TOL


def test_sowa_matches_the_released_forward(tmp_path):
    import zsad.methods as M

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        donor = M.create("sowa", "tiny", backbone={"init_seed": 7}).backbone.clip
    clip_state = {k: v.clone() for k, v in donor.state_dict().items()}
    sd = sowa_file(tmp_path / "s.ckpt", 128, 128, [1, 2, 3, 4], clip_state=clip_state)
    out = import_checkpoint("sowa", [tmp_path / "s.ckpt"], tmp_path / "ckpt", profile="tiny")
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["config"]["taps"] == [1, 2, 3, 4]  # found from the borrowed qkv
    assert (out / "clip_weights.safetensors").is_file()
    method, _ = load(out)
    clip, visual = method.backbone.clip, method.backbone.clip.visual
    assert torch.equal(visual.transformer.resblocks[2].attn.in_proj_weight,
                       clip_state["visual.transformer.resblocks.2.attn.in_proj_weight"])  # the file's own CLIP
    images = torch.randn(2, 3, 224, 224, generator=G)
    win, heads, g = 7, 8, 14
    with torch.no_grad():
        env = run_stages(method.stages()[:2], images=images)
        tok = tokens(method, [" ".join(["X"] * 12) + " object.", " ".join(["X"] * 12) + " damaged object."])
        emb = clip.token_embedding(tok)
        ctx = torch.cat([sd["net.prompt_learner.ctx_pos"][0], sd["net.prompt_learner.ctx_neg"][0]])
        emb = torch.cat([emb[:, :1], ctx, emb[:, 13:]], dim=1)
        text = ref_text(clip, emb, tok.argmax(-1)) @ sd["net.cross_fusion.linear.weight"].t() \
            + sd["net.cross_fusion.linear.bias"]
        text = F.normalize(text, dim=-1)
        x = ref_embed(visual, images)
        diffs = []
        for i, blk in enumerate(visual.transformer.resblocks):
            x = ref_block(blk, x)
            a = f"net.visual_encoder.adapters.{i}.blocks.0."
            feat = x[:, 1:]
            # Swin-V2 CPB over the log-spaced coordinate table, 16 sigmoid
            rc = torch.arange(-(win - 1), win, dtype=torch.float32)
            table = torch.stack(torch.meshgrid(rc, rc, indexing="ij"), -1) / (win - 1) * 8
            table = torch.sign(table) * torch.log2(table.abs() + 1) / math.log2(8)
            cpb = F.relu(table.reshape(-1, 2) @ sd[a + "attn.cpb_mlp.0.weight"].t() + sd[a + "attn.cpb_mlp.0.bias"]) \
                @ sd[a + "attn.cpb_mlp.2.weight"].t()
            co = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
            rel = (co[:, :, None] - co[:, None]).permute(1, 2, 0) + win - 1
            bias = 16 * torch.sigmoid(cpb[(rel[..., 0] * (2 * win - 1) + rel[..., 1]).reshape(-1)]
                                      .reshape(win * win, win * win, heads).permute(2, 0, 1))
            wins = (feat.reshape(2, g // win, win, g // win, win, 128).permute(0, 1, 3, 2, 4, 5)
                    .reshape(-1, win * win, 128))
            qkv = (wins @ sd[a + "attn.qkv"].t()).reshape(wins.shape[0], win * win, 3, heads, -1).permute(2, 0, 3, 1, 4)
            v = qkv[2]
            scale = torch.clamp(sd[a + "attn.logit_scale"], max=math.log(100)).exp()
            att = (F.normalize(v, dim=-1) @ F.normalize(v, dim=-1).transpose(-1, -2) * scale + bias).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(-1, win * win, 128) @ sd[a + "attn.proj.weight"].t() \
                + sd[a + "attn.proj.bias"]
            y = y.reshape(2, g // win, g // win, win, win, 128).permute(0, 1, 3, 2, 4, 5).reshape(2, g * g, 128)
            x1 = feat + F.layer_norm(y, (128,), sd[a + "norm1.weight"], sd[a + "norm1.bias"])
            x2 = x1 + F.layer_norm(x1 @ sd[a + "mlp.layers.0.weight"].t(), (128,), sd[a + "norm2.weight"],
                                   sd[a + "norm2.bias"])
            cos = F.normalize(x2 @ visual.proj, dim=-1) @ text.t()
            diffs.append((cos[..., 1] - cos[..., 0]).reshape(2, g, g))
        glob = F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)
        prob = (glob @ text.t() / 0.07).softmax(-1)[:, 1]
    assert rel_err(env["image_prob"], prob) <= FP32_TOL
    assert rel_err(env["layer_logits"], torch.stack(diffs, dim=1)) <= FP32_TOL


def test_import_is_deterministic_and_records_the_source(tmp_path):
    anomalyclip_file(tmp_path / "a.pth", 128, depth=3)
    out1 = import_checkpoint("anomalyclip", [tmp_path / "a.pth"], tmp_path / "c1", profile="tiny")
    out2 = import_checkpoint("anomalyclip", [tmp_path / "a.pth"], tmp_path / "c2", profile="tiny")
    w1, w2 = load_file(str(out1 / "checkpoint.safetensors")), load_file(str(out2 / "checkpoint.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    import hashlib

    imp = json.loads((out1 / "checkpoint.json").read_text())["imported"]
    assert imp["files"][0]["sha256"] == hashlib.sha256((tmp_path / "a.pth").read_bytes()).hexdigest()
    assert {"source": ["ctx_pos", "ctx_neg"], "target": "prompts.ctx",
            "op": "reshape (1,1,n,W)->(n,W) each; stack [ctx_pos, ctx_neg]"} in imp["mapping"]

