"""open_clip loading and the tapped, attention-switchable ViT forward every method builds on.

``load_clip`` wraps an open_clip CLIP (pretrained tag, local weights file, or random weights), resizes the
positional embedding once for the requested image size and freezes everything. ``ClipBackbone.forward_taps``
returns plain tensors (global embedding, tapped token maps) with a per-layer attention mode:

- ``qk``: stock CLIP attention (the open_clip block itself, so results equal ``encode_image`` exactly);
- ``vv``: q = k = v (V-V attention with the frozen qkv and out_proj), FFN kept, one stream;
- ``dual``: AnomalyCLIP's DPAM / BAG-CLIP's BSA: the stock stream runs on, and a second V-V stream starts at
  ``start`` from that block's input, adds the V-V attention of the *stock* stream's ``ln_1`` output and skips
  the FFN. Taps at dual layers read the V-V stream.

Everything is out of place (AnomalyCLIP's in-place ``+=`` aliased all of its taps to the last layer).

Position table for another image size (:class:`PosResize`, the profile's ``pos_*`` fields): row 0 (the class
token) is kept as it is; rows 1.. are read as the row-major g x g grid (row = y), channels moved in front, resized
with ``F.interpolate`` (mode, align_corners, antialias), and laid back out row-major. All four released codebases
lay the grid out this way and keep the class row; they differ in the interpolation (docs/methods/*.md, "backbone").
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError
from zsad._compat import import_open_clip
from zsad.modules.attention import class_token_block, dual_attention, vv_attention

open_clip = import_open_clip()

log = logging.getLogger(__name__)

CLIP_CONFIG_DIR = Path(__file__).parent / "configs" / "clip"
ATTENTION_MODES = ("qk", "vv", "dual")
POS_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

_registered_config_paths: set[str] = set()

# an open_clip CLIP model or one of its towers. Their submodules are reached as attributes (visual.transformer,
# blk.attn, ...), which nn.Module types as `Tensor | Module`; the classes vary with the architecture, so: Any.
OpenClipModule = Any


def _register_config(path: Path) -> None:
    key = str(path.resolve())
    if key not in _registered_config_paths:
        open_clip.add_model_config(path)
        _registered_config_paths.add(key)


def resolve_arch(arch: str) -> str:
    """Return an open_clip model name for ``arch``: a built-in name, one of ours (zsad-tiny), or a JSON file."""
    _register_config(CLIP_CONFIG_DIR)
    path = Path(arch)
    if arch.endswith(".json"):
        if not path.is_file():
            raise ZsadError(f"CLIP architecture file not found: {arch}")
        _register_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise ZsadError(
            f"Unknown CLIP architecture '{arch}'. Use an open_clip model name (e.g. ViT-L-14-336, "
            f"ViT-B-16), 'zsad-tiny', or a path to an open_clip model-config JSON file."
        )
    return arch


def resolve_quick_gelu(arch: str, pretrained: str | None, quick_gelu: bool | None) -> bool:
    """QuickGELU is right for OpenAI's CLIP weights; getting it wrong silently changes every feature.

    ``None`` means automatic: QuickGELU for the ``openai`` tag or a ``-quickgelu`` architecture, else the
    architecture's own activation (plain GELU for open_clip's ViT configs).
    """
    openai = pretrained == "openai"
    if quick_gelu is None:
        return openai or arch.endswith("-quickgelu")
    if openai and not quick_gelu:
        warnings.warn(
            "OpenAI CLIP weights were trained with QuickGELU but quick_gelu=False was requested: features "
            "will differ from OpenAI's (intended only for methods that deliberately run GELU, e.g. Bayes-PFL).",
            stacklevel=3,
        )
    return bool(quick_gelu)


def _read_state_dict(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The CLIP weights in ``path`` (.safetensors, torch.save state dict, or OpenAI's TorchScript .pt), floats as
    float32: read without running anything from the file, every key and declared shape checked against
    ``expected`` (the model's own state dict) before a tensor is read (zsad.importers.clipfile)."""
    from zsad.importers.clipfile import read_clip_state

    return read_clip_state(path, expected)


