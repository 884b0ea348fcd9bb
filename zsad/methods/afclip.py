"""AF-CLIP (Fang, Lv, Su; ACM MM 2025): anomaly-focused CLIP adaptation, and AF-CLIP+ (few-shot).

Our choices are in docs/methods/afclip.md; where the released code differs from the paper, this follows the code:

1. stock frozen ViT (QuickGELU for OpenAI weights), raw residual stream of blocks ``taps`` *with* the class
   token: c^l [B, 1+N, D];
2. multi-scale spatial aggregation (fixed Gaussian depthwise r x r filters, r in ``kernel_sizes``, zero padding,
   class token untouched): 4 taps x 3 scales = 12 feature sets;
3. ONE trainable attention adaptor shared by all sets (LN -> 8 x 64 heads -> out, no residual), then CLIP's
   frozen ``ln_post`` and ``proj``: z^{lr} [B, 1+N, E];
4. logits s^{lr} = <ẑ^{lr}, t> / 0.07 with the two static prompt embeddings t (2, E), **summed over the 12 sets
   before the softmax**; p = softmax(sum)[abnormal]; image score p_CLS = p[class token], map P̃ = p[patches];
5. map = Gaussian_sigma4(bilinear_up(P̃)) (align_corners False); score = p_CLS (zero-shot: no max-of-map term).

Prompts: one shared set of 12 learnable vectors placed *before* SOT, fixed suffixes "without defect." / "with
defect." (``ObjectAgnosticPrompts`` with ``shared_context`` / ``placement="before_sot"``).

Loss: L = focal_g4(p_CLS, y) + lambda1 [focal_g4(P̃, M̃) + L1(P̃, M̃)] + lambda2 L_pal, with M̃ the mask
bilinearly resized to the g x g grid and thresholded at 0.5, and L_pal the patch-alignment loss averaged over
the 12 sets.

AF-CLIP+ (``fit_memory(images)``, no training): banks of the L2-normalised *pre-adaptor* aggregated patch
features c^{lr} of K normal images (12 banks); A_i = mean over the banks of (1 - max cos)/2;
S_img = max_i A_i + alpha p_CLS, S_map = A + beta P̃ (then the same upsample + blur). The bank is a buffer of
a separate ``fewshot`` stage (one export per class); zero-shot stages are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zsad import ZsadError
from zsad.backbone import arch_config
from zsad.methods.base import BackboneConfig, Method, TrainConfig
from zsad.methods.stages import BoundStage, EncoderStage, Stage
from zsad.modules.adaptor import AttentionAdaptor
from zsad.modules.aggregation import BORDERS, MultiScaleAggregation
from zsad.modules.losses import binary_focal_loss, patch_alignment_loss
from zsad.modules.memory_bank import MemoryBank
from zsad.modules.precision import as_fp32, fp32_region
from zsad.modules.prompts import PLACEMENTS, ObjectAgnosticPrompts, StaticTextCache
from zsad.postprocess import Postprocess
from zsad.protocols import PaperProtocol


@dataclass
class AfClipPromptConfig:
    n_ctx: int  # learnable vectors (12)
    normal_template: str  # "{} without defect." ("{}" dropped for placement before_sot)
    abnormal_template: str
    shared_context: bool  # one set of vectors for both prompts (AF-CLIP: True)
    placement: str  # before_sot (AF-CLIP code) | after_sot
    init_std: float  # N(0, std^2) init (0.01)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ZsadError(f"prompt.placement must be one of {PLACEMENTS}, got '{self.placement}'")


@dataclass
class AdaptorConfig:
    heads: int  # 8
    head_dim: int  # 64 (inner width 512 at ViT-L)
    dropout: float  # 0


@dataclass
class AggregationConfig:
    kernel_sizes: list[int]  # [1, 3, 5]
    sigma: float  # 4 for every kernel (released code)
    border: str  # zero (code: zero padding, no renormalisation) | renormalize

    def __post_init__(self):
        if self.border not in BORDERS:
            raise ZsadError(f"aggregation.border must be one of {BORDERS}, got '{self.border}'")
        if not self.kernel_sizes or any(int(r) < 1 or int(r) % 2 == 0 for r in self.kernel_sizes):
            raise ZsadError(f"aggregation.kernel_sizes must be odd sizes >= 1, got {self.kernel_sizes}")


@dataclass
class AfClipLossConfig:
    focal_gamma: float  # 4
    seg_weight: float  # lambda1 = 1
    pal_weight: float  # lambda2 = 1
    mask_threshold: float  # grid mask = bilinear-resized GT > threshold (0.5)


@dataclass
class FewShotConfig:
    image_weight: float  # alpha: S_img = max A + alpha p_CLS (0.1)
    map_weight: float  # beta: S_map = A + beta P̃ (0.1)
    bank_chunk: int  # bank rows per similarity block at query time (0 = all at once)


@dataclass
class AfClipConfig:
    backbone: BackboneConfig
    prompt: AfClipPromptConfig
    adaptor: AdaptorConfig
    aggregation: AggregationConfig
    loss: AfClipLossConfig
    few_shot: FewShotConfig
    train: TrainConfig
    taps: list[int]  # 1-based blocks (6, 12, 18, 24)
    temperature: float  # 0.07
    sigma: float  # test-time Gaussian (4)
    align_corners: bool  # bilinear upsampling of the map (False)
    score_map_weight: float  # optional + w * max(map) on the zero-shot score; 0 = the paper (p_CLS only)

    def __post_init__(self):
        if not self.taps:
            raise ZsadError("taps must list at least one block")


# -- its released test script (zsad.protocols) ----------------------------------------------------------------------
# AF-CLIP (Faustinaqq/AF-CLIP, util/utils.py ``compute_pro``): AUPRO with the kept FPRs divided by their maximum
# instead of min-max rescaled (``paper_aupro_mode`` "afclip"). Its scores are per image, as zsad's; AF-CLIP+ few-shot
# tables are the mean and std over five random draws of the shots (no seeds given: zsad draws with seeds 0..4).
# Ground-truth masks as its test path makes them (afclip_mask): the 8-bit mask resized to S x S with PIL bicubic
# (main.py:103-106, Resize + ToTensor), then > 0.5 (util/utils.py:241-243); zsad's own masks are resized bilinearly
# as floats (zsad.data.preprocess_mask).
AFCLIP_DRAWS = 5


def afclip_mask(mask, size: int) -> np.ndarray:
    """A defect mask [H, W] (nonzero = defect) as AF-CLIP's test path makes it: stored as 0 / 255 in 8 bits, resized
    to ``size`` x ``size`` with PIL bicubic (8-bit result), / 255, > 0.5. float32 [size, size] in {0, 1}."""
    from PIL import Image

    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ZsadError(f"afclip_mask expects a non-empty 2-D mask, got shape {arr.shape}")
    img = Image.fromarray(np.where(arr != 0, 255, 0).astype(np.uint8))
    if img.size != (size, size):
        img = img.resize((int(size), int(size)), Image.Resampling.BICUBIC)
    return (np.asarray(img, dtype=np.float32) / np.float32(255.0) > 0.5).astype(np.float32)


class AfClipProtocol(PaperProtocol):
    draw_seeds = tuple(range(AFCLIP_DRAWS))

    def mask_transform(self):
        return afclip_mask

    def describe(self, dataset: str | None, shots: int) -> list[str]:
        return ["ground-truth masks: 8-bit, PIL bicubic to the model size, / 255 > 0.5"]


class AfClip(StaticTextCache, Method):
    name = "afclip"
    paper_name = "AF-CLIP"
    paper_few_shot_name = "AF-CLIP+"
    paper_aupro_mode = "afclip"  # util/utils.py compute_pro: kept FPRs divided by their maximum
    paper_protocol = AfClipProtocol()
    config_class = AfClipConfig
    few_shot = True

    def __init__(self, config: AfClipConfig, profile: str):
        super().__init__(config, profile)
        self.backbone = self.load_backbone()
        info = self.backbone.info
        p = config.prompt
        self.prompts = ObjectAgnosticPrompts(self.backbone, p.n_ctx, 0, 1, p.normal_template, p.abnormal_template,
                                             shared_context=p.shared_context, placement=p.placement,
                                             init_std=p.init_std)
        a, g = config.adaptor, config.aggregation
        self.aggregation = MultiScaleAggregation(g.kernel_sizes, g.sigma, g.border)
        self.adaptor = AttentionAdaptor(info.width, a.heads, a.head_dim, a.dropout)
        self.postprocess = Postprocess(info.image_size, config.sigma, config.align_corners, config.score_map_weight)
        self.memory: MemoryBank | None = None

    @staticmethod
    def trainable_budget(config: AfClipConfig) -> dict[str, int]:
        """Trainable parameters per part, from the CLIP architecture's widths, without building the CLIP.

        The adaptor is instantiated at the vision width (2,100,224 at ViT-L); the prompt is n_ctx x text width.
        """
        cfg = arch_config(config.backbone.arch)
        a = config.adaptor
        adaptor = AttentionAdaptor(cfg["vision_cfg"]["width"], a.heads, a.head_dim)
        n_prompts = 1 if config.prompt.shared_context else 2
        return {"adaptor": sum(q.numel() for q in adaptor.parameters()),
                "prompts": n_prompts * config.prompt.n_ctx * cfg["text_cfg"]["width"]}

    # -- pieces -----------------------------------------------------------------------------------------------
    @property
    def n_sets(self) -> int:
        return len(self.config.taps) * self.aggregation.scales

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,S,S] -> raw block outputs at the taps, class token kept: [B, L, 1+N, D].

        Stock attention (open_clip's own blocks, as ``forward_taps(mode="qk")``), stopping after the last tap.
        """
        bb = self.backbone
        taps = [int(t) for t in self.config.taps]
        x = bb.embed_patches(images)
        kept: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(bb.visual.transformer.resblocks[:max(taps)], start=1):
            x = blk(x)
            if i in taps:
                kept[i] = x
        return torch.stack([kept[t] for t in taps], dim=1)

    def aggregated(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, 1+N, D] -> the 12 pre-adaptor feature sets c^{lr} [B, L*R, 1+N, D] (tap-major)."""
        c = self.aggregation(tokens)
        return c.flatten(1, 2)

    def projected(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, 1+N, D] -> adapted, projected, L2-normalised features ẑ [B, L*R, 1+N, E]."""
        c = self.aggregated(tokens)
        adapted = self.adaptor(c.flatten(0, 1)).unflatten(0, (-1, c.shape[1]))  # one batched call for all sets
        return F.normalize(self.backbone.project_tokens(adapted), dim=-1)

    def probabilities(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """ẑ [B, S, T, E], text [2, E] -> anomaly probability per token [B, T] (logits summed over the S sets)."""
        # fp32 under autocast: 12 cosines summed, then x 1/0.07, make logits of 30..60, where bf16's step is 0.25 and
        # fp16's 2^-5, and the 2-way softmax reads the two logits' difference
        with fp32_region(z):
            logits = (as_fp32(z) @ as_fp32(text).t()).sum(dim=1) / self.config.temperature  # [B, T, 2]
            return logits.softmax(dim=-1)[..., 1]

    def head(self, tokens: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (p_CLS [B], P̃ [B, g, g])."""
        g = self.backbone.info.grid
        p = self.probabilities(self.projected(tokens), text)
        return p[:, 0], p[:, 1:].reshape(-1, g, g)

    def few_shot_fusion(self, tokens: torch.Tensor, image_prob: torch.Tensor, patch_map: torch.Tensor,
                        memory: MemoryBank) -> tuple[torch.Tensor, torch.Tensor]:
        """AF-CLIP+: (S_img [B], S_map [B, g, g]) from the bank distances of the pre-adaptor features."""
        fs = self.config.few_shot
        g = self.backbone.info.grid
        c = self.aggregated(tokens)[:, :, 1:]  # [B, 12, N, D]
        a = (0.5 * memory(c)).mean(dim=1)  # (1 - max cos) / 2, averaged over the sets: [B, N]
        return a.amax(dim=-1) + fs.image_weight * image_prob, a.reshape(-1, g, g) + fs.map_weight * patch_map

    # -- text -------------------------------------------------------------------------------------------------
    def encode_text(self) -> torch.Tensor:
        """(2, E) normalised prompt embeddings, row 1 = "with defect."."""
        return self.prompts(self.backbone)

    # -- few-shot (AF-CLIP+) ------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_memory(self, images: torch.Tensor, batch_size: int = 4) -> None:
        """Build the 12 banks from K normal reference images [K, 3, S, S] of the class to inspect."""
        if images.dim() != 4 or images.shape[0] < 1:
            raise ZsadError(f"fit_memory expects K >= 1 images [K,3,S,S], got {tuple(images.shape)}")
        feats = [self.aggregated(self.encode(images[i:i + batch_size]))[:, :, 1:]
                 for i in range(0, images.shape[0], batch_size)]
        self.memory = MemoryBank(torch.cat(feats), chunk=self.config.few_shot.bank_chunk).to(images.device)

    def clear_memory(self) -> None:
        self.memory = None

    # -- export plan --------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        info = self.backbone.info
        s, g, t, d = info.image_size, info.grid, info.grid ** 2 + 1, info.width
        n_taps = len(self.config.taps)
        with torch.no_grad():
            text = self.text_embeddings().detach().clone()
        tokens = {"tokens": ("B", n_taps, t, d)}
        zero_shot = {"image_prob": ("B",), "patch_map": ("B", g, g)}
        stages = [
            Stage("encoder", EncoderStage(self), {"images": ("B", 3, s, s)}, tokens),
            Stage("head", BoundStage(self, "head", text=text), tokens, zero_shot),
        ]
        final = zero_shot
        if self.memory is not None:
            final = {"fewshot_prob": ("B",), "fewshot_map": ("B", g, g)}
            stages.append(Stage("fewshot", BoundStage(self, "few_shot_fusion", memory=self.memory),
                                {**tokens, **zero_shot}, final))
        stages.append(Stage("postprocess", self.postprocess, final,
                            {"score": ("B",), "anomaly_map": ("B", s, s)}))
        return stages

    # -- training ---------------------------------------------------------------------------------------------
    def grid_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """GT [B, S, S] -> M̃ [B, g, g] in {0,1}: bilinear resize to the patch grid, then > threshold."""
        g = self.backbone.info.grid
        m = F.interpolate(mask.unsqueeze(1).float(), size=(g, g), mode="bilinear", align_corners=False)
        return (m.squeeze(1) > self.config.loss.mask_threshold).float()

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        lc = self.config.loss
        images, labels = batch["image"], batch["label"].float()
        gt = self.grid_mask(batch["mask"])
        with torch.no_grad():
            tokens = self.encode(images)
        text = self.prompts(self.backbone)
        z = self.projected(tokens)  # [B, 12, 1+N, E]
        p = self.probabilities(z, text)
        p_map = p[:, 1:].reshape(gt.shape)
        cls = binary_focal_loss(p[:, 0], labels, gamma=lc.focal_gamma)
        focal = binary_focal_loss(p_map, gt, gamma=lc.focal_gamma)
        l1 = (p_map - gt).abs().mean()
        flat = gt.flatten(1)
        terms = [patch_alignment_loss(z[:, i, 1:], flat) for i in range(z.shape[1])]
        pal = sum(terms[1:], terms[0]) / len(terms)
        total = cls + lc.seg_weight * (focal + l1) + lc.pal_weight * pal
        return {"total": total, "cls_focal": cls.detach(), "seg_focal": focal.detach(), "seg_l1": l1.detach(),
                "pal": pal.detach()}
