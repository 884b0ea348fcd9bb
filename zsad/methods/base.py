"""What every method is: an ``nn.Module`` with forward / loss / text_embeddings / stages, plus shared config parts.

A method's inference is a chain of ``Stage`` objects (the export plan): each names a sub-module, its input and
output tensors and their shapes ("B" marks the dynamic batch axis). ``run_stages`` executes such a chain by
tensor name; ``Method.forward`` is exactly that chain, so what is exported is what eager runs.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zsad import ZsadError, per_image_names
from zsad.backbone import ClipBackbone, load_clip
from zsad.metrics import AUPRO_MODES
from zsad.selection import TopKSelection


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
    # discrete outputs (a top-k selection) and how they were made: compared by the tie rule, never by value
    selections: dict[str, TopKSelection] = field(default_factory=dict)
    # integer inputs that index a dimension: name -> its size (valid values 0..size-1); random inputs and the served
    # models' request checks use it
    index_bounds: dict[str, int] = field(default_factory=dict)

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
        """Random inputs of the declared shapes (float: N(0,1); indices: uniform over ``index_bounds``; other
        integers: zeros, e.g. padding token ids)."""
        out = []
        for name, shape in self.inputs.items():
            size = [batch if d == "B" else d for d in shape]
            dt = self.dtype(name)
            if dt.is_floating_point:
                out.append(torch.randn(*size, generator=generator, dtype=dt))
            elif name in self.index_bounds:
                out.append(torch.randint(0, self.index_bounds[name], size, generator=generator, dtype=dt))
            else:
                out.append(torch.zeros(*size, dtype=dt))
        return tuple(out)

    def random_inputs_meaningful(self) -> bool:
        """Whether ``example_inputs`` are valid inputs of this stage (every integer input is a declared index)."""
        return all(self.dtype(n).is_floating_point or n in self.index_bounds for n in self.inputs)


@dataclass(frozen=True)
class TextInput:
    """A per-image text field of a request (Bayes-PFL: the class name) that becomes a stage tensor outside the graph.

    ``encoder`` names a function "module:function" called as ``fn(texts, **kwargs)`` -> int64 [n, length]; the
    eager path (``Method.stage_inputs``) calls it. The served ensemble's text model cannot import zsad: it runs the
    standalone version named by ``standalone``, configured with this spec (zsad.export writes it), and the export
    tests check its ids equal ``encode``'s. Both take the client's text as given (no renaming).
    """

    request_name: str  # the request field, e.g. "class_name"
    tensor: str  # the stage-chain input it becomes, e.g. "class_tokens"
    length: int
    encoder: str
    kwargs: dict
    default: str  # used where a caller gives no text
    # the standalone text model that repeats ``encoder`` in a served ensemble: "clip_class_name" (the text as given,
    # CLIP BPE; triton_models/text_input); "" = none, the method cannot be served
    standalone: str = ""

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        module, _, attr = self.encoder.partition(":")
        return getattr(importlib.import_module(module), attr)(list(texts), **self.kwargs)


StageRun = Callable[[Stage, dict[str, Any]], dict[str, Any]]  # (stage, its inputs by name) -> its outputs by name


def torch_stage(st: Stage, inputs: dict[str, Any]) -> dict[str, Any]:
    """A stage computed by its own module (the eager path)."""
    out = st.module(*[inputs[n] for n in st.inputs])
    out = out if isinstance(out, tuple) else (out,)
    if len(out) != len(st.outputs):
        raise ZsadError(f"stage '{st.name}' returned {len(out)} tensors, declared {list(st.outputs)}")
    return dict(zip(st.outputs, out, strict=True))


def walk_stages(stages: Sequence[Stage], feed: dict[str, Any], run: StageRun = torch_stage, *,
                on_stage: Callable[[Stage, dict, dict], None] | None = None,
                stop: Callable[[Stage, dict], bool] | None = None) -> dict[str, Any]:
    """The one walk of a stage chain: each stage gets its inputs by name from ``feed`` and the earlier stages'
    outputs, and adds its own; returns every tensor (the feed included).

    ``run`` computes one stage: its module (eager), or an exported model (ONNX Runtime, OpenVINO, a served model).
    ``on_stage(stage, inputs, outputs)`` sees every step (per-stage timing, op profiles, calibration feeds);
    ``stop(stage, env)`` ends the walk before ``stage`` when true (e.g. once a later stage's inputs exist)."""
    env = dict(feed)
    for st in stages:
        if stop is not None and stop(st, env):
            break
        missing = [n for n in st.inputs if n not in env]
        if missing:
            raise ZsadError(f"stage '{st.name}' needs {missing}, which no earlier stage produces")
        inputs = {n: env[n] for n in st.inputs}
        out = run(st, inputs)
        if on_stage is not None:
            on_stage(st, inputs, out)
        env.update(out)
    return env


def run_stages(stages: Sequence[Stage], **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run a stage chain eagerly by tensor name; returns every tensor produced (inputs included)."""
    return walk_stages(stages, tensors)


class BoundStage(nn.Module):
    """A stage module that calls one function of its method: ``method.<function>(*stage inputs, **constants)``.

    ``constants`` are fixed when the stage is built and passed by keyword (their names are the function's
    parameter names): a tensor becomes a buffer (the trained text, folded position tables: constants of the
    exported graph), a module a sub-module (a few-shot memory bank). Read them back as ``stage.module.<name>``.
    """

    def __init__(self, method: Method, function: str, **constants: torch.Tensor | nn.Module):
        super().__init__()
        fn = getattr(method, function, None)
        if not callable(fn):
            raise TypeError(f"{type(method).__name__} has no function '{function}' to bind as a stage")
        params = inspect.signature(fn).parameters
        unknown = [n for n in constants if n not in params]
        if unknown:
            raise TypeError(f"{type(method).__name__}.{function} has no parameter {unknown}")
        self.method = method
        self.function = function
        self.constant_names = tuple(constants)
        for name, value in constants.items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            else:
                self.register_buffer(name, value.detach().clone())
        # torch.export matches the dynamic shapes to forward's parameters, so this instance's forward states the
        # function's own inputs (its parameters without a default that are not bound as constants), not *inputs
        forward = functools.partial(BoundStage.forward, self)
        # a partial takes attributes (it has a __dict__); typeshed does not declare this one
        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p for p in params.values() if p.name not in constants and p.default is inspect.Parameter.empty])
        self.forward = forward  # type: ignore[method-assign]  # per instance on purpose: its own signature

    def forward(self, *inputs):
        constants = {n: getattr(self, n) for n in self.constant_names}
        return getattr(self.method, self.function)(*inputs, **constants)

    def extra_repr(self) -> str:
        return f"function={self.function}, constants={list(self.constant_names)}"


class EncoderStage(BoundStage):
    """``method.encode(images)``: every method's first stage (tools that treat the encoder apart, e.g. int8
    quantisation, recognise it by this class)."""

    def __init__(self, method: Method):
        super().__init__(method, "encode")


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
