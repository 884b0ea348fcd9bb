"""Expected tensor shapes as tables computed from configs, so a file's tensors are checked before any is read and
without building a model (a ViT-L costs ~2 GB to build; these tables cost nothing).

- :func:`clip_state_shapes`: the ``state_dict`` of an open_clip ViT CLIP from its model config (widths, layers,
  patch grid, context length, vocabulary), for a CLIP weights file (``--clip-weights``) and SOWA's bundled CLIP.
- :func:`trainable_shapes`: each method's trainable parameters from its resolved config and the CLIP widths, the
  targets an importer maps the released tensors onto.

tests/test_bounded_reading.py compares both tables with the shapes of the real modules.
"""
from __future__ import annotations

from zsad import ZsadError
from zsad.backbone import arch_config

Shapes = dict[str, tuple[int, ...]]
# open_clip ViT config keys the CLIP table covers; any other option (layer scale, attentional pooling, a timm or HF
# tower, ...) changes the state dict, so such an architecture is refused rather than checked against a wrong table
VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}


def _blocks(prefix: str, layers: int, width: int, mlp_ratio: float) -> Shapes:
    hidden = int(width * mlp_ratio)
    out: Shapes = {}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        out.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
                    b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                    b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                    b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
                    b + "mlp.c_fc.weight": (hidden, width), b + "mlp.c_fc.bias": (hidden,),
                    b + "mlp.c_proj.weight": (width, hidden), b + "mlp.c_proj.bias": (width,)})
    return out


def clip_widths(arch: str) -> dict[str, int]:
    """vision width D, text width W, joint width E, vision layers and patch of ``arch`` (from its config)."""
    cfg = arch_config(arch)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return {"vision": int(v["width"]), "text": int(t["width"]), "embed": int(cfg["embed_dim"]),
            "layers": int(v["layers"]), "patch": int(v["patch_size"]), "image_size": int(v["image_size"])}


def clip_state_shapes(arch: str) -> Shapes:
    """The open_clip ``state_dict`` shapes of ViT CLIP ``arch`` at its native image size."""
    cfg = arch_config(arch)
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    extra = sorted((set(cfg) - TOP_KEYS) | (set(v) - VISION_KEYS) | (set(t) - TEXT_KEYS))
    if extra or not all(isinstance(v.get(k), int) for k in ("image_size", "layers", "width", "patch_size")):
        raise ZsadError(f"CLIP architecture {arch}: no shape table for its options {extra or 'image_size/layers'} "
                        f"(zsad checks plain ViT CLIP configs, e.g. ViT-L-14-336)")
    width, patch, e = v["width"], v["patch_size"], cfg["embed_dim"]
    grid = v["image_size"] // patch
    tw = t["width"]
    shapes: Shapes = {
        "positional_embedding": (t["context_length"], tw), "text_projection": (tw, e), "logit_scale": (),
        "token_embedding.weight": (t["vocab_size"], tw), "ln_final.weight": (tw,), "ln_final.bias": (tw,),
        "visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
        "visual.proj": (width, e), "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
    }
    shapes.update(_blocks("", t["layers"], tw, t.get("mlp_ratio", 4.0)))
    shapes.update(_blocks("visual.", v["layers"], width, v.get("mlp_ratio", 4.0)))
    return shapes


def _prompts(config, text: int, contexts: int = 2) -> Shapes:
    p = config.prompt
    out: Shapes = {"prompts.ctx": (contexts, p.n_ctx, text)}
    for j in range(max(p.deep_depth - 1, 0)):
        out[f"prompts.deep.{j}"] = (p.deep_length, text)
    return out


def _linear(name: str, n_in: int, n_out: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if bias else {})}


def _anomalyclip(config, w: dict[str, int]) -> Shapes:
    return _prompts(config, w["text"])


def _afclip(config, w: dict[str, int]) -> Shapes:
    a, d = config.adaptor, w["vision"]
    inner = a.heads * a.head_dim
    return {"prompts.ctx": (1 if config.prompt.shared_context else 2, config.prompt.n_ctx, w["text"]),
            "adaptor.norm.weight": (d,), "adaptor.norm.bias": (d,),
            **_linear("adaptor.to_q", d, inner, False), **_linear("adaptor.to_k", d, inner, False),
            **_linear("adaptor.to_v", d, inner, False), **_linear("adaptor.to_out", inner, d)}


def _bayespfl(config, w: dict[str, int]) -> Shapes:
    e, t, d = w["embed"], w["text"], w["vision"]
    p, f = config.prompt, config.flow
    k, h, n = f.length, f.hidden, len(config.taps)
    out: Shapes = {"pfl.tau_pixel": (), "pfl.tau_image": (), "pfl.bank.context": (p.banks, p.context_length, t),
                   "pfl.bank.state_normal": (p.banks, p.state_length, t),
                   "pfl.bank.state_abnormal": (p.banks, p.state_length, t)}
    for enc, n_in in (("pfl.context_flow.encoder", e), ("pfl.state_flows.encoder", t)):
        for branch in ("mu", "log_var"):
            out.update({**_linear(f"{enc}.{branch}.0", n_in, h), **_linear(f"{enc}.{branch}.2", h, h),
                        **_linear(f"{enc}.{branch}.4", h, t)})
    out.update({**_linear("pfl.context_flow.u", e, k * t), **_linear("pfl.context_flow.w", e, k * t),
                **_linear("pfl.context_flow.b", e, k)})
    for branch in ("normal", "abnormal"):
        s = f"pfl.state_flows.{branch}."
        out.update({s + "xi": (1, t), s + "u": (k, t), s + "w": (k, t), s + "b": (k,)})
    for layer in range(n):
        out.update(_linear(f"pfl.rca.patch_proj.{layer}", d, e, False))
    out.update({**_linear("pfl.rca.query", e, e), **_linear("pfl.fuse.proj", n * d, config.fuse_dim),
                **_linear("pfl.fuse.score", config.fuse_dim, 1), **_linear("pfl.fuse.out", config.fuse_dim, e),
                **_linear("pfl.class_mapping", e, e), **_linear("pfl.image_mapping", e, e)})
    return out


def _sowa(config, w: dict[str, int]) -> Shapes:
    a, d, e = config.adapter, w["vision"], w["embed"]
    out = _prompts(config, w["text"])
    if config.text_fusion:
        out.update(_linear("text_fusion", e, e))
    for i in range(len(config.taps)):
        s = f"adapters.{i}."
        out.update({s + "logit_scale": (a.heads,), **_linear(s + "cpb.mlp.0", 2, a.cpb_hidden),
                    **_linear(s + "cpb.mlp.2", a.cpb_hidden, a.heads, False), s + "norm1.weight": (d,),
                    s + "norm1.bias": (d,), s + "norm2.weight": (d,), s + "norm2.bias": (d,),
                    **_linear(s + "linear", d, d, False)})
    return out


TABLES = {"anomalyclip": _anomalyclip, "afclip": _afclip, "bayespfl": _bayespfl, "sowa": _sowa}


def trainable_shapes(method: str, config) -> Shapes:
    """{name: shape} of ``method``'s trainable parameters under the resolved ``config`` (no model built)."""
    if method not in TABLES:
        raise ZsadError(f"internal: no trainable-shape table for {method}")
    return TABLES[method](config, clip_widths(config.backbone.arch))
