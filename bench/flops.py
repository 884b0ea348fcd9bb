"""Analytic FLOPs per stage, counted once from the model's own shapes.

Each stage runs on fake tensors (no arithmetic, any size, even ViT-L at 518 px in a second or two) under torch's
FlopCounterMode, which counts matmuls and convolutions from their shapes. Attention on the CPU dispatches to ops
FlopCounterMode has no formula for, so the MHA fast path is disabled while counting and the CPU SDPA op gets the
standard formula (2 N M d for Q K^T plus 2 N M d_v for the weighted sum). One multiply-add = 2 FLOPs.
Element-wise ops (softmax, LayerNorm, GELU) are not counted, as usual.

``stage_count`` makes the same pass and also records what the roofline forecast (zsad.bench.forecast) needs: the
parameters and buffers the stage reads, its declared inputs / outputs, and its score intermediates (attention
scores inside a fused SDPA op; similarity matrices an eager path writes on the way to a softmax or a top-k).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    *batch, n, d = q_shape
    m, dv = k_shape[-2], v_shape[-1]
    b = 1
    for x in batch:
        b *= x
    return 2 * b * n * m * d + 2 * b * n * m * dv


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(query.shape if hasattr(query, "shape") else query, key.shape if hasattr(key, "shape") else key,
                       value.shape if hasattr(value, "shape") else value)


def stage_flops(stage, batch: int = 1) -> int:
    """FLOPs of one call of ``stage.module`` at ``batch`` (fake tensors: nothing is computed)."""
    return _fake_tensor_pass(stage, batch)


def _fake_tensor_pass(stage, batch: int, recorder: TorchDispatchMode | None = None) -> int:
    """Run ``stage.module`` once on fake tensors at ``batch`` under the FLOP counter (and ``recorder``, if given);
    its FLOPs. The fused-MHA fast path is off so attention reaches the counter as SDPA."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu}
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            inputs = tuple(mode.from_tensor(t) for t in stage.example_inputs(batch))
            with FlopCounterMode(display=False, custom_mapping=mapping) as counter, \
                    recorder if recorder is not None else contextlib.nullcontext():
                stage.module(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops())


def method_flops(method) -> dict[str, float]:
    """GFLOPs per image for every stage of ``method`` (and their total under "total")."""
    out = {st.name: stage_flops(st) / 1e9 for st in method.stages()}
    out["total"] = sum(out.values())
    return out


# == what a roofline forecast needs besides FLOPs (zsad.bench.forecast) =========================================
# The same fake-tensor pass also records which parameters and buffers a stage reads and the score intermediates it
# makes: attention scores inside a fused SDPA op, and explicit contraction outputs (Q K^T, a similarity matrix) that
# go through element-wise ops into a softmax or a selection (topk, sort, max, ...). zsad.bench.forecast turns these
# element counts into bytes at each precision; its module docstring states the byte model.

CONTRACTIONS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot", "vdot"}
SCORE_TERMINALS = {"_softmax", "softmax", "_log_softmax", "log_softmax", "topk", "sort", "argsort", "kthvalue",
                   "max", "min", "amax", "amin", "argmax", "argmin"}
SOFTMAXES = {"_softmax", "softmax", "_log_softmax", "log_softmax"}  # their output (P) is a score tensor too
GATHERS = {"embedding", "index_select", "index", "gather"}  # a table read only where indexed (argument 0)
VIEWS = {"view", "_unsafe_view", "reshape", "alias", "t", "transpose", "permute", "expand", "select", "slice",
         "unsqueeze", "squeeze", "detach", "as_strided", "split", "unbind", "chunk", "narrow", "diagonal",
         "view_as", "unflatten", "flatten", "lift_fresh"}
SDPA_SCORE_PASSES = 4  # unfused attention: S = Q K^T written, read by softmax, P written, read by P V


@dataclass
class StageCount:
    """One call of a stage at ``batch``, counted on fake tensors: FLOPs (as ``stage_flops``) and the element counts
    the byte model of zsad.bench.forecast needs. ``*_elems`` are floating-point elements (their bytes depend on the
    precision), ``*_bytes`` integer / bool tensors at their own size."""

    name: str
    batch: int
    flops: int
    weight_elems: int  # floating parameters and buffers the stage reads (embedding-style tables: the rows read)
    weight_bytes: int  # integer parameters / buffers the stage reads
    io_elems: int  # the stage's declared floating inputs and outputs
    io_bytes: int  # its declared integer inputs and outputs (e.g. knn_index, int64)
    score_elems: int  # unfused path: element reads + writes of score intermediates (see SDPA_SCORE_PASSES)
    score_bytes: int  # the same for integer / bool score intermediates (a mask made from a similarity)
    scores: list = field(default_factory=list)  # [{"op", "shape", "passes", "calls"}]: where score_elems comes from


@dataclass
class _Op:
    name: str
    ins: list[int]  # base ids of the tensors read
    outs: list[int]  # base ids of the tensors written
    sdpa_scores: tuple | None = None  # a fused attention op: the shape of the scores it never writes


