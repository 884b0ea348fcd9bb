"""SOWA (huzongxiang/sowa): a PyTorch Lightning checkpoint of ``AnomalyCLIPModule`` (``net`` = ``AnomalyCLIP``).

The file holds ``state_dict`` (every tensor of the module, frozen CLIP included, under ``net.``), optimizer and
loop states, and Hydra ``hyper_parameters`` (``functools.partial`` optimizers, loss modules): read with the
restricted unpickler, which keeps those as inert records. Released keys (``net.`` stripped; D = 1024, W = 768,
H = 8 heads, adapter i of ``visual_encoder.adapters`` built on CLIP block ``feature_map_idx[i]``):

| key | shape | zsad |
|---|---|---|
| prompt_learner.ctx_pos / ctx_neg | (1, 1, 12, W) | prompts.ctx[0] / [1] (reshaped, stacked) |
| cross_fusion.linear.weight / bias | (W, W) / (W,) | text_fusion.weight / bias |
| visual_encoder.adapters.{i}.blocks.0.attn.logit_scale | (H, 1, 1) | adapters.{i}.logit_scale (H,) |
| ....attn.cpb_mlp.0.weight / bias, ....2.weight | (64, 2) / (64,), (H, 64) | adapters.{i}.cpb.mlp.0.* / mlp.2.weight |
| ....norm1.* / ....norm2.* | (D,) | adapters.{i}.norm1.* / norm2.* |
| ....mlp.layers.0.weight | (D, D) | adapters.{i}.linear.weight |

Dropped: ``....attn.qkv`` / ``....attn.proj.*`` (the borrowed, frozen CLIP in_proj_weight / out_proj of the tapped
block: checked equal to it, and the block index found this way gives the taps), the coordinate table and index
buffers (constants zsad rebuilds), the prompt learner's token buffers, and the frozen CLIP with its copies under
``text_encoder`` / ``prompt_learner.clip_model`` / ``visual_encoder.clip_model``. That CLIP (OpenAI ViT-L/14@336)
is written next to the checkpoint as ``clip_weights.safetensors`` unless ``--clip-weights`` is given, so the
import needs no download.
"""
from __future__ import annotations

from pathlib import Path

import torch

from zsad import ZsadError
from zsad.importers.base import Importer, Mapping, Source
from zsad.importers.detect import detect_format, flatten
from zsad.importers.torchfile import dtype_of, read_torch_file, same_tensor, shape_of

ADAPTERS = "visual_encoder.adapters."
CLIP = "clip_model."
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


