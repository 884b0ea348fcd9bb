"""Bayes-PFL (Qu et al., CVPR 2025): Bayesian prompt flow learning, on the zsad core.

Our choices: docs/methods/bayespfl.md (the released code where it differs from the paper). Shapes at the paper
profile (518 px, N = 1369 patches, D = 1024, E = W = 768, L = 4 taps, B = 3 banks, R = 10 samples, T = 2BR = 60):

1. frozen CLIP ViT with **plain GELU** in both towers (the released code's activation; the profile's
   ``backbone.quick_gelu: false``): raw taps F_l [N,D] (no CLS) and x_cls = ln_post(CLS) @ proj [E];
2. image-specific distribution (ISD) of the context words: a planar flow (K = 10) whose q0 and steps are functions
   of x_cls, sampled R times: phi^e [R,W]; image-agnostic distributions (IAD) of the normal / abnormal state words:
   flows from learned free vectors, phi^n, phi^a [R,W] (zsad.modules.flows);
3. prompts: bank vectors + samples, class-aware text "[SOT] <5 context + 5 state vectors> <class name> [EOT]",
   2BR sequences per image run through the frozen text tower as ONE batch cut after the end token (``text_length``
   tokens instead of 77: identical output, ~4.9x less compute): unit-length Z [T,E] (zsad.modules.prompt_bank);
4. RCA refines Z per layer with the projected patches (zsad.modules.rca); pixel logits exp(tau_pix) F^s Z~^T;
   pair i (normal) / i + BR (abnormal) gives the map sigmoid(L_a - L_n) after a bilinear (align_corners=True)
   upsample; the map is the mean over the L*BR pairs (image ensemble), smoothed with a Gaussian (sigma 8);
5. image branch: g = normalize(image_mapping(x_cls + fuse(F))), fuse = attention pooling over the concatenated taps;
   s_text = mean over pairs of sigmoid(l_a - l_n) with l = exp(tau_img) normalize(class_mapping(Z)) . g;
6. image score = 0.5 s_text + 0.5 mean(top-k of the unsmoothed map), k = 2000: the deployable per-image form,
   WITHOUT the released code's per-category min-max over the test set (spec B8.6). ``zsad.calibration``
   fits optional per-class constants on normal images.

Monte-Carlo noise: deterministic by default. Three noise banks (context, normal, abnormal, each [R,W]) are drawn once
from ``sampling.noise_seed`` at construction, so eager, exported and served runs agree; the IAD samples phi^n,
phi^a are then constants (baked into the prompt head at export). ``sampling.noise: random`` draws fresh noise on
every call (research only; not exportable). Training always samples (R = ``sampling.train_samples``).

Export plan (``stages()``; the text encoder is its own stage because the prompts depend on the image):

| stage | inputs | outputs |
|---|---|---|
| encoder | images [B,3,S,S] | global_embedding [B,E], taps [B,L,N,D] |
| prompt_head | global_embedding [B,E], class_tokens int64 [B,Lc] | prompt_embeddings [B,T,Ls,W], eot_index int64 [B] |
| text_encoder | prompt_embeddings [B,T,Ls,W], eot_index int64 [B] | text_features [B,T,E] (unit length) |
| head | global_embedding, taps, text_features | image_prob [B] (s_text), pair_logits [B,L*B*R,g,g] |
| postprocess | image_prob, pair_logits | score [B], anomaly_map [B,S,S] |

``Ls`` = ``text_length`` (16), ``Lc`` = Ls - P - Q (6): ``class_tokens`` are the CLIP BPE ids of the class name,
"[SOT] words [EOT] 0...", cut to Lc; :meth:`BayesPfl.encode_class_names` makes them outside the graph (the served
text model does the same), and ``forward(images, class_names)`` takes the words (default ``default_class_name``) as
given: CLIP's tokeniser only lower-cases them and collapses whitespace. Data-set folder names become words before
that, by zsad.methods.bayespfl_protocol.class_words (zsad-eval under its protocol, training under ``zsad``'s
rule).

Deviations from the released code (each a knob where it matters): the second, CE-only training stage on fuse +
mappings is ``second_stage`` (on in the paper profile) with early stopping only on user-named held-out classes of
the training data (``train.heldout_classes``; the released selection on target-domain classes leaks the test set,
spec B8.9); the two unused decoders and three p_mu layers are not created (23,497,505 trainable parameters at
ViT-L instead of 27,370,017 registered); RCA's Conv1d(k=1) is a Linear.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zsad import ZsadError
from zsad.backbone import tokenize
from zsad.methods.base import BackboneConfig, Method, TrainConfig, TrainingStage
from zsad.methods.bayespfl_protocol import BayesPflProtocol, class_words
from zsad.methods.stages import BoundStage, EncoderStage, Stage, TextInput
from zsad.modules.augment import AugmentConfig, BatchAugment
from zsad.modules.flows import ConditionalPlanarFlow, StatePlanarFlows
from zsad.modules.losses import dice_loss, focal_loss
from zsad.modules.precision import as_fp32, fp32_region
from zsad.modules.prompt_bank import PromptBank, assemble_sequences
from zsad.modules.rca import ResidualCrossModalAttention
from zsad.postprocess import gaussian_blur, upsample
from zsad.triton_models.zsad_common.guard import BadInput
from zsad.triton_models.zsad_common.text import class_name, class_name_ids

NOISE_MODES = ("fixed", "random")


@functools.lru_cache(maxsize=4096)
def _class_name_ids(arch: str, length: int, words: str) -> tuple[int, ...]:
    try:
        ids = class_name_ids(words, lambda text: tokenize(arch, [text])[0].tolist(), length, f"class name '{words}'")
    except BadInput as err:
        raise ZsadError(f"{err}. Use a shorter name or raise text_length (<= 77).") from None
    return tuple(ids)


def class_name_tokens(names: Sequence[str], arch: str, length: int) -> torch.Tensor:
    """Class words, as given -> int64 CLIP token ids [n, length] ("[SOT] words [EOT] 0...").

    The eager path of the class-name input: the rule is ``zsad_common.text.class_name_ids`` (one implementation),
    here applied to open_clip's tokeniser; the served ensemble's text model runs the same function on the
    standard-library tokeniser beside it (triton_models/text_input). No renaming here: bayespfl_protocol.class_words
    turns folder names into words.
    """
    for name in names:
        try:
            class_name(name)
        except BadInput as err:
            raise ZsadError(f"{err}, got {name!r}") from None
    return torch.tensor([_class_name_ids(arch, length, name) for name in names], dtype=torch.int64)


# -- config -------------------------------------------------------------------------------------------------------
@dataclass
class BankConfig:
    banks: int  # B: prompts per bank
    context_length: int  # P: learnable context vectors per prompt
    state_length: int  # Q: learnable state vectors per prompt


@dataclass
class FlowConfig:
    length: int  # K planar steps
    hidden: int  # width of the mu / log-variance MLPs
    log_det_eps: float  # log(|1 + u^T psi| + eps)
    free_init_std: float  # init std of the state flows' free u, w, b and xi (released: 1)
    log_var_init: float  # initial log-variance of q0 (released: 0, unit variance)


@dataclass
class SamplingConfig:
    samples: int  # R at inference (10)
    train_samples: int  # R in training (1)
    noise: str  # fixed: seeded noise banks (deterministic, exportable) | random: fresh noise per call (research)
    noise_seed: int

    def __post_init__(self):
        if self.noise not in NOISE_MODES:
            raise ZsadError(f"sampling.noise must be one of {NOISE_MODES}, got '{self.noise}'")
        if self.samples < 1 or self.train_samples < 1:
            raise ZsadError("sampling.samples and sampling.train_samples must be >= 1")


@dataclass
class BayesPflLossConfig:
    focal_gamma: float  # 2, fg / bg balanced
    dice_smooth: float  # 1e-5, foreground channel, pooled over the batch
    kl_weight: float  # 0.01 on KL_ctx + KL_n + KL_a
    ort_weight: float  # 1 on the orthogonality loss
    mask_threshold: float
    random_pair: bool  # one random bank prompt b per step enters CE / focal / dice (released code); else all


@dataclass
class LrScales:
    """Learning rate of each parameter group = train.lr x scale (released code: 1e-3 / 1e-2 / 1e-3 / 1e-4 / 1e-4)."""

    prompts: float  # prompt banks
    temperatures: float  # tau_pix, tau_img
    flows: float  # amortised u/w/b, free u/w/b and xi
    encoders: float  # mu / log-var encoders of q0 (released: in one group with the heads)
    heads: float  # RCA, fuse, mappings


@dataclass
class SecondStageConfig:
    """The released code's second training stage: CE only, on class_mapping, image_mapping and fuse (train.py's
    ``parameter_linear_list_class``), Adam at a constant ``lr`` (its ``optimizer_stage2``; the cosine schedule is
    bound to the stage-1 optimizer). With it on, stage 1 scores images from normalize(x_cls) alone, as the released
    ``Context_Prompting.forward(stage=1)``; stage 2 and inference use normalize(image_mapping(x_cls + fuse(F)))."""

    enabled: bool
    epochs: int  # at most; early stopping (train.heldout_classes, monitor image AP) may end it sooner
    lr: float


@dataclass
class BayesPflConfig:
    backbone: BackboneConfig
    train: TrainConfig
    taps: list[int]
    prompt: BankConfig
    flow: FlowConfig
    sampling: SamplingConfig
    loss: BayesPflLossConfig
    lr_scales: LrScales
    augment: AugmentConfig
    text_length: int  # tokens per text sequence after the cut (16: EOT at 12-14 for MVTec / VisA names)
    default_class_name: str  # used when a request gives none
    rca_heads: int
    fuse_dim: int
    temperature_init: float  # tau_pix = tau_img = ln(1 / temperature_init) at init
    sigma: float  # Gaussian smoothing of the map (pixels at the model resolution)
    align_corners: bool  # bilinear upsampling of the pair logits (released: True)
    topk: int  # image score: mean of the top-k map values
    text_score_weight: float  # score = w * s_text + (1 - w) * s_img
    second_stage: SecondStageConfig

    def __post_init__(self):
        if not self.taps:
            raise ZsadError("taps must list at least one block")
        if not 0.0 <= self.text_score_weight <= 1.0:
            raise ZsadError(f"text_score_weight must be in [0, 1], got {self.text_score_weight}")
        if self.topk < 1:
            raise ZsadError(f"topk must be >= 1, got {self.topk}")
        if self.second_stage.enabled and self.second_stage.epochs < 1:
            raise ZsadError(f"second_stage.epochs must be >= 1 when second_stage.enabled, got "
                            f"{self.second_stage.epochs}")


# -- trainable parts ------------------------------------------------------------------------------------------------
class AttentionPoolFuse(nn.Module):
    """Concatenated taps [B,N,L*D] -> Linear -> h [B,N,F]; softmax-over-tokens attention pooling; Linear -> [B,E]."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.score = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        b, n_taps, n, d = taps.shape
        h = self.proj(taps.transpose(1, 2).reshape(b, n, n_taps * d))
        alpha = torch.softmax(self.score(h), dim=1)  # [B,N,1]
        return self.out((alpha * h).sum(dim=1))


