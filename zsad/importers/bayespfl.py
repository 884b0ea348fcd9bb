"""Bayes-PFL (xiaozhen228/Bayes-PFL): ``train_{visa,mvtec}.pth`` = ``{"MyModel": Context_Prompting.state_dict()}``.

Released keys (models/VPB.py, models/PFL.py); E = W = 768, D = 1024, K = 10 flow steps, h = D/2 = 512 hidden,
B = 3 prompts, P = Q = 5:

| key | shape | zsad (``pfl.`` ...) |
|---|---|---|
| prompt_context / prompt_state_{normal,abnormal} | (B, P, W) | bank.context / state_normal / state_abnormal |
| temperature_pixel / temperature_image | () | tau_pixel / tau_image |
| context_encoder.weight_mean.module.{0,2,4}.* | Linear E->h->h->W | context_flow.encoder.mu.{0,2,4}.* |
| context_encoder.weight_log_variance.module.{0,2,4}.* | same | context_flow.encoder.log_var.{0,2,4}.* |
| PFL_context.amor_u / amor_w (Linear E -> K*W), amor_b (E -> K) | | context_flow.u / w / b |
| state_encoder.weight_mean / weight_log_variance ... | | state_flows.encoder.mu / log_var ... |
| PFL_normal.amor_{u,w,b} / state | (1,K,W,1) / (1,K,1,W) / (1,K,1,1) / (1,W) | state_flows.normal.u / w / b / xi (1) |
| PFL_abnormal.* | | state_flows.abnormal.* |
| RCA.q_proj_pre.weight (W,W,1) / bias | Conv1d k=1 | rca.query.weight (W,W): kernel axis squeezed / bias |
| RCA.linear_proj.{l}.weight (W,D) | | rca.patch_proj.{l}.weight |
| fuse.fuse_modules / compress / post_process | Linear 4D->h, h->1, h->W | fuse.proj / score / out |
| class_mapping / image_mapping | Linear W->W | class_mapping / image_mapping |

(1) reshaped to (K,W) / (K,W) / (K) / (1,W).

Dropped: the two decoders (a discarded reconstruction idea), the three ``p_mu`` layers, and the duplicates the
shared modules create (``PFL_context.encoder.*`` is ``context_encoder.*``, ``PFL_normal/abnormal.encoder.*`` is
``state_encoder.*``, ... : checked equal). Backbone: the released code runs CLIP with plain GELU (not QuickGELU) and
a bicubic positional-table resize; the import sets both.
"""
from __future__ import annotations

from pathlib import Path

from zsad import ZsadError
from zsad.importers.base import Importer, Mapping, Source
from zsad.importers.detect import detect_format, flatten
from zsad.importers.torchfile import read_torch_file

LINEAR = ("weight", "bias")


