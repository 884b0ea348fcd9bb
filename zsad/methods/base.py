"""What every method is: an ``nn.Module`` with forward / loss / text_embeddings / stages, plus shared config parts.

A method's inference is a chain of ``Stage`` objects (zsad.methods.stages, the export plan); ``Method.forward`` is
``run_stages`` over that chain, so what is exported is what eager runs. Training runs in ``TrainingStage`` phases.
"""
from __future__ import annotations

import dataclasses
import inspect
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from zsad import ZsadError, per_image_names
from zsad.backbone import ClipBackbone, load_clip
from zsad.methods.stages import Stage, TextInput, run_stages
from zsad.metrics import AUPRO_MODES


@dataclass
class AnomalyOutput:
    score: torch.Tensor  # [B] image-level anomaly score
    anomaly_map: torch.Tensor  # [B,S,S] smoothed pixel-level map


# -- config parts shared by the methods ------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    arch: str  # open_clip model name, "zsad-tiny", or a model-config JSON path
    pretrained: str | None  # open_clip tag, e.g. "openai" (needs internet once)
    quick_gelu: bool | None  # None = automatic (QuickGELU for OpenAI weights)
    image_size: int
    pos_interpolation: str  # how the positional table is resized for image_size: F.interpolate's mode
    weights: str | None = None  # local CLIP weights file; overrides `pretrained`
    init_seed: int = 0  # seeds random CLIP weights (tests/benchmarks) so a checkpoint can rebuild them
    pos_align_corners: bool = False  # F.interpolate's align_corners for that resize
    pos_antialias: bool = False  # F.interpolate's antialias for that resize (Bayes-PFL's release: True)


@dataclass
class PromptConfig:
    n_ctx: int
    deep_length: int
    deep_depth: int
    normal_template: str
    abnormal_template: str


@dataclass
class LossConfig:
    seg_weight: float  # AnomalyCLIP's lam = 4 on the summed focal + dice terms
    focal_gamma: float
    mask_threshold: float  # gt = mask > threshold


@dataclass
class TrainConfig:
    optimizer: str  # adam | adamw
    lr: float
    betas: list[float]
    weight_decay: float
    epochs: int
    batch_size: int
    seed: int
    schedule: str = "constant"  # constant | cosine (per step, to 0 at the end of the last epoch)
    warmup: float = 0.0  # fraction of all steps with a linear warm-up (cosine schedule)
    # early stopping: classes of the training data held out of training; after every epoch the stage's monitored
    # metric on them decides (empty: every stage runs its fixed number of epochs)
    heldout_classes: list[str] = field(default_factory=list)
    patience: int = 3  # a stage ends at a non-improving epoch after `patience` non-improving ones (released rule)


@dataclass(frozen=True)
class TrainingStage:
    """One phase of training. The method defines what ``loss(batch, stage=index)`` and
    ``param_groups(lr, stage=index)`` mean for it; the loop runs the phases in order (zsad.train.loop)."""

    index: int  # 1-based
    epochs: int  # at most this many epochs (fewer when early stopping ends the stage)
    schedule: str  # learning-rate schedule within the stage: constant | cosine
    monitor: str = "pixel_ap"  # the held-out metric (a key of zsad.evaluate's mean) early stopping watches