class _Recorder(TorchDispatchMode):
    """Records every op of a stage call: its name, the tensors it reads and writes (views resolved to their base),
    and which parameters / buffers it touches (by identity, before FakeTensorMode converts them)."""

    def __init__(self, weights: dict[int, torch.Tensor]):
        super().__init__()
        self.weights = weights
        self.weight_uses: dict[int, list[tuple[str, int, int]]] = {}  # id -> [(op, argument position, out numel)]
        self.ops: list[_Op] = []
        self.tensors: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so that ids are not reused)
        self.base: dict[int, int] = {}  # tensor id -> base id (a view shares its input's base)

    def _base(self, t: torch.Tensor) -> int:
        if id(t) not in self.base:
            self.base[id(t)] = id(t)
        self.tensors.setdefault(id(t), t)
        return self.base[id(t)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor) and id(a) in self.weights:
                self.weight_uses.setdefault(id(a), []).append((name, pos, sum(t.numel() for t in outs)))
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        in_bases = [self._base(t) for t in ins]
        if name in VIEWS and ins:
            for t in outs:
                self.tensors.setdefault(id(t), t)
                self.base[id(t)] = in_bases[0]
            return out
        op = _Op(name, in_bases, [self._base(t) for t in outs])
        if "scaled_dot_product" in name and "attention" in name and len(ins) >= 3:
            op.sdpa_scores = (*ins[0].shape[:-1], ins[1].shape[-2])  # [..., N queries, M keys]
        self.ops.append(op)
        return out

    # -- after the call -----------------------------------------------------------------------------------------
    def weight_counts(self) -> tuple[int, int]:
        """(floating elements, integer bytes) of the weights read: a table used only by gathers counts the rows
        gathered (at most the whole table), any other use the whole tensor."""
        elems = nbytes = 0
        for i, uses in self.weight_uses.items():
            w = self.weights[i]
            gathered = all(op in GATHERS and pos == 0 for op, pos, _ in uses)
            n = min(w.numel(), sum(k for _, _, k in uses)) if gathered else w.numel()
            if w.is_floating_point():
                elems += n
            else:
                nbytes += n * w.element_size()
        return elems, nbytes

    def score_counts(self) -> tuple[int, int, list[dict]]:
        """(floating element passes, integer / bool byte passes, where they come from) of the score intermediates:
        a fused attention op's scores at SDPA_SCORE_PASSES each; an explicit contraction output that reaches a
        SCORE_TERMINAL through element-wise ops (softmax included) at one write, one read per op reading it, and the
        same for every tensor of that element-wise chain (``_score_chain``)."""
        elems = nbytes = 0
        details: list[dict] = []
        consumers: dict[int, list[int]] = {}
        for j, op in enumerate(self.ops):
            for b in set(op.ins):
                consumers.setdefault(b, []).append(j)
        for j, op in enumerate(self.ops):
            if op.sdpa_scores is not None:
                n = int(torch.Size(op.sdpa_scores).numel())
                elems += SDPA_SCORE_PASSES * n
                details.append({"op": op.name, "shape": list(op.sdpa_scores), "passes": SDPA_SCORE_PASSES})
                continue
            passes = self._score_chain(j, consumers) if op.name in CONTRACTIONS and len(op.outs) == 1 else None
            if not passes:
                continue
            for t, p in passes.items():
                x = self.tensors[t]
                if x.is_floating_point():
                    elems += p * x.numel()
                else:
                    nbytes += p * x.numel() * x.element_size()
            details.append({"op": op.name, "shape": list(self.tensors[op.outs[0]].shape),
                            "passes": sum(passes.values()), "tensors": len(passes)})
        return elems, nbytes, details

    def _score_chain(self, j: int, consumers: dict[int, list[int]]) -> dict[int, int] | None:
        """{tensor: reads + writes} of the chain that starts at op ``j``'s output and runs through element-wise ops
        and softmaxes (same size), or None where no SCORE_TERMINAL reads it (an ordinary activation)."""
        root = self.ops[j].outs[0]
        passes, reached, todo = {root: 1}, False, [root]  # the contraction writes it once
        while todo:
            t = todo.pop()
            size = self.tensors[t].numel()
            for c in consumers.get(t, []):
                if c <= j:
                    continue
                reader = self.ops[c]
                passes[t] += 1  # this op reads it
                reached = reached or reader.name in SCORE_TERMINALS
                if (reader.name in CONTRACTIONS or reader.sdpa_scores is not None
                        or (reader.name in SCORE_TERMINALS and reader.name not in SOFTMAXES)):
                    continue  # the scores end here (P V, an attention op, a selection / reduction)
                for o in reader.outs:  # an element-wise op or a softmax: its same-size output carries the scores
                    if o not in passes and self.tensors[o].numel() == size:
                        passes[o] = 1
                        todo.append(o)
        return passes if reached else None


def stage_count(stage, batch: int = 1) -> StageCount:
    """FLOPs, weights read, declared inputs / outputs and score intermediates of one call of ``stage`` at ``batch``
    (fake tensors, as ``stage_flops``)."""
    module = stage.module
    recorder = _Recorder({id(t): t for t in list(module.parameters()) + list(module.buffers())})
    flops = _fake_tensor_pass(stage, batch, recorder)
    io_elems = io_bytes = 0
    for name, shape in {**stage.inputs, **stage.outputs}.items():
        n = 1
        for d in shape:
            n *= batch if d == "B" else d
        dt = stage.dtype(name)
        if dt.is_floating_point:
            io_elems += n
        else:
            io_bytes += n * torch.empty((), dtype=dt).element_size()
    w_elems, w_bytes = recorder.weight_counts()
    s_elems, s_bytes, details = recorder.score_counts()
    calls: dict[str, dict] = {}  # the same intermediate made by many calls (one per attention layer): one entry
    for d in details:
        calls.setdefault(json.dumps(d, sort_keys=True), {**d, "calls": 0})["calls"] += 1
    return StageCount(stage.name, batch, flops, w_elems, w_bytes, io_elems, io_bytes,
                      s_elems, s_bytes, list(calls.values()))
