"""A method's inference as a chain of stages (the export plan) and the one walk of such a chain.

Each ``Stage`` names a sub-module, its input and output tensors and their shapes ("B" marks the dynamic batch
axis). ``walk_stages`` runs a chain by tensor name with per-stage hooks (eager, the parity gate, calibration,
zsad-bench); ``Method.forward`` is exactly ``run_stages`` over ``Method.stages()``, so what is exported is what eager
runs. ``BoundStage`` makes a stage module out of one function of the method. (A *training* phase is another thing:
``zsad.methods.base.TrainingStage``.)
"""
from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zsad import ZsadError
from zsad.selection import TopKSelection


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

    def __init__(self, method: nn.Module, function: str, **constants: torch.Tensor | nn.Module):
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

    def __init__(self, method: nn.Module):  # a zsad.methods.base.Method
        super().__init__(method, "encode")