class Method(nn.Module, metaclass=ABCMeta):
    """Base class. Subclasses set ``name`` and ``config_class`` (a dataclass), build ``self.backbone`` in
    ``__init__(config, profile)`` and implement the abstract pieces; a subclass that misses one is refused where
    it is defined (``__init_subclass__``), so export, serving and benchmarks can rely on the whole contract."""

    name: str = ""
    config_class: type | None = None  # the dataclass a profile section builds (zsad.configs.build_config)
    paper_name: str = ""  # how the papers' tables (zsad/reference) name it; "" = in none of them
    paper_few_shot_name: str = ""  # how they name its few-shot variant, where that has its own name (AF-CLIP+)
    paper_aupro_mode: str = "anomalyclip"  # the AUPRO definition its paper's tables use (zsad.metrics.AUPRO_MODES)
    backbone: ClipBackbone  # built in the subclass's __init__ (load_backbone)

    def __init__(self, config, profile: str):
        super().__init__()
        self.config = config
        self.profile = profile

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        where = f"{cls.__module__}.{cls.__qualname__}"
        missing = [n for n in ("encode", "stages", "loss", "text_embeddings")
                   if getattr(getattr(cls, n), "__isabstractmethod__", False)]
        if missing:
            raise TypeError(f"{where} does not implement {', '.join(missing)} (see zsad.methods.base.Method)")
        if not (isinstance(cls.name, str) and cls.name.isidentifier()):
            raise TypeError(f"{where}.name must be an identifier (the registry key), got {cls.name!r}")
        if not dataclasses.is_dataclass(cls.config_class):
            raise TypeError(f"{where}.config_class must be a dataclass, got {cls.config_class!r}")
        if cls.paper_aupro_mode not in AUPRO_MODES:
            raise TypeError(f"{where}.paper_aupro_mode must be one of {AUPRO_MODES}, got {cls.paper_aupro_mode!r}")
        # one signature for every method: generic code calls these without method-specific arguments
        for fn, params in (("stages", ["self"]), ("encode", ["self", "images"])):
            got = list(inspect.signature(getattr(cls, fn)).parameters)
            if got != params:
                raise TypeError(f"{where}.{fn} must take ({', '.join(params)}), takes ({', '.join(got)})")

    # -- to implement -------------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, images: torch.Tensor):
        """images [B,3,S,S] -> the first stage's outputs (the frozen backbone's features)."""

    @abstractmethod
    def stages(self) -> list[Stage]:
        """The export plan: ``forward`` is exactly ``run_stages(stages(), **stage_inputs(images))``."""

    @abstractmethod
    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named loss terms of a training batch; "total" is the one optimised."""

    @abstractmethod
    def text_embeddings(self) -> torch.Tensor:
        """The static text side (baked into exported stages), where the method has one."""

    # -- shared ---------------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.backbone.info.image_size

    def text_inputs(self) -> list[TextInput]:
        """Per-image text fields of a request that the stage chain takes as token tensors (default: none)."""
        return []

    def stage_inputs(self, images: torch.Tensor, class_names=None) -> dict[str, torch.Tensor]:
        """The inputs of the stage chain for a batch: images, plus the tensors of ``text_inputs()`` (Bayes-PFL's
        class-name token ids). ``class_names``: one per image, one str for all, or None (the default text).
        Methods without text inputs ignore it."""
        feed = {"images": images}
        n = images.shape[0]
        for ti in self.text_inputs():
            texts = [ti.default] * n if class_names is None else per_image_names(class_names, n)
            feed[ti.tensor] = ti.encode(texts).to(images.device)
        return feed

    def load_backbone(self) -> ClipBackbone:
        """The frozen CLIP of ``config.backbone``, with ``config.taps`` checked against its depth.

        Random CLIP weights (tests) come from ``backbone.init_seed`` (set by ``zsad.methods.build``); everything a
        method builds after this call (its trainable modules) is then initialised from ``train.seed``, the paper's
        seed, as the released train scripts seed the RNG before building their models."""
        b, taps = self.config.backbone, self.config.taps
        backbone = load_clip(b.arch, pretrained=None if b.weights else b.pretrained, weights=b.weights,
                             image_size=b.image_size, quick_gelu=b.quick_gelu, pos_interpolation=b.pos_interpolation,
                             pos_align_corners=b.pos_align_corners, pos_antialias=b.pos_antialias)
        info = backbone.info
        if max(taps) > info.layers or min(taps) < 1:
            raise ZsadError(f"taps {taps} outside the {info.layers} blocks of {info.arch}")
        torch.manual_seed(self.config.train.seed)
        return backbone

    def forward(self, images: torch.Tensor, class_names=None) -> AnomalyOutput:
        env = run_stages(self.stages(), **self.stage_inputs(images, class_names))
        return AnomalyOutput(score=env["score"], anomaly_map=env["anomaly_map"])

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups (dicts with "params" and "lr"); default: all trainable parameters at ``lr``."""
        return [{"params": list(self.trainable_parameters().values()), "lr": lr}]

    def training_stages(self) -> list[TrainingStage]:
        """The phases of training (default: one, ``train.epochs`` long). Methods with more than one take a
        ``stage`` keyword in ``loss`` and ``param_groups``."""
        t = self.config.train
        return [TrainingStage(1, t.epochs, t.schedule)]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable_parameters().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_parameters()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or bad:
            raise ZsadError(f"checkpoint does not fit {self.name}/{self.profile}: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}, shape mismatch {bad[:4]}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k])
        self.invalidate_text_cache()

    def invalidate_text_cache(self) -> None:
        pass

    # -- optional hooks ---------------------------------------------------------------------------------------------
    few_shot: bool = False  # True where fit_memory / clear_memory implement a few-shot mode (AF-CLIP+, SOWA)

    def fit_memory(self, images: torch.Tensor) -> None:
        """Few-shot mode: build a memory bank from K normal images [K,3,S,S] of the class to inspect."""
        raise ZsadError(f"{self.name} has no few-shot mode")

    def clear_memory(self) -> None:
        """Back to zero-shot (drop the memory bank)."""

    def training_dataset(self, dataset, info: dict | None = None):
        """Wrap the training set (e.g. SOWA's mosaic augmentation); ``info`` describes the data. Default: as is."""
        return dataset

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "backbone"):
            self.backbone.eval()  # frozen CLIP stays in eval mode (no dropout) while heads train
        self.invalidate_text_cache()
        return self