class SowaImporter(Importer):
    name = "sowa"
    method = "sowa"
    files_help = "a Lightning checkpoint (e.g. last.ckpt / epoch_000.ckpt)"

    def read(self, files: list[Path]) -> Source:
        obj = read_torch_file(files[0])
        found = detect_format(obj)
        if found != self.name:
            raise ZsadError(f"{files[0]} is not a SOWA Lightning checkpoint (detected: {found})")
        state = flatten(obj["state_dict"])
        tensors = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        glue = sorted(k for k in state if not k.startswith("net."))
        version = obj.get("pytorch-lightning_version")
        notes = {"lightning_version": version[:40] if isinstance(version, str) else None,
                 "module_state_outside_net": glue[:100]}
        source = Source(self.name, tensors, files, notes=notes)
        source.notes["taps"] = self._taps(source)
        return source

    def _adapters(self, source: Source) -> list[int]:
        return sorted({int(k[len(ADAPTERS):].split(".")[0]) for k in source.tensors if k.startswith(ADAPTERS)})

    def _taps(self, source: Source) -> list[int] | None:
        """1-based CLIP blocks the adapters were built on: the block whose in_proj_weight each adapter's qkv is."""
        prefix = CLIP + "visual.transformer.resblocks."
        blocks = sorted({int(k.split(".")[4]) for k in source.tensors
                         if k.startswith(prefix) and k.endswith(".attn.in_proj_weight")})
        if not blocks:
            return None
        taps = []
        for i in self._adapters(source):
            qkv = source.tensors[f"{ADAPTERS}{i}.blocks.0.attn.qkv"]
            match = []
            for b in blocks:  # shapes first (nothing read on a mismatch); a shared tensor is equal unread
                block = source.tensors[f"{CLIP}visual.transformer.resblocks.{b}.attn.in_proj_weight"]
                if shape_of(qkv) == shape_of(block) and dtype_of(qkv) == dtype_of(block) and same_tensor(qkv, block):
                    match.append(b)
            if len(match) != 1:
                raise ZsadError(f"SOWA checkpoint {source.names()}: adapter {i}'s frozen qkv matches "
                                f"{len(match)} CLIP blocks (expected exactly one)")
            taps.append(match[0] + 1)
        return taps

    def settings(self, source: Source, profile: str) -> dict:
        taps = source.notes.get("taps")
        if taps is None:
            from zsad.methods import resolve_config

            taps = resolve_config(self.method, profile).taps
        if len(taps) != len(self._adapters(source)):
            raise ZsadError(f"SOWA checkpoint {source.names()}: {len(self._adapters(source))} adapters, "
                            f"the {profile} profile taps {len(taps)} layers")
        return {"taps": list(taps)}

    def clip_state(self, source: Source) -> dict[str, object] | None:
        state = {k[len(CLIP):]: v for k, v in source.tensors.items()
                 if k.startswith(CLIP) and k[len(CLIP):] not in OPENAI_EXTRAS}
        return state or None

    def convert(self, source: Source, m: Mapping) -> None:
        t = m.target_shapes
        n_ctx, width = t["prompts.ctx"][1:]
        m.take(["prompt_learner.ctx_pos", "prompt_learner.ctx_neg"], "prompts.ctx", (1, 1, n_ctx, width),
               "reshape (1,1,n,W)->(n,W) each; stack [ctx_pos, ctx_neg]",
               lambda p, n: torch.stack([p.reshape(n_ctx, width), n.reshape(n_ctx, width)]))
        m.take("cross_fusion.linear.weight", "text_fusion.weight", t["text_fusion.weight"])
        m.take("cross_fusion.linear.bias", "text_fusion.bias", t["text_fusion.bias"])
        taps = source.notes.get("taps")
        for i in self._adapters(source):
            src, dst = f"{ADAPTERS}{i}.blocks.0.", f"adapters.{i}."
            if dst + "logit_scale" not in t:
                raise ZsadError(f"SOWA checkpoint {source.names()}: adapter {i} is beyond the profile's adapters")
            heads = t[dst + "logit_scale"][0]
            m.take(src + "attn.logit_scale", dst + "logit_scale", (heads, 1, 1), "reshape (H,1,1)->(H,)",
                   lambda x, h=heads: x.reshape(h))
            for a, b in (("attn.cpb_mlp.0.weight", "cpb.mlp.0.weight"), ("attn.cpb_mlp.0.bias", "cpb.mlp.0.bias"),
                         ("attn.cpb_mlp.2.weight", "cpb.mlp.2.weight"), ("norm1.weight", "norm1.weight"),
                         ("norm1.bias", "norm1.bias"), ("norm2.weight", "norm2.weight"), ("norm2.bias", "norm2.bias"),
                         ("mlp.layers.0.weight", "linear.weight")):
                m.take(src + a, dst + b, t[dst + b])
            block = f"{CLIP}visual.transformer.resblocks.{taps[i] - 1}.attn." if taps else None
            m.drop(src + "attn.qkv", "the tapped CLIP block's frozen in_proj_weight (borrowed)",
                   same_as=block + "in_proj_weight" if block else None)
            for p in ("weight", "bias"):
                m.drop(src + f"attn.proj.{p}", "the tapped CLIP block's frozen out_proj (borrowed)",
                       same_as=block + f"out_proj.{p}" if block else None)
            for buf in ("attn.relative_coords_table", "attn.relative_position_index"):
                m.drop(src + buf, "constant of the window geometry (zsad rebuilds it)")
        for k in ("tokenized_prompts_pos", "tokenized_prompts_neg", "token_prefix_pos", "token_suffix_pos",
                  "token_prefix_neg", "token_suffix_neg"):
            m.drop("prompt_learner." + k, "template tokens / their frozen CLIP embeddings (zsad rebuilds them)")
        for prefix in ("prompt_learner.clip_model.", "visual_encoder.clip_model.", "text_encoder.",
                       "visual_encoder.proj"):
            m.drop_prefix(prefix, "a reference to the frozen CLIP (same tensors as clip_model.*)")
        m.drop_prefix(CLIP, "the frozen CLIP (not a trainable parameter; see clip_weights)")
