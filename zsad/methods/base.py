"""What every method is: an ``nn.Module`` with forward / loss / text_embeddings / stages, plus shared config parts.

A method's inference is a chain of ``Stage`` objects (the export plan): each names a sub-module, its input and
output tensors and their shapes ("B" marks the dynamic batch axis). ``run_stages`` executes such a chain by
tensor name; ``Method.forward`` is exactly that chain, so what is exported is what eager runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from zsad import ZsadError


@dataclass
class AnomalyOutput:
    score: torch.Tensor  # [B] image-level anomaly score
    anomaly_map: torch.Tensor  # [B,S,S] smoothed pixel-level map


@dataclass(frozen=True)
class Stage:
    """One exportable piece of a method's inference. ``module(*inputs) -> outputs`` in the declared order."""

    name: str
    module: nn.Module
    inputs: dict[str, tuple]  # tensor name -> shape, "B" = dynamic batch
    outputs: dict[str, tuple]
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # tensors that are not float32 (e.g. token ids)

    def dtype(self, name: str) -> torch.dtype:
        return self.dtypes.get(name, torch.float32)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for name, shape in {**self.inputs, **self.outputs}.items():
            dyn = {i: "batch" for i, d in enumerate(shape) if d == "B"}
            if dyn:
                axes[name] = dyn
        return axes

    def example_inputs(self, batch: int = 2, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs of the declared shapes (float: N(0,1); integer: zeros, e.g. padding token ids)."""
        out = []
        for name, shape in self.inputs.items():
            size = [batch if d == "B" else d for d in shape]
            dt = self.dtype(name)
            out.append(torch.randn(*size, generator=generator, dtype=dt) if dt.is_floating_point
                       else torch.zeros(*size, dtype=dt))
        return tuple(out)


def run_stages(stages: Sequence[Stage], **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run a stage chain by tensor name; returns every tensor produced (inputs included)."""
    env = dict(tensors)
    for st in stages:
        missing = [n for n in st.inputs if n not in env]
        if missing:
            raise ZsadError(f"stage '{st.name}' needs {missing}, which no earlier stage produces")
        out = st.module(*[env[n] for n in st.inputs])
        out = out if isinstance(out, tuple) else (out,)
        if len(out) != len(st.outputs):
            raise ZsadError(f"stage '{st.name}' returned {len(out)} tensors, declared {list(st.outputs)}")
        env.update(zip(st.outputs, out))
    return env


# -- config parts shared by the methods ------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    arch: str  # open_clip model name, "zsad-tiny", or a model-config JSON path
    pretrained: str | None  # open_clip tag, e.g. "openai" (needs internet once)
    quick_gelu: bool | None  # None = automatic (QuickGELU for OpenAI weights)
    image_size: int
    pos_interpolation: str  # how the positional table is resized for image_size
    weights: str | None = None  # local CLIP weights file; overrides `pretrained`
    init_seed: int = 0  # seeds random CLIP weights (tests/benchmarks) so a checkpoint can rebuild them


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


class Method(nn.Module):
    """Base class. Subclasses set ``name``, build ``self.backbone`` and implement the abstract pieces."""

    name: str = ""

    def __init__(self, config, profile: str):
        super().__init__()
        self.config = config
        self.profile = profile

    # -- to implement -------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def text_embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.backbone.info.image_size

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        env = run_stages(self.stages(), images=images)
        return AnomalyOutput(score=env["score"], anomaly_map=env["anomaly_map"])

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

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "backbone"):
            self.backbone.eval()  # frozen CLIP stays in eval mode (no dropout) while heads train
        self.invalidate_text_cache()
        return self