@dataclass(frozen=True)
class PosResize:
    """How CLIP's position table is resized to another grid: ``F.interpolate``'s mode, align_corners, antialias.

    The class-token row is kept and the grid is row-major in every released codebase (module docstring), so those
    are not settings. Note: antialias changes bicubic even when up-sampling (torch's antialiased bicubic is PIL's
    kernel, a = -0.5, the plain one a = -0.75); for bilinear it matters only when down-sampling.
    """

    mode: str = "bilinear"
    align_corners: bool = False
    antialias: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POS_INTERPOLATIONS:
            raise ZsadError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got '{self.mode}'")
        for name, value in (("pos_align_corners", self.align_corners), ("pos_antialias", self.antialias)):
            if not isinstance(value, bool):
                raise ZsadError(f"{name} must be true or false, got {value!r}")
        if self.mode == "nearest" and (self.align_corners or self.antialias):
            raise ZsadError("pos_align_corners / pos_antialias apply to bilinear and bicubic, not 'nearest'")


def _interpolate_grid(pos: torch.Tensor, grid: int, resize: PosResize) -> torch.Tensor:
    """Resize a [1 + g*g, D] CLIP positional table (class token first) to a ``grid`` x ``grid`` patch grid."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    old = int(round(math.sqrt(patch_pos.shape[0])))
    if old * old != patch_pos.shape[0]:
        raise ZsadError(f"positional embedding with {patch_pos.shape[0]} patch rows is not a square grid")
    if old == grid:
        return pos.clone()
    img = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    kwargs = {} if resize.mode == "nearest" else {"align_corners": resize.align_corners,
                                                  "antialias": resize.antialias}
    img = F.interpolate(img, size=(grid, grid), mode=resize.mode, **kwargs)
    patch_pos = img.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, resize: PosResize) -> None:
    own = model.state_dict()
    key = "visual.positional_embedding"
    if key in state and key in own and state[key].shape != own[key].shape:
        grid = int(round(math.sqrt(own[key].shape[0] - 1)))
        state = dict(state, **{key: _interpolate_grid(state[key], grid, resize)})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:4]))
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ZsadError(
            f"{path} does not fit the chosen CLIP architecture: " + "; ".join(parts)
            + ". Check that --clip-arch matches the file (e.g. ViT-L-14-336 for OpenAI ViT-L/14@336px)."
        )
    model.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class BackboneInfo:
    arch: str
    image_size: int
    patch_size: int
    grid: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    quick_gelu: bool
    weights: str  # where the weights came from: a tag, a file, or "random"


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP with a tapped forward. ``self.clip`` is the open_clip model itself."""

    clip: OpenClipModule

    def __init__(self, clip: OpenClipModule, info: BackboneInfo):
        super().__init__()
        if not (hasattr(clip, "visual") and hasattr(clip.visual, "transformer") and hasattr(clip, "token_embedding")):
            raise ZsadError(f"{info.arch}: only open_clip ViT CLIP models with the built-in text tower are supported")
        self.clip = clip
        self.info = info
        self.requires_grad_(False)
        self.eval()

    # -- vision ---------------------------------------------------------------------------------------------
    @property
    def visual(self) -> OpenClipModule:
        return self.clip.visual

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """conv1 + class token + positional embedding + ln_pre: [B,3,S,S] -> [B,1+N,D]."""
        v = self.visual
        s = self.info.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise ZsadError(f"expected images of shape [B,3,{s},{s}], got {tuple(images.shape)}")
        x = v.conv1(images)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream stays fp32 under autocast (the blocks compute in half, their sums do not): CPU
            # autocast keeps LayerNorm in its input's dtype, so a half conv1 output would make every residual add half,
            # where an outlier channel of 300 rounds to bf16's steps of 2 (CUDA autocast's fp32 LayerNorm gives fp32)
            x = x.float()
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def forward_taps(
        self,
        images: torch.Tensor,
        taps: Sequence[int],
        mode: str = "qk",
        start: int = 1,
        global_ln_post: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the image tower and return ``(global [B,E], taps [B,L,N,D])``.

        ``taps`` are 1-based block indices (6/12/18/24 = the outputs of ``resblocks[5/11/17/23]``); the tapped
        tensors are the raw residual stream (before ``ln_post``), class token dropped. ``mode`` applies to the
        blocks ``start..layers`` (1-based); earlier blocks are stock. ``global_ln_post=False`` reproduces
        AnomalyCLIP's global feature (class token @ proj without ``ln_post``).
        """
        if mode not in ATTENTION_MODES:
            raise ZsadError(f"attention mode must be one of {ATTENTION_MODES}, got '{mode}'")
        n_layers = self.info.layers
        taps = [int(t) for t in taps]
        if not taps or any(t < 1 or t > n_layers for t in taps):
            raise ZsadError(f"taps must be 1-based block indices in 1..{n_layers}, got {taps}")
        if not 1 <= start <= n_layers:
            raise ZsadError(f"start must be a 1-based block index in 1..{n_layers}, got {start}")
        tap_set = set(taps)
        x = self.embed_patches(images)
        x_vv = None
        tapped: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.visual.transformer.resblocks, start=1):
            layer_mode = mode if i >= start else "qk"
            # after the last block the stock stream gives only its class token (the global embedding) unless that
            # block's stock output is tapped: its other tokens are not computed (1/24 of a ViT-L's MLP and of its
            # stock attention; exact, the class token's query attends to every token as before)
            class_token_only = i == n_layers and (layer_mode == "dual" or layer_mode == "qk" and i not in tap_set)
            if layer_mode == "qk":
                x = class_token_block(blk, x) if class_token_only else blk(x)
            elif layer_mode == "vv":
                x = x + blk.ls_1(vv_attention(blk.attn, blk.ln_1(x)))
                x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
            else:
                if x_vv is None:
                    x_vv = x
                a_qk, a_vv = dual_attention(blk.attn, blk.ln_1(x), qk_rows=1 if class_token_only else None)
                x_vv = x_vv + blk.ls_1(a_vv)  # the V-V stream skips the FFN
                x = (x[:, :1] if class_token_only else x) + blk.ls_1(a_qk)
                x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
            if i in tap_set:
                # taps at dual layers read the V-V stream (always started by then; `is not None` is for mypy)
                tapped[i] = (x_vv if layer_mode == "dual" and x_vv is not None else x)[:, 1:]
        cls = x[:, 0]
        if global_ln_post:
            cls = self.visual.ln_post(cls)
        return cls @ self.visual.proj, torch.stack([tapped[t] for t in taps], dim=1)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post(tokens) @ proj``: width-D tokens into the joint embedding space (any leading shape)."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return tokenize(self.info.arch, texts)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(tokens)

    def encode_prompted_text(
        self,
        embeddings: torch.Tensor,
        eot_index: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Text tower over ready token embeddings [P,L,W] with optional deep prompts; returns [P,E] (not normalised).

        ``L`` may be shorter than the context length (sequences cut after their end token).

        ``deep_prompts[j]`` ([n,W]) overwrites token positions 1..n at the input of text block j+2 (1-based),
        the AnomalyCLIP/MaPLe convention; ``eot_index`` [P] says where each sequence's end token is.
        """
        clip = self.clip
        blocks = clip.transformer.resblocks
        if len(deep_prompts) >= len(blocks):
            raise ZsadError(f"{len(deep_prompts)} deep prompt layers need a text tower deeper than "
                            f"{len(blocks)} blocks")
        # a batch may be cut after its last end token (L <= context length): causal attention makes the end-token
        # outputs identical to the full-length run's, at a fraction of the cost (Bayes-PFL's 60 prompts per image)
        length = embeddings.shape[1]
        if length > clip.positional_embedding.shape[0]:
            raise ZsadError(f"text sequences of {length} tokens exceed the context length "
                            f"{clip.positional_embedding.shape[0]}")
        x = embeddings + clip.positional_embedding[:length].to(embeddings.dtype)
        mask = clip.attn_mask
        mask = mask[:length, :length] if mask is not None else None
        for i, blk in enumerate(blocks):
            if 1 <= i <= len(deep_prompts):
                p = deep_prompts[i - 1]
                x = torch.cat([x[:, :1], p.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1 + p.shape[0]:]], dim=1)
            x = blk(x, attn_mask=mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        proj = clip.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _create_open_clip(name: str, pretrained: str | None, weights, quick_gelu: bool) -> tuple[OpenClipModule, str]:
    """The open_clip model (pretrained tag, or random weights to be overwritten by a file) and its weights source."""
    if not pretrained:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
        return clip, str(weights) if weights else "random"
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ZsadError(f"'{pretrained}' is not an open_clip pretrained tag for {name} (known: {tags or 'none'})")
    try:
        clip = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
    except Exception as err:
        raise ZsadError(
            f"Could not get the open_clip pretrained weights '{pretrained}' for {name} "
            f"({type(err).__name__}: {str(err)[:200]}). Without internet, download them on another machine "
            f"(open_clip / Hugging Face cache) and pass the file with --clip-weights PATH "
            f"(.safetensors or .pt/.bin), e.g. open_clip_model.safetensors of timm/vit_large_patch14_clip_336.openai."
        ) from err
    return clip, f"open_clip:{pretrained}"


def _set_image_size(
    visual: OpenClipModule, name: str, image_size: int | None, pos_resize: PosResize
) -> tuple[int, int]:
    """Resize the positional embedding of ``visual`` for ``image_size`` (once, here); returns (size, patch)."""
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else int(visual.patch_size)
    native = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    size = int(image_size or native)
    if size % patch:
        raise ZsadError(f"image size {size} is not a multiple of the patch size {patch} of {name}")
    grid = size // patch
    if size != native:
        with torch.no_grad():
            visual.positional_embedding = nn.Parameter(
                _interpolate_grid(visual.positional_embedding.data, grid, pos_resize))
        visual.image_size = (size, size)
        visual.grid_size = (grid, grid)
    return size, patch


def load_clip(
    arch: str,
    pretrained: str | None = None,
    weights: str | Path | None = None,
    image_size: int | None = None,
    quick_gelu: bool | None = None,
    pos_interpolation: str = "bilinear",
    pos_align_corners: bool = False,
    pos_antialias: bool = False,
) -> ClipBackbone:
    """Build a frozen CLIP backbone.

    - ``pretrained``: an open_clip tag (e.g. ``openai``); downloads where there is internet.
    - ``weights``: a local ``.safetensors`` file or a torch file (OpenAI's TorchScript ``.pt`` files too), read as
      data and checked against this architecture's shape table before a tensor is read (zsad.importers.clipfile).
    - neither: random weights, with a loud warning (fine for tests and architecture benchmarks, meaningless
      for accuracy).
    - ``image_size``: the positional embedding is resized once here (e.g. 336 -> 518 gives a 37x37 grid)
      with ``F.interpolate(mode=pos_interpolation, align_corners=pos_align_corners, antialias=pos_antialias)``
      (:class:`PosResize`); never inside forward.
    """
    if pretrained and weights:
        raise ZsadError("give either a pretrained tag or a weights file, not both")
    pos_resize = PosResize(pos_interpolation, pos_align_corners, pos_antialias)
    name = resolve_arch(arch)
    qg = resolve_quick_gelu(name, pretrained, quick_gelu)
    clip, source = _create_open_clip(name, pretrained, weights, qg)
    visual = clip.visual
    size, patch = _set_image_size(visual, name, image_size, pos_resize)
    if weights:
        expected = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
        _load_into(clip, _read_state_dict(Path(weights), expected), Path(weights), pos_resize)
    elif not pretrained:
        warnings.warn(
            f"CLIP {name}: no pretrained tag and no weights file given, using RANDOM weights. Results are "
            f"meaningless as anomaly detection accuracy (fine for tests and architecture benchmarks).",
            stacklevel=2,
        )
    blocks = visual.transformer.resblocks
    info = BackboneInfo(
        arch=name,
        image_size=size,
        patch_size=patch,
        grid=size // patch,
        width=visual.transformer.width,
        layers=len(blocks),
        heads=blocks[0].attn.num_heads,
        embed_dim=visual.output_dim,
        quick_gelu=qg,
        weights=source,
    )
    return ClipBackbone(clip, info)


def tokenize(arch: str, texts: Sequence[str]) -> torch.Tensor:
    """CLIP BPE token ids [n, context] of ``texts`` with the tokenizer of ``arch`` (no model is built)."""
    return open_clip.get_tokenizer(resolve_arch(arch))(list(texts))


def arch_config(arch: str) -> dict:
    """The open_clip model config of ``arch`` (no model is built): used for FLOP/shape arithmetic."""
    name = resolve_arch(arch)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ZsadError(f"no open_clip config for {name}")
    return json.loads(json.dumps(cfg))
