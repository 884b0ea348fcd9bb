"""AnomalyCLIP (Zhou et al., ICLR 2024): the common base of the methods in this toolkit.

Frozen CLIP with the DPAM dual stream from block ``dual_start`` (V-V attention on a second residual stream that
skips the FFN), object-agnostic learnable prompts with deep text prompts, and per-tap similarity maps:

    p_l = softmax(cos(Z_l, t) / T)  with  Z_l = ln_post(tap_l) @ proj,  t = normalised prompt embeddings (2,E)
    map = Gaussian_sigma(upsample(sum_l p_l[abnormal]))      score = softmax(cos(g, t) / T)[abnormal]

Loss: CE(cos(g, t)/T, label) + seg_weight * sum_l [Focal(p_l, gt) + Dice(p_l[abn], gt) + Dice(p_l[norm], 1 - gt)].
Subclasses (BAG-CLIP) replace ``patch_features`` (taps -> Z) and add config; everything else is shared.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zsad import ZsadError
from zsad.backbone import ATTENTION_MODES
from zsad.methods.base import BackboneConfig, LossConfig, Method, PromptConfig, TrainConfig
from zsad.methods.stages import BoundStage, EncoderStage, Stage
from zsad.modules.losses import layered_focal_dice
from zsad.modules.precision import as_fp32, fp32_region
from zsad.modules.prompts import ObjectAgnosticPrompts, StaticTextCache
from zsad.postprocess import Postprocess, upsample


@dataclass
class AnomalyClipConfig:
    backbone: BackboneConfig
    prompt: PromptConfig
    loss: LossConfig
    train: TrainConfig
    taps: list[int]  # 1-based blocks whose (V-V stream) tokens make the maps
    attention: str  # backbone attention mode from dual_start on: dual (DPAM) | vv | qk
    dual_start: int  # first block (1-based) of the dual / V-V stream; AnomalyCLIP: 6 (DPAM_layer=20)
    global_ln_post: bool  # AnomalyCLIP's released code omits ln_post on the class token (False reproduces it)
    temperature: float
    sigma: float  # Gaussian smoothing of the map, in pixels at the model resolution
    align_corners: bool  # bilinear upsampling of the patch map (AnomalyCLIP: False)
    score_map_weight: float  # image score = p_glob + w * max(map); 0 in AnomalyCLIP's protocol

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ZsadError(f"attention must be one of {ATTENTION_MODES}, got '{self.attention}'")
        if not self.taps:
            raise ZsadError("taps must list at least one block")


class AnomalyClip(StaticTextCache, Method):
    name = "anomalyclip"
    paper_name = "AnomalyCLIP"
    config_class: type[AnomalyClipConfig] = AnomalyClipConfig  # BagClip overrides it with a subclass

    def __init__(self, config: AnomalyClipConfig, profile: str):
        super().__init__(config, profile)
        self.backbone = self.load_backbone()
        info = self.backbone.info
        p = config.prompt
        self.prompts = ObjectAgnosticPrompts(self.backbone, p.n_ctx, p.deep_length, p.deep_depth,
                                             p.normal_template, p.abnormal_template)
        self.postprocess = Postprocess(info.image_size, config.sigma, config.align_corners, config.score_map_weight)

    # -- pieces -----------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,S,S] -> (global embedding [B,E], taps [B,L,N,D])."""
        c = self.config
        return self.backbone.forward_taps(images, c.taps, mode=c.attention, start=c.dual_start,
                                          global_ln_post=c.global_ln_post)

    def patch_features(self, taps: torch.Tensor) -> torch.Tensor:
        """taps [B,L,N,D] -> patch embeddings Z [B,L,N,E] in the joint space (AnomalyCLIP: ln_post @ proj)."""
        return self.backbone.project_tokens(taps)

    def layer_probs(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Z [B,L,N,E], text [2,E] -> per-tap (normal, abnormal) probabilities [B,L,2,g,g]."""
        b, n_taps, n, _ = z.shape
        g = self.backbone.info.grid
        # fp32 under autocast: a half-precision cosine is rounded before 1/T (14.3) scales it, and the 2-way softmax
        # reads the two logits' difference (bf16: steps of 2^-6 at logits of 2..4)
        with fp32_region(z):
            logits = F.normalize(as_fp32(z), dim=-1) @ as_fp32(text).t() / self.config.temperature
            return logits.softmax(dim=-1).permute(0, 1, 3, 2).reshape(b, n_taps, 2, g, g)

    def image_logits(self, global_embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with fp32_region(global_embedding):  # fp32 under autocast, as layer_probs
            return F.normalize(as_fp32(global_embedding), dim=-1) @ as_fp32(text).t() / self.config.temperature

    def head(self, global_embedding: torch.Tensor, taps: torch.Tensor, text: torch.Tensor):
        """-> (image probability [B], patch-grid anomaly map [B,g,g] = sum over taps of p_abnormal)."""
        return self.head_outputs(global_embedding, self.patch_features(taps), text)

    def head_outputs(self, global_embedding: torch.Tensor, z: torch.Tensor, text: torch.Tensor):
        """``head`` from the patch embeddings Z [B,L,N,E] (subclasses that compute Z otherwise call this)."""
        image_prob = self.image_logits(global_embedding, text).softmax(dim=-1)[:, 1]
        patch_map = self.layer_probs(z, text)[:, :, 1].sum(dim=1)
        return image_prob, patch_map

    # -- text -------------------------------------------------------------------------------------------------
    def encode_text(self) -> torch.Tensor:
        """The (2,E) normalised prompt embeddings (row 1 = abnormal); ``text_embeddings()`` caches them outside
        training (StaticTextCache)."""
        return self.prompts(self.backbone)

    # -- export plan --------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        info = self.backbone.info
        s, g, n, d, e = info.image_size, info.grid, info.grid ** 2, info.width, info.embed_dim
        n_taps = len(self.config.taps)
        with torch.no_grad():
            text = self.text_embeddings().detach().clone()
        return [
            Stage("encoder", EncoderStage(self), {"images": ("B", 3, s, s)},
                  {"global_embedding": ("B", e), "taps": ("B", n_taps, n, d)}),
            Stage("head", BoundStage(self, "head", text=text),
                  {"global_embedding": ("B", e), "taps": ("B", n_taps, n, d)},
                  {"image_prob": ("B",), "patch_map": ("B", g, g)}),
            Stage("postprocess", self.postprocess, {"image_prob": ("B",), "patch_map": ("B", g, g)},
                  {"score": ("B",), "anomaly_map": ("B", s, s)}),
        ]

    # -- training ---------------------------------------------------------------------------------------------
    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        images, labels = batch["image"], batch["label"].long()
        gt = (batch["mask"] > c.loss.mask_threshold).to(images.dtype)
        with torch.no_grad():
            global_embedding, taps = self.encode(images)
        text = self.prompts(self.backbone)
        image_loss = F.cross_entropy(self.image_logits(global_embedding, text), labels)
        probs = self.layer_probs(self.patch_features(taps), text)  # [B,L,2,g,g]
        b, n_taps = probs.shape[:2]
        probs = upsample(probs.flatten(0, 2), self.image_size, c.align_corners).reshape(b, n_taps, 2, *gt.shape[-2:])
        focal, dice = layered_focal_dice(probs, gt, c.loss.focal_gamma)
        total = image_loss + c.loss.seg_weight * (focal + dice)
        return {"total": total, "image_ce": image_loss.detach(), "focal": focal.detach(), "dice": dice.detach()}