class BayesPflModules(nn.Module):
    """Everything Bayes-PFL trains, built from widths alone (no CLIP needed: parameter counts are checked this way).

    ``embed_dim`` E (joint space), ``text_width`` W (token embeddings), ``vision_width`` D (tapped tokens).
    """

    def __init__(self, embed_dim: int, text_width: int, vision_width: int, n_taps: int, banks: int = 3,
                 context_length: int = 5, state_length: int = 5, flow_length: int = 10, flow_hidden: int = 512,
                 fuse_dim: int = 512, rca_heads: int = 4, temperature_init: float = 0.07, log_det_eps: float = 1e-5,
                 free_init_std: float = 1.0, log_var_init: float = 0.0):
        super().__init__()
        self.bank = PromptBank(banks, context_length, state_length, text_width)
        self.context_flow = ConditionalPlanarFlow(embed_dim, text_width, flow_length, flow_hidden, log_det_eps,
                                                  log_var_init)
        self.state_flows = StatePlanarFlows(text_width, flow_length, flow_hidden, log_det_eps, free_init_std,
                                            log_var_init)
        self.rca = ResidualCrossModalAttention(vision_width, embed_dim, n_taps, rca_heads)
        self.fuse = AttentionPoolFuse(n_taps * vision_width, fuse_dim, embed_dim)
        self.class_mapping = nn.Linear(embed_dim, embed_dim)
        self.image_mapping = nn.Linear(embed_dim, embed_dim)
        for m in (self.fuse, self.class_mapping, self.image_mapping):
            for lin in m.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, std=0.02)
                    nn.init.zeros_(lin.bias)
        tau = math.log(1.0 / temperature_init)
        self.tau_pixel = nn.Parameter(torch.tensor(tau))
        self.tau_image = nn.Parameter(torch.tensor(tau))

    def group_of(self, name: str) -> str:
        """Which learning-rate group a parameter (named relative to this module) belongs to."""
        if name.startswith("bank."):
            return "prompts"
        if name.startswith("tau_"):
            return "temperatures"
        if name.startswith(("context_flow.u.", "context_flow.w.", "context_flow.b.", "state_flows.normal.",
                            "state_flows.abnormal.")):
            return "flows"
        if name.startswith(("context_flow.encoder.", "state_flows.encoder.")):
            return "encoders"
        return "heads"

    def parameter_groups(self) -> dict[str, int]:
        """Trainable parameter counts per module, for the spec's table (spec B2)."""
        out: dict[str, int] = {}
        for name, p in self.named_parameters():
            key = name.split(".")[0]
            if key == "context_flow":
                key = "context_encoder" if name.startswith("context_flow.encoder.") else "context_amortizers"
            elif key == "state_flows":
                key = "state_encoder" if name.startswith("state_flows.encoder.") else "state_free"
            elif key.startswith("tau_"):
                key = "temperatures"
            out[key] = out.get(key, 0) + p.numel()
        return out