class BayesPflImporter(Importer):
    name = "bayespfl"
    method = "bayespfl"
    files_help = "train_<data>.pth ({'MyModel': state_dict})"

    def read(self, files: list[Path]) -> Source:
        obj = read_torch_file(files[0])
        found = detect_format(obj)
        if found != self.name:
            raise ZsadError(f"{files[0]} is not a Bayes-PFL checkpoint (detected: {found})")
        return Source(self.name, flatten(obj["MyModel"]), files)

    def settings(self, source: Source, profile: str) -> dict:
        """GELU + bicubic with antialias (the released backbone: open_clip's resize_pos_embed), and the head sizes the
        file was built with (the released code derives them: hidden = fuse width = vision width / 2, B x P / Q
        prompt vectors, K flow steps)."""
        banks, p, _ = source.shape("prompt_context")
        return {"backbone": {"quick_gelu": False, "pos_interpolation": "bicubic", "pos_antialias": True,
                             "pos_align_corners": False},
                "prompt": {"banks": banks, "context_length": p, "state_length": source.shape("prompt_state_normal")[1]},
                "flow": {"hidden": source.shape("context_encoder.weight_mean.module.0.weight")[0],
                         "length": source.shape("PFL_context.amor_b.weight")[0]},
                "fuse_dim": source.shape("fuse.fuse_modules.weight")[0]}

    def convert(self, source: Source, m: Mapping) -> None:
        t = m.target_shapes
        for src, dst in (("prompt_context", "bank.context"), ("prompt_state_normal", "bank.state_normal"),
                         ("prompt_state_abnormal", "bank.state_abnormal"), ("temperature_pixel", "tau_pixel"),
                         ("temperature_image", "tau_image"), ("class_mapping.weight", "class_mapping.weight"),
                         ("class_mapping.bias", "class_mapping.bias"), ("image_mapping.weight", "image_mapping.weight"),
                         ("image_mapping.bias", "image_mapping.bias"), ("fuse.fuse_modules.weight", "fuse.proj.weight"),
                         ("fuse.fuse_modules.bias", "fuse.proj.bias"), ("fuse.compress.weight", "fuse.score.weight"),
                         ("fuse.compress.bias", "fuse.score.bias"), ("fuse.post_process.weight", "fuse.out.weight"),
                         ("fuse.post_process.bias", "fuse.out.bias"), ("RCA.q_proj_pre.bias", "rca.query.bias"),
                         ("PFL_context.amor_u.weight", "context_flow.u.weight"),
                         ("PFL_context.amor_u.bias", "context_flow.u.bias"),
                         ("PFL_context.amor_w.weight", "context_flow.w.weight"),
                         ("PFL_context.amor_w.bias", "context_flow.w.bias"),
                         ("PFL_context.amor_b.weight", "context_flow.b.weight"),
                         ("PFL_context.amor_b.bias", "context_flow.b.bias")):
            m.take(src, "pfl." + dst, t["pfl." + dst])
        e = t["pfl.rca.query.weight"]
        m.take("RCA.q_proj_pre.weight", "pfl.rca.query.weight", (*e, 1), "Conv1d(k=1) weight (W,W,1) -> (W,W)",
               lambda w: w[..., 0])
        n_layers = sum(1 for k in t if k.startswith("pfl.rca.patch_proj."))
        for layer in range(n_layers):
            dst = f"pfl.rca.patch_proj.{layer}.weight"
            m.take(f"RCA.linear_proj.{layer}.weight", dst, t[dst])
        for enc, dst in (("context_encoder", "context_flow.encoder"), ("state_encoder", "state_flows.encoder")):
            for branch, zsad_branch in (("weight_mean", "mu"), ("weight_log_variance", "log_var")):
                for i in (0, 2, 4):
                    for p in LINEAR:
                        target = f"pfl.{dst}.{zsad_branch}.{i}.{p}"
                        m.take(f"{enc}.{branch}.module.{i}.{p}", target, t[target])
        k, w = t["pfl.state_flows.normal.u"]
        for branch, zsad_branch in (("PFL_normal", "normal"), ("PFL_abnormal", "abnormal")):
            dst = f"pfl.state_flows.{zsad_branch}"
            m.take(f"{branch}.amor_u", f"{dst}.u", (1, k, w, 1), "reshape (1,K,W,1)->(K,W)", lambda x: x.reshape(k, w))
            m.take(f"{branch}.amor_w", f"{dst}.w", (1, k, 1, w), "reshape (1,K,1,W)->(K,W)", lambda x: x.reshape(k, w))
            m.take(f"{branch}.amor_b", f"{dst}.b", (1, k, 1, 1), "reshape (1,K,1,1)->(K,)", lambda x: x.reshape(k))
            m.take(f"{branch}.state", f"{dst}.xi", (1, w))
        # shared modules appear twice in a state_dict: check the copies are the tensors mapped above, then drop
        for holder, canonical in (("PFL_context.encoder.", "context_encoder."),
                                  ("PFL_normal.encoder.", "state_encoder."),
                                  ("PFL_abnormal.encoder.", "state_encoder."),
                                  ("PFL_context.decoder.", "context_decoder."),
                                  ("PFL_normal.decoder.", "state_decoder."),
                                  ("PFL_abnormal.decoder.", "state_decoder.")):
            for key in [k for k in source.tensors if k.startswith(holder)]:
                m.drop(key, f"the same module as {canonical}*", same_as=canonical + key[len(holder):])
        m.drop_prefix("context_decoder.", "decoder of a discarded reconstruction loss: unused")
        m.drop_prefix("state_decoder.", "decoder of a discarded reconstruction loss: unused")
        for branch in ("PFL_context", "PFL_normal", "PFL_abnormal"):
            m.drop_prefix(f"{branch}.p_mu.", "reconstruction head: unused")
