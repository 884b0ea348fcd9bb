"""AnomalyCLIP's object-agnostic learnable prompts with deep text prompts.

Two sequences, ``[SOT][V1..Vn] object . [EOT]`` and ``[SOT][W1..Wn] damaged object . [EOT]``: the n context
vectors of each are learnable (N(0, 0.02) init) and replace the placeholder tokens' embeddings. Deep prompts:
``deep_length`` learnable tokens per text block for blocks 2..``deep_depth`` (1-based) overwrite token
positions 1..deep_length at that block's input, shared by both sequences. AnomalyCLIP's released learner
also builds ``compound_prompt_projections`` (8 x Linear 768->896) that are never used; we do not create them
(43,008 effective parameters at ViT-L instead of the 5.56 M usually quoted).

After training the two embeddings are a constant (2,E): export bakes them, nothing runs the text tower at
inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError


class ObjectAgnosticPrompts(nn.Module):
    def __init__(self, backbone, n_ctx: int = 12, deep_length: int = 4, deep_depth: int = 9,
                 normal_template: str = "{} object.", abnormal_template: str = "{} damaged object."):
        super().__init__()
        text_blocks = len(backbone.clip.transformer.resblocks)
        if deep_depth > text_blocks:
            raise ZsadError(f"deep_depth {deep_depth} exceeds the text tower's {text_blocks} blocks")
        if deep_depth > 1 and deep_length > n_ctx:
            raise ZsadError("deep_length must not exceed n_ctx (deep prompts overwrite the context positions)")
        width = backbone.clip.token_embedding.embedding_dim
        self.n_ctx = n_ctx
        placeholder = " ".join(["X"] * n_ctx)
        texts = [normal_template.format(placeholder), abnormal_template.format(placeholder)]
        tokens = backbone.tokenize(texts)
        with torch.no_grad():
            embedded = backbone.token_embeddings(tokens).float()
        # frozen token embeddings around the learnable context: [SOT] | ctx | rest (incl. EOT and padding)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("eot_index", tokens.argmax(dim=-1), persistent=False)
        self.ctx = nn.Parameter(torch.empty(2, n_ctx, width).normal_(std=0.02))
        self.deep = nn.ParameterList(
            [nn.Parameter(torch.empty(deep_length, width).normal_(std=0.02)) for _ in range(max(deep_depth - 1, 0))])

    def forward(self, backbone) -> torch.Tensor:
        """Normalised text embeddings [2,E]: row 0 normal, row 1 abnormal."""
        embeds = torch.cat([self.prefix, self.ctx, self.suffix], dim=1)
        text = backbone.encode_prompted_text(embeds, self.eot_index, list(self.deep))
        return F.normalize(text, dim=-1)
