"""Ahead-of-time builds of every Triton kernel configuration for sm_80, sm_89 and sm_90a, on a machine without a GPU.

    python -m zsad.kernels.aot --out bench/results [--targets 80,89,90] [--jobs N] [--list]

**What is built.** Every launch the dispatchers (and the perf sweeps that ``make gpu-check`` runs on a GPU) make at
the papers' shapes. The launch parameters are not listed here: each call site in :func:`call_sites` is *run* on
the CPU with tensors of the paper's shape, once per target, while the kernel modules' launch hook
(``for_current_mode``), dispatch rule (``use_triton``) and device query (``capability``) are swapped for a recorder
(:func:`record`). The launcher then computes its grid, block sizes, warps, stages, ``BLOCK_D``/``KP``/``DOT_PREC``
constexprs and strides exactly as it would for CUDA tensors on that target, and the recorder keeps the call instead
of launching it. What this module does list is the call sites and the papers'
shapes (ViT-L/14, 518 px -> 1369 patches / 1370 tokens, 336 px -> 576 / 577; BAG-CLIP's k; SOWA's 12 x 12 windows,
8 heads; fp32 / fp16 / bf16; tests/test_kernels_aot.py checks them against the paper profile). Identical launches
(same kernel, argument specialisation, constexprs and options) are built once and list every call site that makes
them.

**How.** Triton's own argument specialisation (16-byte pointer alignment, integers divisible by 16) and its compiler
build each distinct launch for each target: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``,
TTIR -> TTGIR -> LLVM -> PTX -> cubin by the ``ptxas`` the triton wheel ships (Triton picks its newer
``ptxas-blackwell`` for sm_90a), in worker processes (:func:`compile_all`). ptxas's ``-v`` log (the one Triton's own
cubin step writes) gives registers per thread, spill stores / loads, stack frame and static shared memory; Triton's
metadata gives the dynamic shared memory it launches with and the warps per block. No GPU is touched: these are
compile-time facts only.

**Checks** (a configuration fails on any): a compile error; any register spill (spill stores or loads > 0 bytes);
shared memory per block (static + dynamic) above the target's opt-in maximum per block, which is what Triton
compares at launch (cudaDevAttrMaxSharedMemoryPerBlockOptin).

**Theoretical occupancy** (:func:`occupancy`), by NVIDIA's occupancy rules with the per-SM limits in :data:`TARGETS`:
resident blocks per SM = the least of (a) the block limit per SM, (b) max warps per SM // warps per block,
(c) registers: a warp's registers are allocated in units of 256 (regs/thread x 32 rounded up), each of the SM's 4
sub-partitions holds 65536 / 4 registers, so warps by registers = 4 x floor(16384 / regs per warp), and blocks =
that // warps per block (this also refuses a block whose registers, its warps rounded up to a multiple of 4,
exceed the 65536 per block), and (d) shared memory: (static + dynamic + 1 KB reserved per block) rounded up to 128
bytes, into the SM's largest shared-memory carveout (0 when the block asks for more than the per-block maximum,
which is that carveout less the reserved 1 KB on all three targets).
Occupancy = resident warps / max warps per SM. The driver picks the carveout, so a smaller one than the maximum
assumed here can lower (d).

Output: ``OUT/<date>-kernels-aot.{csv,md,json}`` (one row per distinct launch and target; the JSON also holds the
versions, the call sites and the :func:`fingerprint` of what was built, which ``bench/gpu_check.py`` compares to
skip on a GPU what CI already proved). Exit status 1 when any configuration fails a check.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import KERNEL_MODULES
from . import dual_attention as DA
from . import knn_graph as KG
from . import window_attention as WA
from ._common import HAS_TRITON, for_current_mode


# == targets and their per-SM limits ============================================================================
@dataclass(frozen=True)
class Arch:
    """Per-SM resource limits of one compute capability (CUDA C++ Programming Guide, "Technical Specifications per
    Compute Capability"; the Ampere / Ada / Hopper tuning guides; the occupancy calculator's allocation units)."""

    cc: int  # compute capability x 10
    gpus: str  # example parts
    max_threads_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int  # bytes: the largest shared-memory carveout of the unified L1 / shared memory
    smem_per_block: int  # bytes: the opt-in maximum per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    smem_reserved_per_block: int = 1024  # bytes the system reserves in every block's allocation (cc >= 8.0)
    smem_alloc_unit: int = 128  # bytes
    regs_per_sm: int = 65536  # 32-bit registers
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers, allocated per warp
    sub_partitions: int = 4  # processing blocks per SM, each with a quarter of the register file
    warp_size: int = 32

    @property
    def name(self) -> str:
        return f"sm_{self.cc}a" if self.cc >= 90 else f"sm_{self.cc}"

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // self.warp_size


KB = 1024
TARGETS: dict[int, Arch] = {
    80: Arch(80, "A100", max_threads_per_sm=2048, max_blocks_per_sm=32, smem_per_sm=164 * KB, smem_per_block=163 * KB),
    89: Arch(89, "L4, L40S, RTX 4090", max_threads_per_sm=1536, max_blocks_per_sm=24, smem_per_sm=100 * KB,
             smem_per_block=99 * KB),
    90: Arch(90, "H100, H200", max_threads_per_sm=2048, max_blocks_per_sm=32, smem_per_sm=228 * KB,
             smem_per_block=227 * KB),
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # resident warps / max warps per SM
    limiter: str  # the limit(s) that set blocks_per_sm


def occupancy(arch: Arch, registers: int, threads: int, smem_bytes: int) -> Occupancy:
    """Theoretical occupancy of a block of ``threads`` threads using ``registers`` per thread and ``smem_bytes`` of
    shared memory (static + dynamic, without the reserved part) on ``arch`` (the rules in the module docstring)."""
    warps = -(-threads // arch.warp_size)
    limits = {"warps": arch.max_warps_per_sm // warps, "blocks": arch.max_blocks_per_sm}
    regs_per_warp = _round_up(max(registers, 1) * arch.warp_size, arch.reg_alloc_unit)
    warps_per_partition = (arch.regs_per_sm // arch.sub_partitions) // regs_per_warp
    if registers > arch.max_regs_per_thread:
        warps_per_partition = 0
    limits["registers"] = warps_per_partition * arch.sub_partitions // warps
    smem_alloc = _round_up(smem_bytes + arch.smem_reserved_per_block, arch.smem_alloc_unit)
    limits["shared memory"] = arch.smem_per_sm // smem_alloc  # over the per-block maximum (the carveout less the
    # reserved 1 KB) this is 0 by itself
    blocks = min(limits.values())
    limiter = ", ".join(k for k, v in limits.items() if v == blocks)
    return Occupancy(blocks, blocks * warps, blocks * warps / arch.max_warps_per_sm, limiter)


def problems(row: dict, arch: Arch) -> list[str]:
    """Why one built configuration fails (empty: it passes): compile error, spills, shared memory over the limit."""
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    found = []
    spilled = row["spill_stores"] + row["spill_loads"]
    if spilled > 0:
        found.append(f"register spills: {row['spill_stores']} B of spill stores, {row['spill_loads']} B of spill loads")
    smem = row["smem_static"] + row["smem_dynamic"]
    if smem > arch.smem_per_block:
        found.append(f"shared memory {smem} B per block > {arch.name}'s maximum {arch.smem_per_block} B")
    return found


# == the papers' shapes and the call sites ======================================================================
# ViT-L/14 (every method's backbone): width 1024, 16 heads x 64; patch 14
VIT_WIDTH, VIT_HEADS = 1024, 16
IMAGE_SIZES = (518, 336)  # AnomalyCLIP / BAG-CLIP / AF-CLIP / Bayes-PFL at 518 px; SOWA at 336 px
PATCH = 14
KNN_K = (4, 8, 16, 24)  # BAG-CLIP's k: 8 in the paper profile; 4..24 its sweep (knn_graph.PERF_CASES)
KNN_RESOLUTION_BITS = (0, 14)  # raw fp32 similarities (the function default) and the paper profile's 2^-14 steps
SOWA_WINDOW, SOWA_HEADS, SOWA_IMAGE_SIZE = 12, 8, 336
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Site:
    """One call into a kernel module, as the model (or the perf sweep) makes it at a paper shape."""

    call: str  # e.g. "knn_graph.dispatch_select"
    shape: str  # e.g. "N=1369 D=1024 k=8 r=14"
    run: Callable[[], object] = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.call}({self.shape})"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")


def _knn_sites() -> Iterator[Site]:
    """BAG-CLIP's graph over the fused patch features [B, N, 1024]: the selection alone (the model's path), the
    normalisation from given neighbours (the model's path; k and r reach only its torch part, the edge weights, so
    the paper's k = 8, r = 14 stand for all), and the whole graph (``dispatch``)."""
    for size in IMAGE_SIZES:
        n = (size // PATCH) ** 2
        x = torch.zeros(1, n, VIT_WIDTH)  # the launchers cast to fp32 themselves: one dtype covers all
        index = (torch.arange(n).view(1, n, 1) + torch.arange(1, 9).view(1, 1, 8)) % n
        for ew in KG.EDGE_WEIGHTS:
            for sym in KG.SYMMETRIZE:
                yield Site("knn_graph.dispatch_graph_from_index", f"N={n} D={VIT_WIDTH} k=8 r=14 {ew} {sym}",
                           partial(KG.dispatch_graph_from_index, x, index, ew, sym, 14))
        for k in KNN_K:
            for r in KNN_RESOLUTION_BITS:
                shape = f"N={n} D={VIT_WIDTH} k={k} r={r}"
                yield Site("knn_graph.dispatch_select", shape, partial(KG.dispatch_select, x, k, r))
                for ew in KG.EDGE_WEIGHTS:
                    for sym in KG.SYMMETRIZE:
                        yield Site("knn_graph.dispatch", f"{shape} {ew} {sym}", partial(KG.dispatch, x, k, ew, sym, r))


def _window_sites() -> Iterator[Site]:
    """SOWA's window attention (values [B, 576, 1024], 8 heads of 128, 12 x 12 windows): ``dispatch`` in each dtype,
    and every launch configuration its perf sweep tries (``PERF_CASES``, each with its precision's ``PERF_CONFIGS``)."""
    def operands(grid: int, channels: int, heads: int, window: int, dtype: torch.dtype):
        v = torch.zeros(1, grid * grid, channels, dtype=dtype)
        return v, torch.ones(heads), torch.zeros(heads, window * window, window * window)

    grid = SOWA_IMAGE_SIZE // PATCH
    for dtype in DTYPES:
        v, scale, bias = operands(grid, VIT_WIDTH, SOWA_HEADS, SOWA_WINDOW, dtype)
        yield Site("window_attention.dispatch", f"grid={grid} C={VIT_WIDTH} heads={SOWA_HEADS} window={SOWA_WINDOW} "
                   f"{_dt(dtype)}", partial(WA.dispatch, v, SOWA_HEADS, scale, bias, SOWA_WINDOW, grid))
    shapes = {(c["grid"], c["channels"], c["heads"], c["window"], c["dtype"]) for c in WA.PERF_CASES}
    for g, c, h, w, dt in sorted(shapes):
        v, scale, bias = operands(g, c, h, w, getattr(torch, dt))
        for bm, bn, nw, ns in WA.PERF_CONFIGS[WA.precision(v.dtype)]:
            yield Site("window_attention.perf_sweep", f"grid={g} C={c} heads={h} window={w} {_dt(v.dtype)} "
                       f"config={bm}x{bn}w{nw}s{ns}",
                       partial(WA.window_vv_attention_triton, v, h, scale, bias, w, block_m=bm, block_n=bn,
                               num_warps=nw, num_stages=ns))


def _qkv(tokens: int, heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v [1, heads, L, hd] as zsad.modules.attention makes them: head-split views of one packed projection."""
    qkv = torch.zeros(1, tokens, 3 * heads * head_dim, dtype=dtype)
    return tuple(t.reshape(1, tokens, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


def _dual_sites() -> Iterator[Site]:
    """The backbone's attention (ViT-L/14: 16 heads x 64; 1370 / 577 tokens): ``dispatch`` (both streams) and
    ``vv_dispatch`` in each dtype, and every configuration the perf sweep tries on ``PERF_CASES``."""
    hd = VIT_WIDTH // VIT_HEADS
    for size in IMAGE_SIZES:
        n = (size // PATCH) ** 2 + 1
        for dtype in DTYPES:
            q, k, v = _qkv(n, VIT_HEADS, hd, dtype)
            shape = f"L={n} heads={VIT_HEADS} hd={hd} {_dt(dtype)}"
            yield Site("dual_attention.dispatch", shape, partial(DA.dispatch, q, k, v))
            yield Site("dual_attention.vv_dispatch", shape, partial(DA.vv_dispatch, v))
    shapes = {(c["tokens"], c["heads"], c["head_dim"], c["dtype"]) for c in DA.PERF_CASES}
    for n, h, d, dt in sorted(shapes):
        q, k, v = _qkv(n, h, d, getattr(torch, dt))
        for bm, bn, nw, ns in DA.PERF_CONFIGS[DA.precision(v.dtype)]:
            yield Site("dual_attention.perf_sweep", f"L={n} heads={h} hd={d} {dt.replace('float', 'fp')} "
                       f"config={bm}x{bn}w{nw}s{ns}",
                       partial(DA.dual_attention_triton, q, k, v, block_m=bm, block_n=bn, num_warps=nw,
                               num_stages=ns))


def call_sites() -> list[Site]:
    """Every call into the kernel modules at the papers' shapes (see the module docstring)."""
    return [*_knn_sites(), *_window_sites(), *_dual_sites()]


# == recording the launches =====================================================================================
@dataclass
class Launch:
    """One kernel launch as a launcher made it (arguments kept, nothing run)."""

    kernel: Any  # the module's @triton.jit function
    args: tuple
    kwargs: dict  # constexprs and launch options (num_warps, num_stages), as passed
    sites: list[str] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # the targets whose launchers chose this launch

    @property
    def module(self) -> str:
        return _fn(self.kernel).__module__.rsplit(".", 1)[-1]

    @property
    def name(self) -> str:
        return _fn(self.kernel).__name__

    def spec(self) -> tuple:
        """What the compiled code depends on besides the source: each argument's type and the properties Triton
        specialises on (pointer alignment to 16 bytes, integers divisible by 16 or equal to 1), constexprs, options."""
        out: list[Any] = []
        for a in self.args:
            if isinstance(a, torch.Tensor):
                out.append(("ptr", _dt(a.dtype), (a.data_ptr() % 16) == 0))
            elif isinstance(a, bool):
                out.append(("bool", a))
            elif isinstance(a, int):
                out.append(("int", a % 16 == 0, a == 1))
            elif isinstance(a, float):
                out.append(("float",))
            else:
                out.append(("other", repr(a)))
        return (self.module, self.name, tuple(out), tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())))

    def config(self) -> str:
        """The tensors' dtypes, then the constexprs and launch options as the launcher passed them."""
        dtypes = dict.fromkeys(_dt(a.dtype) for a in self.args if isinstance(a, torch.Tensor))
        return " ".join([",".join(dtypes), *(f"{k}={_short(v)}" for k, v in self.kwargs.items())])

    def divisible(self) -> str:
        """The integer arguments Triton treats as divisible by 16 (why two shapes can compile differently)."""
        names = list(inspect.signature(_fn(self.kernel)).parameters)
        return ",".join(n for n, a in zip(names, self.args, strict=False)
                        if isinstance(a, int) and not isinstance(a, bool) and a % 16 == 0) or "-"


def _fn(kernel: Any) -> Callable:
    return getattr(kernel, "fn", kernel)


def _short(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


HOOKS = ("for_current_mode", "use_triton", "capability")  # what the launchers look up in their module at a call


@contextlib.contextmanager
def record(cc: int | None = None) -> Iterator[list[Launch]]:
    """Inside: the kernel modules' dispatch rule says Triton for any tensor, the device looks like compute capability
    ``cc`` to the launchers (they choose their blocks with it), and every launch is recorded (into the yielded list)
    instead of run. Not thread-safe: it swaps module attributes (for this CLI and the tests)."""
    launches: list[Launch] = []
    modules = [importlib.import_module(f"{__package__}.{m}") for m in KERNEL_MODULES]

    def recorder(kernel: Any) -> Any:
        class _Grid:
            def __getitem__(self, grid: Any) -> Callable[..., None]:
                return lambda *args, **kwargs: launches.append(Launch(kernel, args, kwargs))

        return _Grid()

    stand_ins = {"for_current_mode": recorder, "use_triton": lambda *tensors: True, "capability": lambda device: cc}
    saved = [(m, {h: getattr(m, h) for h in HOOKS if hasattr(m, h)}) for m in modules]
    try:
        for m, hooks in saved:
            for h in hooks:
                setattr(m, h, stand_ins[h])
        yield launches
    finally:
        for m, hooks in saved:
            for h, f in hooks.items():
                setattr(m, h, f)


def collect(sites: Sequence[Site], targets: Sequence[int] = tuple(TARGETS)) -> list[Launch]:
    """The distinct launches ``sites`` make on each target, each with the sites and targets that make it, in
    first-seen order."""
    unique: dict[tuple, Launch] = {}
    for cc in targets:
        for site in sites:
            with record(cc) as launches, torch.no_grad():
                site.run()
            if not launches:
                raise RuntimeError(f"{site.label} launched no kernel: the recorder no longer sees this launcher")
            for launch in launches:
                kept = unique.setdefault(launch.spec(), launch)
                if site.label not in kept.sites:
                    kept.sites.append(site.label)
                if cc not in kept.targets:
                    kept.targets.append(cc)
    return list(unique.values())


# == fingerprint: what a build proves ===========================================================================
def _jit_sources(kernel: Any, seen: set[str] | None = None) -> list[str]:
    """Source text of a @triton.jit function and of the @triton.jit helpers it calls (recursively)."""
    fn = _fn(kernel)
    seen = set() if seen is None else seen
    if fn.__qualname__ in seen:
        return []
    seen.add(fn.__qualname__)
    out = [inspect.getsource(fn)]
    for name in fn.__code__.co_names:
        obj = fn.__globals__.get(name)
        if obj is not None and hasattr(obj, "fn") and callable(obj.fn):
            out += _jit_sources(obj, seen)
    return out


def fingerprint(launches: Sequence[Launch]) -> str:
    """sha256 over what the compiled code depends on: each launch's kernel source (helpers included), argument
    specialisation, constexprs and options, and its targets. Independent of the triton version and of file layout
    (a comment or docstring outside the kernels does not change it)."""
    h = hashlib.sha256()
    for line in sorted(repr((launch.spec(), sorted(launch.targets))) + "\n" + "".join(_jit_sources(launch.kernel))
                       for launch in launches):
        h.update(line.encode())
    return h.hexdigest()


# == building one launch for one target =========================================================================
def _compiled_variant(kernel: Any) -> Any:
    """The @triton.jit (compiled, not interpreted) form of a kernel module's function, whatever TRITON_INTERPRET is."""
    with _env(TRITON_INTERPRET="0"):
        return for_current_mode(kernel)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without triton 3.9's notice that its fp-fusion default will change (a launch on a GPU gets the same default
    as these builds: the options record it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        yield


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compile_inputs(launch: Launch, cc: int) -> dict:
    """What ``triton.compile`` takes for this launch on target ``cc``, by Triton's own binder (the same code a launch
    on a GPU runs): signature, constexprs, specialisation attributes, options. Plain data (it crosses processes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:  # the binder a launch runs (triton >= 3.3); its specialisation rules are Triton's, not repeated here
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        raise RuntimeError(f"triton {_triton_version()} has no runtime.jit.create_function_from_signature: the "
                           "ahead-of-time builder follows triton 3.3-3.9's launch path") from e
    jit = _compiled_variant(launch.kernel)
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    with _quiet():
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return {"module": launch.module, "name": launch.name, "cc": cc, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "options": dict(options.__dict__)}


_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    """Registers, static shared memory, stack frame and spills of the (single) entry function in a ``ptxas -v``
    log. Raises ValueError when the log has no resource line."""
    regs = _REGS.search(log)
    frame = _FRAME.search(log)
    if not regs or not frame:
        raise ValueError(f"no resource usage in the ptxas log: {log.strip()[:300]!r}")
    used_line = log[regs.start():].splitlines()[0]
    smem = _SMEM.search(used_line)
    return {"registers": int(regs.group(1)), "smem_static": int(smem.group(1)) if smem else 0,
            "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}


def ptxas_command(ptx_path: str, cc: int, options: dict) -> list[str]:
    """The ptxas command Triton's cubin step runs for ``cc`` (its binary, its flags), with ``-v`` and no output."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    line_info = ["-lineinfo", "-suppress-debug-info"] if knobs.compilation.disable_line_info else ["-lineinfo"]
    fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
    extra = options["ptx_options"].split(" ") if options.get("ptx_options") else []
    return [get_ptxas(cc).path, *line_info, *fmad, "-v", "--regAllocOptLevel=2", *extra,
            f"--gpu-name={sm_arch_from_capability(cc)}", ptx_path, "-o", os.devnull]


def build_one(inputs: dict) -> dict:
    """Compile one launch for one target and read its resources. Never raises: a failure is an ``error`` field.
    With ``inputs["keep_asm"]`` the PTX and cubin come back too (for checks of the parsing). Runs in the workers of
    ``compile_all`` (a process whose triton was imported under TRITON_INTERPRET=1 cannot compile)."""
    out: dict[str, Any] = {"error": None}
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        module = importlib.import_module(f"{__package__}.{inputs['module']}")
        jit = _compiled_variant(getattr(module, inputs["name"]))
        src = ASTSource(jit, inputs["signature"], inputs["constexprs"], inputs["attrs"])
        log = io.StringIO()
        # a fresh compile every time, with Triton's own ptxas -v log printed (captured here)
        with _env(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"), contextlib.redirect_stdout(log), _quiet():
            compiled = triton.compile(src, target=GPUTarget("cuda", inputs["cc"], 32), options=inputs["options"])
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        try:
            usage, out["ptxas_log"] = parse_ptxas(log.getvalue()), "triton"
        except ValueError:  # a triton without the log knob: run its ptxas on its PTX with its flags ourselves
            usage = parse_ptxas(run_ptxas(compiled.asm["ptx"], inputs["cc"], inputs["options"]))
            out["ptxas_log"] = "rerun"
        md = compiled.metadata
        out.update(usage, smem_dynamic=int(md.shared), num_warps=int(md.num_warps), num_stages=int(md.num_stages),
                   ptx_bytes=len(compiled.asm["ptx"]), cubin_bytes=len(compiled.asm["cubin"]),
                   fp_fusion=bool(md.enable_fp_fusion))
        if inputs.get("keep_asm"):
            out.update(ptx=compiled.asm["ptx"], cubin=compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - a compile error is a result row (and fails the check)
        first = (str(e).strip().splitlines() or [""])[0]
        out.update(error=f"{type(e).__name__}: {first[:300]}", compile_s=round(time.perf_counter() - t0, 2))
    return out


def run_ptxas(ptx: str, cc: int, options: dict) -> str:
    """``ptxas -v`` on ``ptx`` for ``cc`` as Triton runs it; returns its log (stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        r = subprocess.run(ptxas_command(path, cc, options), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed ({r.returncode}): {r.stderr.strip()[:300]}")
    return r.stderr + r.stdout


# == the whole build =============================================================================================
def compile_all(inputs: Sequence[dict], jobs: int = 1,
                done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """``build_one`` for each of ``inputs`` in ``jobs`` fresh processes (results in input order; ``done(i, result)``
    as each finishes). Always in other processes: triton decorates its own library (tl.sum, tl.max, ...) as
    interpreted functions when it is imported under TRITON_INTERPRET=1, as the interpreter tests do, and nothing
    can be compiled in such a process; the workers start without that variable and with a throwaway cache."""
    import multiprocessing

    results: list[dict] = [{} for _ in inputs]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of torch's thread pools either
    with tempfile.TemporaryDirectory(prefix="zsad-aot-cache-") as cache, \
            _env(TRITON_INTERPRET=None, TRITON_CACHE_DIR=cache), \
            ProcessPoolExecutor(max(1, jobs), mp_context=ctx) as pool:  # workers inherit this environment
        futures = {pool.submit(build_one, inp): i for i, inp in enumerate(inputs)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if done:
                done(i, results[i])
    return results


def build(launches: Sequence[Launch], jobs: int = 1, progress: Callable[[str], None] | None = None) -> list[dict]:
    """One row per launch and each of its targets: resources, checks, occupancy (compiled in ``jobs`` processes)."""
    pairs = [(launch, cc) for launch in launches for cc in sorted(launch.targets)]
    inputs = [compile_inputs(launch, cc) for launch, cc in pairs]
    finished = []

    def report(i: int, res: dict) -> None:
        finished.append(i)
        if progress:
            inp = inputs[i]
            progress(f"[{len(finished)}/{len(inputs)}] {inp['module']}.{inp['name']} sm_{inp['cc']}: "
                     f"{res.get('error') or str(res.get('registers')) + ' registers'} ({res['compile_s']} s)")

    results = compile_all(inputs, jobs, report)
    return [make_row(launch, TARGETS[cc], res) for (launch, cc), res in zip(pairs, results, strict=True)]


def make_row(launch: Launch, arch: Arch, res: dict) -> dict:
    row: dict[str, Any] = {"kernel": f"{launch.module}.{launch.name}", "config": launch.config(),
                           "divisible_by_16": launch.divisible(), "target": arch.name, **res}
    found = problems(row, arch)
    if not row.get("error"):
        per_block = row["smem_static"] + row["smem_dynamic"]
        occ = occupancy(arch, row["registers"], row["num_warps"] * arch.warp_size, per_block)
        row.update(smem_per_block=per_block, smem_limit=arch.smem_per_block, threads=row["num_warps"] * arch.warp_size,
                   blocks_per_sm=occ.blocks_per_sm, warps_per_sm=occ.warps_per_sm,
                   occupancy=round(occ.fraction, 4), limiter=occ.limiter)
    row["status"] = "fail" if found else "ok"
    row["problems"] = "; ".join(found)
    row["sites"] = " | ".join(launch.sites)
    return row


# == writing the table ===========================================================================================
COLUMNS = ["kernel", "config", "divisible_by_16", "target", "status", "registers", "spill_stores", "spill_loads",
           "stack", "smem_static", "smem_dynamic", "smem_per_block", "smem_limit", "threads", "blocks_per_sm",
           "warps_per_sm", "occupancy", "limiter", "problems", "num_stages", "compile_s", "ptx_bytes", "cubin_bytes",
           "ptxas_log", "error", "sites"]


def _triton_version() -> str:
    import triton

    return str(triton.__version__)


def versions(targets: Sequence[int]) -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    out = {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    for cc in targets:
        tool = get_ptxas(cc)
        out[f"ptxas_{TARGETS[cc].name}"] = f"{Path(tool.path).name} {tool.version}"
    return out


def write_tables(rows: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{meta['date']}-kernels-aot"
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".json")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths[1].write_text(markdown(rows, meta))
    paths[2].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return paths


def summary(rows: list[dict]) -> dict:
    failed = [r for r in rows if r["status"] != "ok"]
    return {"rows": len(rows), "launches": len({(r["kernel"], r["config"], r["divisible_by_16"]) for r in rows}),
            "targets": sorted({r["target"] for r in rows}), "failed": len(failed),
            "spilling": sum(1 for r in rows if r.get("spill_stores") or r.get("spill_loads")),
            "compile_errors": sum(1 for r in rows if r.get("error")),
            "max_registers": max((r.get("registers") or 0 for r in rows), default=0),
            "max_smem_per_block": max((r.get("smem_per_block") or 0 for r in rows), default=0)}


def markdown(rows: list[dict], meta: dict) -> str:
    s = meta["summary"]
    v = meta["versions"]
    lines = [f"# Triton kernels built ahead of time ({meta['date']})", "",
             f"`{meta['command']}` on {meta['host']}; no GPU: compile-time facts only (registers, spills and stack "
             "from ptxas -v, shared memory from Triton's metadata + ptxas; occupancy is theoretical).", "",
             f"- triton {v['triton']}, torch {v['torch']}, Python {v['python']}; "
             + "; ".join(f"{k.replace('ptxas_', '')}: {val}" for k, val in v.items() if k.startswith("ptxas_")),
             f"- {s['launches']} distinct launches from {meta['sites']} call sites, {s['rows']} builds for "
             f"{', '.join(s['targets'])} (each launch for the targets whose launcher chooses it); "
             f"**{s['failed']} failed** ({s['compile_errors']} compile errors, "
             f"{s['spilling']} spilling); most registers {s['max_registers']}, most shared memory per block "
             f"{s['max_smem_per_block']} B; built in {meta['wall_s']} s wall, {meta['build_cpu_s']} CPU-s, with "
             f"{meta['jobs']} process(es)",
             f"- fingerprint `{meta['fingerprint'][:16]}` (kernel sources, argument specialisation, constexprs, "
             "options, targets)", "",
             "Fails on: a compile error, any spill, shared memory per block above the target's maximum "
             "(" + ", ".join(f"{a.name} {a.smem_per_block // KB} KB" for a in TARGETS.values()) + "). "
             "Occupancy: resident warps / max warps per SM by NVIDIA's rules (kernels/aot.py), the largest "
             "shared-memory carveout assumed; `limiter` names the resource that sets it.", "",
             "| kernel | config | ÷16 ints | target | regs | spill st/ld B | stack B | smem B/block | "
             "occupancy (blocks, warps) | limiter | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['config']} | {r['divisible_by_16']} | {r['target']} | - | - | - | - | "
                         f"- | - | **fail**: {r['problems'][:120]} |")
            continue
        status = "ok" if r["status"] == "ok" else f"**fail**: {r['problems']}"
        lines.append(f"| {r['kernel']} | {r['config']} | {r['divisible_by_16']} | {r['target']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['smem_per_block']} | "
                     f"{100 * r['occupancy']:.1f}% ({r['blocks_per_sm']}, {r['warps_per_sm']}) | {r['limiter']} | "
                     f"{status} |")
    lines += ["", "## Call sites per launch", "", "| kernel | config | ÷16 ints | call sites |", "|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["kernel"], r["config"], r["divisible_by_16"])
        if key not in seen:
            seen.add(key)
            sites = r["sites"].split(" | ")
            more = f"; ... ({len(sites)} call sites, all in the CSV)" if len(sites) > 3 else ""
            shown = "; ".join(sites[:3]) + more
            lines.append(f"| {r['kernel']} | {r['config']} | {r['divisible_by_16']} | {shown} |")
    return "\n".join(lines) + "\n"


def run(out_dir: Path | None, targets: Sequence[int] = tuple(TARGETS), jobs: int = 1,
        sites: Sequence[Site] | None = None, command: str = "", progress: Callable[[str], None] | None = None
        ) -> tuple[list[dict], dict]:
    """Record, build, check; write the tables to ``out_dir`` (when given). Returns (rows, meta)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed (pip install 'zsad[kernels]')")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown target(s) {sorted(unknown)}; known: {sorted(TARGETS)}")
    t0 = time.perf_counter()
    sites = call_sites() if sites is None else sites
    launches = collect(sites, targets)
    cpu0 = _cpu_s()
    rows = build(launches, jobs, progress)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": command or "python -m zsad.kernels.aot",
            "host": _host(), "jobs": jobs, "wall_s": round(time.perf_counter() - t0, 1),
            "build_cpu_s": round(_cpu_s() - cpu0, 1), "sites": len(sites), "fingerprint": fingerprint(launches),
            "versions": versions(targets), "summary": summary(rows),
            "targets": {a.name: asdict(a) for cc, a in TARGETS.items() if cc in targets}}
    if out_dir is not None:
        write_tables(rows, meta, Path(out_dir))
    return rows, meta


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the compile workers and their ptxas runs): a measure
    of the build's cost that does not depend on what else the machine runs."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _host() -> str:
    cpu = "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores"


def newest_table(results_dir: Path) -> Path | None:
    """The newest ``*-kernels-aot.json`` under ``results_dir`` (by its dated name), or None."""
    found = sorted(Path(results_dir).glob("*-kernels-aot.json"))
    return found[-1] if found else None


def proved(results_dir: Path, targets: Sequence[int] = tuple(TARGETS),
           same_triton: bool = False) -> tuple[bool, str]:
    """Whether the newest table under ``results_dir`` covers exactly what would be built now (same fingerprint) and
    passed everywhere; with the reason in words. Records the launches (a few seconds), compiles nothing.
    ``same_triton``: the table must also come from the installed triton (the fingerprint leaves the compiler out)."""
    path = newest_table(results_dir)
    if path is None:
        return False, f"no *-kernels-aot.json under {results_dir}"
    meta = json.loads(path.read_text())["meta"]
    now = fingerprint(collect(call_sites(), targets))
    if meta["fingerprint"] != now:
        return False, f"{path.name} was built from other kernel sources or configurations (fingerprint differs)"
    if same_triton and meta["versions"]["triton"] != _triton_version():
        return False, f"{path.name} was built with triton {meta['versions']['triton']}, this is {_triton_version()}"
    s = meta["summary"]
    if s["failed"]:
        return False, f"{path.name} records {s['failed']} failing configuration(s)"
    return True, (f"{path.name}: {s['launches']} launches for {', '.join(s['targets'])} built ahead of time with "
                  f"triton {meta['versions']['triton']}, no compile error, no spill, shared memory within limits; "
                  "kernel sources and configurations unchanged since")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write <date>-kernels-aot.{csv,md,json} here")
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities x10 [80,89,90]")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes [all cores]")
    p.add_argument("--list", action="store_true", help="print the distinct launches and their call sites; no build")
    a = p.parse_args(argv)
    targets = [int(t) for t in a.targets.split(",") if t]
    if a.list:
        launches = collect(call_sites(), targets)
        for la in launches:
            print(f"{la.module}.{la.name} {la.config()} [÷16: {la.divisible()}] "
                  f"[{','.join(TARGETS[cc].name for cc in la.targets)}] <- {'; '.join(la.sites)}")
        print(f"{len(launches)} distinct launches; fingerprint {fingerprint(launches)}")
        return 0
    if a.out is None:
        p.error("--out is required (or --list)")
    rows, meta = run(a.out, targets, max(1, a.jobs), command="python -m zsad.kernels.aot " + " ".join(argv or
                                                                                              sys.argv[1:]),
                     progress=lambda s: print(s, flush=True))
    s = meta["summary"]
    for r in rows:
        if r["status"] != "ok":
            print(f"FAIL {r['kernel']} [{r['config']}] {r['target']}: {r['problems']}")
    print(f"{s['launches']} launches, {s['rows']} builds for {', '.join(s['targets'])} in {meta['wall_s']} s: "
          f"{s['failed']} failed; tables in {a.out}")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
