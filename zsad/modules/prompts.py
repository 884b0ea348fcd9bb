"""AnomalyCLIP's object-agnostic learnable prompts with deep text prompts.

Two sequences, ``[SOT][V1..Vn] object . [EOT]`` and ``[SOT][W1..Wn] damaged object . [EOT]``: the n context
vectors of each are learnable (N(0, 0.02) init) and replace the placeholder tokens' embeddings. Deep prompts:
``deep_length`` learnable tokens per text block for blocks 2..``deep_depth`` (1-based) overwrite token
positions 1..deep_length at that block's input, shared by both sequences. AnomalyCLIP's released learner
also builds ``compound_prompt_projections`` (8 x Linear 768->896) that are never used; we do not create them
(43,008 effective parameters at ViT-L instead of the 5.56 M usually quoted).

After training the two embeddings are a constant (2,E): export bakes them, nothing runs the text tower at
inference.

The same learner covers the other object-agnostic CoOp-style prompts of this toolkit (one implementation):

- SOWA: ``deep_depth=1`` (no deep prompts), separate normal/abnormal contexts after SOT (its ``ctx_pos`` /
  ``ctx_neg``), templates "{} object." / "{} damaged object.";
- AF-CLIP: ``shared_context=True`` (one set of n vectors for both prompts), ``placement="before_sot"`` (the
  learnable vectors come first and take positions 0..n-1: ``[V1..Vn][SOT] without defect . [EOT]``, cut to the
  context length; the end token moves to n + its token index), ``init_std=0.01``, templates "{} without
  defect." / "{} with defect." (the "{}" is dropped for this placement).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError

PLACEMENTS = ("after_sot", "before_sot")


class ObjectAgnosticPrompts(nn.Module):
    prefix: torch.Tensor  # buffers (register_buffer), declared for type checkers
    suffix: torch.Tensor
    eot_index: torch.Tensor

    def __init__(self, backbone, n_ctx: int = 12, deep_length: int = 4, deep_depth: int = 9,
                 normal_template: str = "{} object.", abnormal_template: str = "{} damaged object.",
                 shared_context: bool = False, placement: str = "after_sot", init_std: float = 0.02):
        super().__init__()
        text_blocks = len(backbone.clip.transformer.resblocks)
        if placement not in PLACEMENTS:
            raise ZsadError(f"prompt placement must be one of {PLACEMENTS}, got '{placement}'")
        if deep_depth > text_blocks:
            raise ZsadError(f"deep_depth {deep_depth} exceeds the text tower's {text_blocks} blocks")
        if deep_depth > 1 and deep_length > n_ctx:
            raise ZsadError("deep_length must not exceed n_ctx (deep prompts overwrite the context positions)")
        if deep_depth > 1 and placement != "after_sot":
            raise ZsadError("deep prompts overwrite positions 1..n after SOT: they need placement 'after_sot'")
        width = backbone.clip.token_embedding.embedding_dim
        self.n_ctx = n_ctx
        self.placement = placement
        if placement == "after_sot":
            placeholder = " ".join(["X"] * n_ctx)
            texts = [normal_template.format(placeholder), abnormal_template.format(placeholder)]
        else:
            texts = [normal_template.format("").strip(), abnormal_template.format("").strip()]
        tokens = backbone.tokenize(texts)
        with torch.no_grad():
            embedded = backbone.token_embeddings(tokens).float()
        if placement == "after_sot":
            # frozen token embeddings around the learnable context: [SOT] | ctx | rest (incl. EOT and padding)
            prefix, suffix, eot = embedded[:, :1], embedded[:, 1 + n_ctx:], tokens.argmax(dim=-1)
        else:
            # ctx | [SOT] text [EOT] padding, cut back to the context length
            if int(tokens.argmax(dim=-1).max()) + n_ctx >= tokens.shape[1]:
                raise ZsadError(f"{n_ctx} context vectors + the template do not fit {tokens.shape[1]} tokens")
            prefix, suffix, eot = embedded[:, :0], embedded[:, :tokens.shape[1] - n_ctx], tokens.argmax(dim=-1) + n_ctx
        self.register_buffer("prefix", prefix.clone(), persistent=False)
        self.register_buffer("suffix", suffix.clone(), persistent=False)
        self.register_buffer("eot_index", eot, persistent=False)
        self.ctx = nn.Parameter(torch.empty(1 if shared_context else 2, n_ctx, width).normal_(std=init_std))
        self.deep = nn.ParameterList(
            [nn.Parameter(torch.empty(deep_length, width).normal_(std=0.02)) for _ in range(max(deep_depth - 1, 0))])

    def forward(self, backbone, normalize: bool = True) -> torch.Tensor:
        """Text embeddings [2,E] (L2-normalised unless ``normalize=False``): row 0 normal, row 1 abnormal."""
        embeds = torch.cat([self.prefix, self.ctx.expand(2, -1, -1), self.suffix], dim=1)
        text = backbone.encode_prompted_text(embeds, self.eot_index, list(self.deep))
        return F.normalize(text, dim=-1) if normalize else text


class StaticTextCache:
    """Mixin for a Method (with ``self.prompts``) whose text embeddings are static after training (AF-CLIP, SOWA).

    ``text_embeddings()`` runs ``encode_text()`` (with gradients) while training or under grad mode and returns a
    cached constant otherwise; ``Method.train()`` and ``load_trainable_state_dict`` call
    ``invalidate_text_cache()``, so the cache never outlives the parameters it was computed from.
    """

    _text_cache: torch.Tensor | None = None
    training: bool  # provided by nn.Module
    prompts: ObjectAgnosticPrompts  # set by the method


    def encode_text(self) -> torch.Tensor:
        raise NotImplementedError

    def text_embeddings(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self.encode_text()
        if self._text_cache is None or self._text_cache.device != self.prompts.ctx.device:  # moved: recompute
            self._text_cache = self.encode_text().detach()
        return self._text_cache

    def invalidate_text_cache(self) -> None:
        self._text_cache = None
