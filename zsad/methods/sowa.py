"""SOWA / HFWA (Hu, Zhang; arXiv 2407.03634v4): hierarchical frozen window self-attention adapters on CLIP.

The paper leaves the internals open; this follows the released code:

1. stock frozen ViT at 336 px (grid 24); raw block outputs at ``taps`` (6/12/18/24), class token dropped, and
   the global embedding g = ln_post(CLS) @ proj;
2. one FWA adapter per tap (``zsad.modules.window_attention``): window-12 V-V cosine attention with the tapped
   block's frozen value/out projections, learnable per-head scale + continuous position bias, res-post-norm
   LayerNorms and a trainable D x D linear; then ``@ visual.proj`` (no ``ln_post``): F*_i [B, N, E];
3. static text T = L2norm(Linear_f(E_text(prompts))) (2, E): CoOp prompts "[SOT] X1..X12 object." /
   "[SOT] Y1..Y12 damaged object." and a trainable 768 x 768 text-side fusion linear;
4. per layer, cos(F*_i, T) (no temperature), upsampled bilinearly to S x S (align_corners True), softmax over
   {normal, abnormal}; map = Gaussian_sigma4(sum_i p_i[abnormal]); score = softmax(cos(g, T) / 0.07)[abnormal].
   The 2-way softmax is sigmoid(cos1 - cos0) and the upsampling is linear, so the head hands the post-process the
   per-layer logit differences [B, L, g, g] and the post-process upsamples them (exactly the code's map).

Loss (code): CE on the image (``double_softmax`` = the code's CE over already-softmaxed probabilities, or
``ce`` = plain CE on cos/0.07) + seg_weight * sum_i [Focal(M_i, S) + Dice(M_i[abn], S) + Dice(M_i[norm], 1-S)].

K-shot (``fit_memory``): banks of the *non-adapted* taps ``H_i @ proj`` of K normal images, one per layer;
d_i = min (1 - cos) -> [g, g] -> bilinear to S (align_corners True) -> summed over layers and added to the
*smoothed* zero-shot map (the few-shot part is not smoothed). Image score 0.5 (p + (max(map) - lo) / scale)
with calibration constants (lo, scale) instead of the code's min-max over the test set (a data-set statistic
nothing can compute while serving): lo = the smallest max-map of the K shots, each scored against a bank of
the other shots (K >= 2; else ``k_shot.score_offset``), scale = ``k_shot.score_scale``.

Export: the head stage folds exp(clamp(theta)) and each adapter's CPB MLP into constant per-head (H, T, T)
bias tables at stage construction (config ``fold_position_bias``, on by default), so the exported graph has
no MLP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError
from zsad.backbone import arch_config
from zsad.methods.base import BackboneConfig, Method, PromptConfig, TrainConfig
from zsad.methods.stages import BoundStage, EncoderStage, Stage
from zsad.modules.losses import layered_focal_dice
from zsad.modules.memory_bank import MemoryBank
from zsad.modules.precision import as_fp32, fp32_region
from zsad.modules.prompts import ObjectAgnosticPrompts, StaticTextCache
from zsad.modules.window_attention import FrozenWindowAdapter
from zsad.postprocess import gaussian_blur, upsample
from zsad.protocols import PaperProtocol, minmax, same_length

IMAGE_LOSSES = ("double_softmax", "ce")


@dataclass
class SowaAdapterConfig:
    window: int  # 12 at 336 px (grid 24 -> four 144-token windows)
    heads: int  # 8 (x 128 at width 1024)
    cpb_hidden: int  # 64
    attn_drop: float  # 0.1 (training only)
    use_qkv_bias: bool  # False: SOWA's code drops in_proj_bias


@dataclass
class SowaLossConfig:
    focal_gamma: float  # 2
    seg_weight: float  # lambda1 = lambda2 = 1 (applied per layer)
    image_loss: str  # double_softmax (code) | ce
    mask_threshold: float  # gt = mask > threshold (code: 0 in training)

    def __post_init__(self):
        if self.image_loss not in IMAGE_LOSSES:
            raise ZsadError(f"loss.image_loss must be one of {IMAGE_LOSSES}, got '{self.image_loss}'")


@dataclass
class MosaicConfig:
    rate: float  # probability that a training item becomes a 2x2 mosaic (0.2)
    datasets: list[str]  # only when training on these data sets (code: MVTec AD); [] = always
    relabel: bool  # label = any(mosaic mask) (True) or the first item's label as in the code (False)
    # every training mask resized on 8 bits, not binarised, so the loss's "> 0" marks any touched pixel (code)
    soft_masks: bool = False


@dataclass
class KShotConfig:
    score_offset: float  # lo when it cannot be calibrated from the shots (K = 1)
    score_scale: float  # divisor of (max(map) - lo) in the image score
    calibrate: bool  # lo from leave-one-out scores of the shots (K >= 2)
    bank_chunk: int  # bank rows per similarity block (0 = all at once)


@dataclass
class SowaConfig:
    backbone: BackboneConfig
    prompt: PromptConfig  # deep_depth 1: SOWA has no deep prompts
    adapter: SowaAdapterConfig
    loss: SowaLossConfig
    augment: MosaicConfig
    k_shot: KShotConfig
    train: TrainConfig
    taps: list[int]
    text_fusion: bool  # the trainable text-side Linear(E, E) (FusionModule)
    temperature: float  # image score temperature (0.07)
    patch_temperature: float  # divisor of the patch cosines before the softmax (code: 1 = none)
    sigma: float  # Gaussian smoothing (4)
    align_corners: bool  # per-layer map upsampling (code: True)
    # export: fold exp(clamp(theta)) and the CPB MLPs into constant tables (False: run the MLPs, for checks)
    fold_position_bias: bool = True

    def __post_init__(self):
        if not self.taps:
            raise ZsadError("taps must list at least one block")


# -- its released test script (zsad.protocols) ----------------------------------------------------------------------
# SOWA (huzongxiang/sowa, src/models/anomaly_clip_module.py ``on_test_epoch_end``): in K-shot mode the image score is
# 0.5 (p + min-max over the class of max(final map)), p the text probability; zero-shot it is p alone (as zsad).
# AUPRO: the mean of per-image FPRs (``paper_aupro_mode`` "sowa", src/utils/metrics.py ``cal_pro_score``). zsad's
# K-shot tables are the mean and std over draws seeded SOWA_EVAL_SEEDS, the seeds scripts/infer_data.sh passes; the
# released src/eval.py never applies them (no seed_everything), so its own draws are unseeded: one per K on MVTec AD
# / VisA (infer_auto.sh), ten elsewhere (docs/methods/sowa.md).
SOWA_EVAL_SEEDS = (42, 2020, 2023, 2024, 2025)


def sowa_kshot_image_scores(image_prob, map_max) -> np.ndarray:
    """SOWA's K-shot image scores of one class: 0.5 (p + minmax(max of each final map)) (no eps, as released)."""
    same_length(image_prob, map_max)
    return 0.5 * (np.asarray(image_prob, dtype=np.float64) + minmax(map_max))


