"""AnomalyCLIP (zqhang/AnomalyCLIP): ``epoch_15.pth`` = ``{"prompt_learner": AnomalyCLIP_PromptLearner.state_dict()}``.

Released keys (prompt_ensemble.py), n_ctx 12, deep length 4, depth 9, text width W = 768:

| key | shape | zsad |
|---|---|---|
| ctx_pos / ctx_neg | (1, 1, 12, W) | prompts.ctx[0] / [1] (reshaped to (12, W), stacked) |
| compound_prompts_text.{j}, j < 8 | (4, W) | prompts.deep.{j} |
| compound_prompt_projections.{j}.weight / bias | (896, W) / (896,) | dropped: built but never used |
| token_prefix_* / token_suffix_* | (1, 1, 1, W) / (1, 1, 64, W) | dropped: CLIP token embeddings of the fixed words |
| tokenized_prompts_pos / _neg | (1, 1, 77) | dropped: token ids of "X*12 object." / "X*12 damaged object." |

Taps: the released checkpoints predate the repository's 2025-04-13 fix: ``out_tokens.append(x[0])`` aliased the
V-V stream that later blocks update in place, so the four "taps" 6/12/18/24 all held the last block's output while
the prompts trained and while the published numbers were measured. The import sets taps to the last block four
times (sum of four identical maps, exactly the released test.py of that time).
"""
from __future__ import annotations

from pathlib import Path

import torch

from zsad import ZsadError
from zsad.backbone import arch_config
from zsad.importers.base import Importer, Mapping, Source
from zsad.importers.detect import detect_format, flatten
from zsad.importers.torchfile import read_torch_file


class AnomalyClipImporter(Importer):
    name = "anomalyclip"
    method = "anomalyclip"
    files_help = "epoch_N.pth ({'prompt_learner': state_dict})"

    def read(self, files: list[Path]) -> Source:
        obj = read_torch_file(files[0])
        found = detect_format(obj)
        if found != self.name:
            raise ZsadError(f"{files[0]} is not an AnomalyCLIP checkpoint (detected: {found})")
        return Source(self.name, flatten(obj["prompt_learner"]), files)

    def settings(self, source: Source, profile: str) -> dict:
        from zsad.methods import resolve_config

        cfg = resolve_config(self.method, profile)
        layers = arch_config(cfg.backbone.arch)["vision_cfg"]["layers"]
        return {"taps": [layers] * len(cfg.taps)}

    def convert(self, source: Source, m: Mapping) -> None:
        ctx = m.target_shapes["prompts.ctx"]  # (2, n_ctx, W)
        n_ctx, width = ctx[1], ctx[2]
        m.take(["ctx_pos", "ctx_neg"], "prompts.ctx", (1, 1, n_ctx, width),
               "reshape (1,1,n,W)->(n,W) each; stack [ctx_pos, ctx_neg]",
               lambda p, n: torch.stack([p.reshape(n_ctx, width), n.reshape(n_ctx, width)]))
        deep = sorted(k for k in m.target_shapes if k.startswith("prompts.deep."))
        released = sorted(k for k in source.tensors if k.startswith("compound_prompts_text."))
        if len(released) != len(deep):
            raise ZsadError(f"AnomalyCLIP checkpoint {source.names()}: {len(released)} deep prompt layers "
                            f"(compound_prompts_text.*), the profile expects {len(deep)}")
        for j in range(len(deep)):
            m.take(f"compound_prompts_text.{j}", f"prompts.deep.{j}", m.target_shapes[f"prompts.deep.{j}"])
        m.drop_prefix("compound_prompt_projections.", "created by the released learner but never used")
        for k in ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg"):
            m.drop(k, "frozen CLIP token embeddings of the template words (zsad rebuilds them from the CLIP)")
        for k in ("tokenized_prompts_pos", "tokenized_prompts_neg"):
            m.drop(k, "token ids of the templates (zsad tokenises the same text)")