# -- the method -----------------------------------------------------------------------------------------------------
class BayesPfl(Method):
    name = "bayespfl"
    paper_name = "Bayes-PFL"
    config_class = BayesPflConfig
    paper_protocol = BayesPflProtocol()  # its released test script (zsad/methods/bayespfl_protocol.py)
    # buffers: the fixed noise samples (sampling.noise_seed)
    noise_context: torch.Tensor
    noise_normal: torch.Tensor
    noise_abnormal: torch.Tensor

    def __init__(self, config: BayesPflConfig, profile: str):
        super().__init__(config, profile)
        self.backbone = self.load_backbone()
        info = self.backbone.info
        clip = self.backbone.clip
        self.text_width = clip.token_embedding.embedding_dim
        context = clip.positional_embedding.shape[0]
        p = config.prompt
        prompt_len = p.context_length + p.state_length
        if not prompt_len + 2 <= config.text_length <= context:
            raise ZsadError(f"text_length must be in {prompt_len + 2}..{context} (prompt of {prompt_len} vectors "
                            f"+ SOT + EOT), got {config.text_length}")
        if config.topk > info.image_size ** 2:
            raise ZsadError(f"topk {config.topk} exceeds the {info.image_size ** 2} pixels of the map")
        f = config.flow
        self.pfl = BayesPflModules(info.embed_dim, self.text_width, info.width, len(config.taps), p.banks,
                                   p.context_length, p.state_length, f.length, f.hidden, config.fuse_dim,
                                   config.rca_heads, config.temperature_init, f.log_det_eps, f.free_init_std,
                                   f.log_var_init)
        s = config.sampling
        gen = torch.Generator().manual_seed(int(s.noise_seed))
        for buf in ("noise_context", "noise_normal", "noise_abnormal"):
            self.register_buffer(buf, torch.randn(s.samples, self.text_width, generator=gen), persistent=False)
        self.postprocess = PairMapPostprocess(info.image_size, config.sigma, config.align_corners, config.topk,
                                              config.text_score_weight, chunk=p.banks * s.samples)
        self.augment = BatchAugment(config.augment)
        self._state_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- dimensions -----------------------------------------------------------------------------------------------
    @property
    def prompt_length(self) -> int:
        return self.config.prompt.context_length + self.config.prompt.state_length

    @property
    def class_token_length(self) -> int:
        """Lc: token ids per class name fed to the graph ([SOT] name [EOT] padding)."""
        return self.config.text_length - self.prompt_length

    def sequences_per_image(self, samples: int | None = None) -> int:
        return 2 * self.config.prompt.banks * (samples or self.config.sampling.samples)

    # -- class names ----------------------------------------------------------------------------------------------
    def text_inputs(self) -> list[TextInput]:
        lc = self.class_token_length
        return [TextInput("class_name", "class_tokens", lc, "zsad.methods.bayespfl:class_name_tokens",
                          {"arch": self.backbone.info.arch, "length": lc}, self.config.default_class_name,
                          standalone="clip_class_name")]

    def encode_class_names(self, names: str | Sequence[str]) -> torch.Tensor:
        """Class names -> int64 token ids [len(names), Lc] ("[SOT] words [EOT] 0..."), done outside the graph."""
        return self.text_inputs()[0].encode([names] if isinstance(names, str) else names)

    # -- pieces -----------------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (x_cls = ln_post(CLS) @ proj [B,E], raw taps without CLS [B,L,N,D]); stock attention."""
        return self.backbone.forward_taps(images, self.config.taps, mode="qk", global_ln_post=True)

    def state_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The IAD samples phi^n, phi^a [R,W] from the fixed noise banks: constants, cached outside training."""
        dev = self.noise_normal.device
        if self._state_cache is None or self._state_cache[0].device != dev:
            with torch.no_grad():
                phi_n, phi_a, _, _ = self.pfl.state_flows(self.noise_normal, self.noise_abnormal)
            self._state_cache = (phi_n.detach(), phi_a.detach())
        return self._state_cache

    def invalidate_text_cache(self) -> None:
        self._state_cache = None

    def sample_prompts(self, global_embedding: torch.Tensor, class_tokens: torch.Tensor, phi_normal: torch.Tensor,
                       phi_abnormal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt head: ISD samples from the noise bank, the constant IAD samples ``phi_normal`` /
        ``phi_abnormal`` [R,W], the bank and the class tokens -> the text tower's input (``prompt_embeddings``)."""
        if self.config.sampling.noise == "random":  # research mode: fresh samples on every call (not exportable)
            r, w = self.noise_context.shape
            dev, dt = global_embedding.device, global_embedding.dtype
            noise = torch.randn(global_embedding.shape[0], r, w).to(dev, dt)
            phi_normal, phi_abnormal, _, _ = self.pfl.state_flows(torch.randn(r, w).to(dev, dt),
                                                                  torch.randn(r, w).to(dev, dt))
        else:
            noise = self.noise_context.unsqueeze(0)
        phi_e, _ = self.pfl.context_flow(global_embedding, noise)
        return self.prompt_embeddings(phi_e, phi_normal, phi_abnormal, class_tokens)

    def prompt_embeddings(self, phi_context: torch.Tensor, phi_normal: torch.Tensor, phi_abnormal: torch.Tensor,
                          class_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples + bank + class tokens -> (sequences [N,T,Ls,W], end-token index [N])."""
        prompts = self.pfl.bank(phi_context, phi_normal, phi_abnormal)
        seqs = assemble_sequences(prompts, self.backbone.token_embeddings(class_tokens))
        # ids < 2^24 are exact in float32; the end token has the largest id (as open_clip's argmax pooling)
        eot = class_tokens.to(torch.float32).argmax(dim=-1) + self.prompt_length
        return seqs, eot

    def text_features(self, sequences: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """[N,T,Ls,W] + [N] -> unit-length text embeddings [N,T,E]: all N*T sequences in one text-tower call."""
        n, t = sequences.shape[:2]
        flat = sequences.reshape(n * t, sequences.shape[2], sequences.shape[3])
        eot = eot_index.unsqueeze(1).expand(n, t).reshape(n * t)
        return F.normalize(self.backbone.encode_prompted_text(flat, eot).reshape(n, t, -1), dim=-1)

    def image_logits(self, global_embedding: torch.Tensor, taps: torch.Tensor, text: torch.Tensor,
                     fused: bool = True) -> torch.Tensor:
        """Image branch: [N,T] logits exp(tau_img) * normalize(class_mapping(Z)) . normalize(image_mapping(x + fuse));
        ``fused=False``: . normalize(x) (the released stage 1 when a second stage follows)."""
        pfl = self.pfl
        image = pfl.image_mapping(global_embedding + pfl.fuse(taps)) if fused else global_embedding
        mapped = pfl.class_mapping(text)
        # fp32 under autocast: cosines x exp(tau) (14.3 at init), then the sigmoid of the abnormal - normal difference
        with fp32_region(image):
            g = F.normalize(as_fp32(image), dim=-1)
            q = F.normalize(as_fp32(mapped), dim=-1)
            return torch.exp(pfl.tau_image) * (q @ g.unsqueeze(-1)).squeeze(-1)

    def pixel_logits(self, taps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """RCA + alignment: [N,L,T,g,g] logits exp(tau_pix) * F^s . Z~_l."""
        patches, refined = self.pfl.rca(taps, text)
        with fp32_region(patches):  # fp32 under autocast, as image_logits
            logits = torch.exp(self.pfl.tau_pixel) * (as_fp32(patches) @ as_fp32(refined).transpose(-1, -2))
        b, n_taps, _, t = logits.shape
        g = self.backbone.info.grid
        return logits.transpose(-1, -2).reshape(b, n_taps, t, g, g)

    def head(self, global_embedding: torch.Tensor, taps: torch.Tensor, text: torch.Tensor):
        """-> (s_text [B], pair-difference logits L_a - L_n [B, L*B*R, g, g])."""
        half = text.shape[1] // 2
        img = self.image_logits(global_embedding, taps, text)
        s_text = torch.sigmoid(img[:, half:] - img[:, :half]).mean(dim=-1)
        pix = self.pixel_logits(taps, text)
        diff = pix[:, :, half:] - pix[:, :, :half]
        return s_text, diff.reshape(diff.shape[0], -1, diff.shape[-2], diff.shape[-1])

    def text_embeddings(self) -> torch.Tensor:
        raise ZsadError("Bayes-PFL has no static text embeddings: its prompts depend on the image (the "
                        "'text_encoder' stage computes them per image)")

    # -- export plan --------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        info = self.backbone.info
        s, g, n, d, e = info.image_size, info.grid, info.grid ** 2, info.width, info.embed_dim
        n_taps, t = len(self.config.taps), self.sequences_per_image()
        w, ls, lc = self.text_width, self.config.text_length, self.class_token_length
        phi_n, phi_a = self.state_samples()
        ints = {"class_tokens": torch.int64, "eot_index": torch.int64}
        return [
            Stage("encoder", EncoderStage(self), {"images": ("B", 3, s, s)},
                  {"global_embedding": ("B", e), "taps": ("B", n_taps, n, d)}),
            Stage("prompt_head", BoundStage(self, "sample_prompts", phi_normal=phi_n, phi_abnormal=phi_a),
                  {"global_embedding": ("B", e), "class_tokens": ("B", lc)},
                  {"prompt_embeddings": ("B", t, ls, w), "eot_index": ("B",)}, dtypes=dict(ints)),
            Stage("text_encoder", BoundStage(self, "text_features"),
                  {"prompt_embeddings": ("B", t, ls, w), "eot_index": ("B",)},
                  {"text_features": ("B", t, e)}, dtypes={"eot_index": torch.int64}),
            Stage("head", BoundStage(self, "head"),
                  {"global_embedding": ("B", e), "taps": ("B", n_taps, n, d), "text_features": ("B", t, e)},
                  {"image_prob": ("B",), "pair_logits": ("B", n_taps * t // 2, g, g)}),
            Stage("postprocess", self.postprocess, {"image_prob": ("B",), "pair_logits": ("B", n_taps * t // 2, g, g)},
                  {"score": ("B",), "anomaly_map": ("B", s, s)}),
        ]

    # -- training -----------------------------------------------------------------------------------------------
    SECOND_STAGE_MODULES = ("fuse.", "class_mapping.", "image_mapping.")  # names under self.pfl

    def training_stages(self) -> list[TrainingStage]:
        t, second = self.config.train, self.config.second_stage
        stages = [TrainingStage(1, t.epochs, t.schedule, monitor="pixel_ap")]  # released: stage 1 watches pixel AP
        if second.enabled:
            stages.append(TrainingStage(2, second.epochs, "constant", monitor="image_ap"))  # stage 2: image AP
        return stages

    def _check_stage(self, stage: int) -> None:
        if stage not in (1, 2) or (stage == 2 and not self.config.second_stage.enabled):
            raise ZsadError(f"bayespfl has no training stage {stage} (second_stage.enabled: "
                            f"{self.config.second_stage.enabled})")

    def param_groups(self, lr: float, stage: int = 1) -> list[dict]:
        self._check_stage(stage)
        if stage == 2:
            params = [p for name, p in self.pfl.named_parameters()
                      if p.requires_grad and name.startswith(self.SECOND_STAGE_MODULES)]
            return [{"params": params, "lr": self.config.second_stage.lr, "name": "second_stage"}]
        scales = self.config.lr_scales
        groups: dict[str, list] = {}
        for name, p in self.pfl.named_parameters():
            if p.requires_grad:
                groups.setdefault(self.pfl.group_of(name), []).append(p)
        return [{"params": ps, "lr": lr * getattr(scales, k), "name": k} for k, ps in groups.items()]

    def training_dataset(self, dataset, info: dict | None = None):
        """Bayes-PFL's 2x2 mosaic of 4 anomalous images, labelled anomalous (code: p = 0.4 on MVTec AD only)."""
        from zsad.data.augment import MosaicDataset

        a = self.config.augment
        if a.mosaic_rate <= 0 or (info or {}).get("dataset") not in a.mosaic_datasets:
            return dataset
        return MosaicDataset(dataset, a.mosaic_rate, seed=self.config.train.seed, draw="anomalous")

    def loss(self, batch: dict, stage: int = 1) -> dict[str, torch.Tensor]:
        """Stage 1: CE + focal + dice + KL + orthogonality. Stage 2 (``second_stage``): the CE term alone, with the
        same sampled prompts and pair draw (the released ``loss = loss_class``)."""
        self._check_stage(stage)
        c = self.config
        images, labels = batch["image"], batch["label"].long()
        gt = (batch["mask"] > c.loss.mask_threshold).to(images.dtype)
        images, gt = self.augment(images, gt)
        n, r, nb = images.shape[0], c.sampling.train_samples, c.prompt.banks
        names = [class_words(f) for f in batch["cls"]] if batch.get("cls") else [c.default_class_name] * n
        class_tokens = self.encode_class_names(names).to(images.device)
        with torch.no_grad():
            global_embedding, taps = self.encode(images)
        w = self.text_width
        noise_ctx = torch.randn(n, r, w).to(images)
        noise_n, noise_a = torch.randn(r, w).to(images), torch.randn(r, w).to(images)
        # stage 2 trains no prompt, flow or RCA parameter: their outputs need no graph
        with torch.set_grad_enabled(stage == 1 and torch.is_grad_enabled()):
            phi_e, kl_ctx = self.pfl.context_flow(global_embedding, noise_ctx)
            phi_n, phi_a, kl_n, kl_a = self.pfl.state_flows(noise_n, noise_a)
            text = self.text_features(*self.prompt_embeddings(phi_e, phi_n, phi_a, class_tokens))  # [N,2RB,E]
        half = r * nb
        # the pairs that enter CE / focal / dice: one random bank prompt b (all R samples of it), or all pairs
        if c.loss.random_pair:
            b = int(torch.randint(0, nb, ()))
            pairs = torch.arange(r) * nb + b
        else:
            pairs = torch.arange(half)
        idx = torch.cat([pairs, pairs + half]).to(images.device)
        sel = text.index_select(1, idx)
        k = pairs.numel()
        # with a second stage, stage 1 scores images from x_cls alone (fuse / image_mapping get no gradient)
        fused = stage == 2 or not c.second_stage.enabled
        img = self.image_logits(global_embedding, taps, sel, fused=fused)  # [N,2k]
        image_ce = F.cross_entropy(torch.stack([img[:, :k], img[:, k:]], dim=-1).reshape(n * k, 2),
                                   labels.repeat_interleave(k))
        if stage == 2:
            return {"total": image_ce, "image_ce": image_ce.detach()}
        pix = self.pixel_logits(taps, sel)  # [N,L,2k,g,g]
        diff = pix[:, :, k:] - pix[:, :, :k]  # [N,L,k,g,g]: abnormal - normal
        focal = dice = torch.zeros((), device=images.device)
        for j in range(k):  # sum over the tapped layers of focal + dice, mean over the pairs
            for layer in range(diff.shape[1]):
                p_abn = torch.sigmoid(upsample(diff[:, layer, j], self.image_size, c.align_corners))
                probs = torch.stack([1 - p_abn, p_abn], dim=1)
                focal = focal + focal_loss(probs, gt, gamma=c.loss.focal_gamma, reduction="balanced") / k
                dice = dice + dice_loss(p_abn, gt, smooth=c.loss.dice_smooth, pooled=True) / k
        kl = kl_ctx.mean() + kl_n.mean() + kl_a.mean()
        ort = self.orthogonality_loss(text)
        total = image_ce + focal + dice + c.loss.kl_weight * kl + c.loss.ort_weight * ort
        return {"total": total, "image_ce": image_ce.detach(), "focal": focal.detach(), "dice": dice.detach(),
                "kl": kl.detach(), "ort": ort.detach()}

    def orthogonality_loss(self, text: torch.Tensor) -> torch.Tensor:
        """Mean over (image, sample, b, b') of squared off-diagonal cosine similarities among the B prompts of each
        bank (diagonal zeroed but counted, as released), normal + abnormal."""
        n, t, e = text.shape
        nb = self.config.prompt.banks
        z = F.normalize(text, dim=-1).reshape(n, 2, t // (2 * nb), nb, e)
        sim = z @ z.transpose(-1, -2)  # [N,2,R,B,B]
        off = sim * (1 - torch.eye(nb, dtype=sim.dtype, device=sim.device))
        return (off ** 2).mean(dim=(0, 2, 3, 4)).sum()


class PairMapPostprocess(nn.Module):
    """pair_logits [B,C,g,g] + s_text [B] -> (score [B], anomaly_map [B,S,S]).

    M = mean_c sigmoid(upsample(pair_logits_c)) (channels in chunks, so at most ``chunk`` S x S maps are live);
    score = w * s_text + (1 - w) * mean(top-k of M); anomaly_map = Gaussian_sigma(M) (scipy-exact, reflect).
    """

    def __init__(self, image_size: int, sigma: float = 8.0, align_corners: bool = True, topk: int = 2000,
                 text_weight: float = 0.5, chunk: int = 30, truncate: float = 4.0):
        super().__init__()
        self.image_size, self.sigma, self.align_corners = int(image_size), float(sigma), bool(align_corners)
        self.topk, self.text_weight = int(topk), float(text_weight)
        self.chunk, self.truncate = int(chunk), float(truncate)

    def mean_map(self, pair_logits: torch.Tensor) -> torch.Tensor:
        c, size = pair_logits.shape[1], self.image_size
        total = None
        for start in range(0, c, self.chunk):
            part = F.interpolate(pair_logits[:, start:start + self.chunk], size=(size, size), mode="bilinear",
                                 align_corners=self.align_corners)
            part = torch.sigmoid(part).sum(dim=1)
            total = part if total is None else total + part
        if total is None:
            raise ZsadError("pair_logits has no prompt pairs (dimension 1 is empty)")
        return total / c

    def forward(self, image_prob: torch.Tensor, pair_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.mean_map(pair_logits)
        s_img = m.flatten(1).topk(self.topk, dim=1).values.mean(dim=1)
        score = self.text_weight * image_prob + (1.0 - self.text_weight) * s_img
        return score, gaussian_blur(m, self.sigma, self.truncate)

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, sigma={self.sigma}, align_corners={self.align_corners}, "
                f"topk={self.topk}, text_weight={self.text_weight}")