class SowaProtocol(PaperProtocol):
    draw_seeds = SOWA_EVAL_SEEDS

    def image_scores(self, cls: str, terms: dict, dataset: str | None, shots: int) -> np.ndarray | None:
        return sowa_kshot_image_scores(terms["image_prob"], terms["map_max"]) if shots else None

    def describe(self, dataset: str | None, shots: int) -> list[str]:
        return ["image score = 0.5 (text probability + min-max(max of the final map) over the class)"] if shots else []


class Sowa(StaticTextCache, Method):
    name = "sowa"
    paper_name = "SOWA"
    paper_aupro_mode = "sowa"  # src/utils/metrics.py cal_pro_score: the mean of per-image FPRs
    paper_protocol = SowaProtocol()
    config_class = SowaConfig
    few_shot = True
    score_offset: torch.Tensor  # buffer (k-shot score offset)

    def __init__(self, config: SowaConfig, profile: str):
        super().__init__(config, profile)
        self.backbone = self.load_backbone()
        info = self.backbone.info
        p = config.prompt
        self.prompts = ObjectAgnosticPrompts(self.backbone, p.n_ctx, p.deep_length, p.deep_depth,
                                             p.normal_template, p.abnormal_template)
        e = info.embed_dim
        self.text_fusion = nn.Linear(e, e) if config.text_fusion else None
        a = config.adapter
        blocks = self.backbone.visual.transformer.resblocks
        self.adapters = nn.ModuleList([
            FrozenWindowAdapter(blocks[t - 1].attn, info.grid, a.window, a.heads, a.cpb_hidden, a.attn_drop,
                                a.use_qkv_bias) for t in config.taps])
        self.memory: MemoryBank | None = None
        self.register_buffer("score_offset", torch.tensor(float(config.k_shot.score_offset)), persistent=False)

    @staticmethod
    def trainable_budget(config: SowaConfig) -> dict[str, int]:
        """Trainable parameters per part from the CLIP architecture's widths, without building the CLIP.

        Each adapter is instantiated around a stand-in ``nn.MultiheadAttention`` of the vision width (its
        weights are the frozen, borrowed CLIP ones, so they are not counted).
        """
        cfg = arch_config(config.backbone.arch)
        width, text_width, e = cfg["vision_cfg"]["width"], cfg["text_cfg"]["width"], cfg["embed_dim"]
        patch = cfg["vision_cfg"]["patch_size"]
        grid = config.backbone.image_size // patch
        a = config.adapter
        attn = nn.MultiheadAttention(width, max(1, width // 64), batch_first=True)
        adapter = FrozenWindowAdapter(attn, grid, a.window, a.heads, a.cpb_hidden, a.attn_drop, a.use_qkv_bias)
        per_adapter = sum(q.numel() for q in adapter.parameters() if q.requires_grad)
        return {"adapters": len(config.taps) * per_adapter,
                "prompts": 2 * config.prompt.n_ctx * text_width
                + max(config.prompt.deep_depth - 1, 0) * config.prompt.deep_length * text_width,
                "text_fusion": (e * e + e) if config.text_fusion else 0}

    # -- pieces -----------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (global embedding ln_post(CLS) @ proj [B, E], raw taps [B, L, N, D]); stock attention."""
        return self.backbone.forward_taps(images, self.config.taps, mode="qk", global_ln_post=True)

    def position_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every adapter's (scale [H], bias [H, T, T]) stacked: ([L, H], [L, H, T, T])."""
        terms = [cast(FrozenWindowAdapter, ad).position_terms() for ad in self.adapters]
        return torch.stack([s for s, _ in terms]), torch.stack([b for _, b in terms])

    def adapted(self, taps: torch.Tensor, scales: torch.Tensor | None = None,
                biases: torch.Tensor | None = None) -> torch.Tensor:
        """taps [B, L, N, D] -> F* [B, L, N, E] (FWA adapters, then @ proj without ln_post)."""
        proj = self.backbone.visual.proj
        outs = []
        for i, ad in enumerate(self.adapters):
            # the adapter's own rule: without both folded terms it computes them
            x = ad(taps[:, i]) if scales is None or biases is None else ad(taps[:, i], scales[i], biases[i])
            outs.append(x @ proj)
        return torch.stack(outs, dim=1)

    def layer_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """F* [B, L, N, E], text [2, E] -> per-layer (abnormal - normal) logit [B, L, g, g]."""
        g = self.backbone.info.grid
        # fp32 under autocast: the logit is the difference of two nearly equal cosines, which a half-precision matmul
        # output would round first (bf16: steps of 2^-10 at cosines of 0.125..0.25)
        with fp32_region(features):
            cos = F.normalize(as_fp32(features), dim=-1) @ as_fp32(text).t() / self.config.patch_temperature
            return (cos[..., 1] - cos[..., 0]).unflatten(-1, (g, g))  # cos [B, L, N, 2]

    def image_logits(self, global_embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with fp32_region(global_embedding):  # fp32 under autocast: cosines x 1/0.07 (layer_logits)
            return F.normalize(as_fp32(global_embedding), dim=-1) @ as_fp32(text).t() / self.config.temperature

    def head(self, global_embedding: torch.Tensor, taps: torch.Tensor, text: torch.Tensor,
             scales: torch.Tensor | None = None, biases: torch.Tensor | None = None):
        """-> (image probability [B], per-layer logit differences [B, L, g, g])."""
        image_prob = self.image_logits(global_embedding, text).softmax(dim=-1)[:, 1]
        return image_prob, self.layer_logits(self.adapted(taps, scales, biases), text)

    def zero_shot_map(self, layer_logits: torch.Tensor) -> torch.Tensor:
        """[B, L, g, g] -> smoothed [B, S, S] = blur(sum_l sigmoid(upsample(logit_l)))."""
        s = self.backbone.info.image_size
        up = upsample(layer_logits.flatten(0, 1), s, self.config.align_corners)
        return gaussian_blur(torch.sigmoid(up).unflatten(0, (-1, layer_logits.shape[1])).sum(dim=1), self.config.sigma)

    def memory_features(self, taps: torch.Tensor) -> torch.Tensor:
        """Non-adapted taps projected: H_i @ proj (no ln_post) [B, L, N, E], what the K-shot banks hold."""
        return taps @ self.backbone.visual.proj

    def few_shot_distance(self, taps: torch.Tensor, memory: MemoryBank) -> torch.Tensor:
        """taps [B, L, N, D] -> per-layer nearest-neighbour distance [B, L, g, g]."""
        g = self.backbone.info.grid
        return memory(self.memory_features(taps)).unflatten(-1, (g, g))

    def few_shot_map(self, distance: torch.Tensor) -> torch.Tensor:
        """[B, L, g, g] -> [B, S, S]: each layer upsampled (not smoothed), summed."""
        s = self.backbone.info.image_size
        up = upsample(distance.flatten(0, 1), s, self.config.align_corners)
        return up.unflatten(0, (-1, distance.shape[1])).sum(dim=1)

    def zero_shot_output(self, image_prob: torch.Tensor, layer_logits: torch.Tensor):
        """The zero-shot post-process: (score = the image probability, smoothed map)."""
        return image_prob, self.zero_shot_map(layer_logits)

    def k_shot_output(self, image_prob: torch.Tensor, layer_logits: torch.Tensor, fewshot_distance: torch.Tensor,
                      offset: torch.Tensor):
        """The K-shot post-process: map = smoothed zero-shot map + unsmoothed few-shot map;
        score = 0.5 (p + (max(map) - lo) / scale), lo = ``offset`` (calibrated by ``fit_memory``)."""
        amap = self.zero_shot_map(layer_logits) + self.few_shot_map(fewshot_distance)
        score = 0.5 * (image_prob + (amap.flatten(1).amax(dim=1) - offset) / float(self.config.k_shot.score_scale))
        return score, amap

    # -- text -------------------------------------------------------------------------------------------------
    def encode_text(self) -> torch.Tensor:
        t = self.prompts(self.backbone, normalize=self.text_fusion is None)
        return F.normalize(self.text_fusion(t), dim=-1) if self.text_fusion is not None else t

    # -- K-shot ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_memory(self, images: torch.Tensor, batch_size: int = 4) -> None:
        """Build the per-layer banks from K normal images [K, 3, S, S]; calibrate lo from them when K >= 2."""
        if images.dim() != 4 or images.shape[0] < 1:
            raise ZsadError(f"fit_memory expects K >= 1 images [K,3,S,S], got {tuple(images.shape)}")
        ks = self.config.k_shot
        encoded = [self.encode(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        taps = torch.cat([t for _, t in encoded])
        feats = self.memory_features(taps)
        k = feats.shape[0]
        offset = float(ks.score_offset)
        if ks.calibrate and k >= 2:
            was_training = self.training
            self.eval()
            text = self.text_embeddings()
            maxima = []
            for i in range(k):
                others = MemoryBank(torch.cat([feats[:i], feats[i + 1:]]), ks.bank_chunk)
                glob, _ = encoded[i // batch_size]
                _, logits = self.head(glob[i % batch_size:i % batch_size + 1], taps[i:i + 1], text)
                amap = self.zero_shot_map(logits) + self.few_shot_map(self.few_shot_distance(taps[i:i + 1], others))
                maxima.append(float(amap.amax()))
            offset = min(maxima)
            self.train(was_training)
        self.memory = MemoryBank(feats, chunk=ks.bank_chunk).to(images.device)
        self.score_offset.fill_(offset)

    def clear_memory(self) -> None:
        self.memory = None
        self.score_offset.fill_(float(self.config.k_shot.score_offset))

    # -- export plan --------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        info = self.backbone.info
        s, g, n, d, e = info.image_size, info.grid, info.grid ** 2, info.width, info.embed_dim
        n_taps = len(self.config.taps)
        with torch.no_grad():
            text = self.text_embeddings().detach().clone()
            # folded: the per-head logit scales [L, H] and CPB bias tables [L, H, T, T] as constants, so the
            # exported graph holds the tables, not the CPB MLPs
            position = {}
            if self.config.fold_position_bias:
                position["scales"], position["biases"] = self.position_terms()
        enc = {"global_embedding": ("B", e), "taps": ("B", n_taps, n, d)}
        head_out = {"image_prob": ("B",), "layer_logits": ("B", n_taps, g, g)}
        final = {"score": ("B",), "anomaly_map": ("B", s, s)}
        stages = [
            Stage("encoder", EncoderStage(self), {"images": ("B", 3, s, s)}, enc),
            Stage("head", BoundStage(self, "head", text=text, **position), enc, head_out),
        ]
        if self.memory is None:
            stages.append(Stage("postprocess", BoundStage(self, "zero_shot_output"), head_out, final))
        else:
            dist = {"fewshot_distance": ("B", n_taps, g, g)}
            stages.append(Stage("fewshot", BoundStage(self, "few_shot_distance", memory=self.memory),
                                {"taps": enc["taps"]}, dist))
            stages.append(Stage("postprocess", BoundStage(self, "k_shot_output", offset=self.score_offset),
                                {**head_out, **dist}, final))
        return stages

    # -- training ---------------------------------------------------------------------------------------------
    def training_dataset(self, dataset, info: dict | None = None):
        """SOWA's mosaic augmentation (code: only when the training data set is MVTec AD; a defect type drawn
        first, full-resolution tiles, one resize) and its soft masks (positive at > 0)."""
        from zsad.data.augment import MosaicDataset

        m = self.config.augment
        name = (info or {}).get("dataset")
        rate = 0.0 if (m.datasets and name not in m.datasets) else m.rate
        if rate <= 0 and not m.soft_masks:
            return dataset
        return MosaicDataset(dataset, rate, seed=self.config.train.seed, relabel=m.relabel, draw="defect_type",
                             soft_masks=m.soft_masks)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        images, labels = batch["image"], batch["label"].long()
        gt = (batch["mask"] > c.loss.mask_threshold).to(images.dtype)
        with torch.no_grad():
            global_embedding, taps = self.encode(images)
        text = self.encode_text()
        image_logits = self.image_logits(global_embedding, text)
        if c.loss.image_loss == "double_softmax":  # the code's CrossEntropyLoss over probabilities
            image_loss = F.cross_entropy(image_logits.softmax(dim=-1), labels)
        else:
            image_loss = F.cross_entropy(image_logits, labels)
        feats = F.normalize(self.adapted(taps), dim=-1)
        cos = (feats @ text.t() / c.patch_temperature).permute(0, 1, 3, 2)  # [B, L, 2, N]
        b, n_layers, g = cos.shape[0], cos.shape[1], self.backbone.info.grid
        up = upsample(cos.reshape(b * n_layers * 2, g, g), self.image_size, c.align_corners)
        probs = up.reshape(b, n_layers, 2, *gt.shape[-2:]).softmax(dim=2)
        focal, dice = layered_focal_dice(probs, gt, c.loss.focal_gamma)
        total = image_loss + c.loss.seg_weight * (focal + dice)
        return {"total": total, "image_ce": image_loss.detach(), "focal": focal.detach(), "dice": dice.detach()}

