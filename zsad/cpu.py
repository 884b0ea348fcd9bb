"""The CPU this runs on: its model, instruction sets (ISA), physical cores and clock, its peak arithmetic rate per
precision, and the precision order zsad-export --precision auto tries on it.

Peak = physical cores x the operations per second one core sustains with every core busy, for the best ISA the
CPU has for that precision (one multiply-add = 2 operations, as zsad.bench.flops counts FLOPs). Where it can,
read_cpu *measures* it (zsad.cpu_probe: loops of vfmadd231ps / vdpbf16ps / vpdpbusd and AMX tile products on every
physical core at once, and the clock from a chain of dependent adds); where it cannot, it is the clock times this
table of operations per cycle per core, assuming two 512-bit FMA units per core (Intel Xeon Scalable Gold/Platinum):

- fp32: AVX-512F 64 (2 units x 16 lanes x 2), AVX2 + FMA 32, plain SSE/AVX without FMA 16;
- bf16: AMX-BF16 1024 (Intel: 4th Gen Xeon Scalable "2048 INT8 or 1024 BF16 operations per cycle" per core, the
  AMX overview and optimisation manual), AVX-512 BF16 128 (VDPBF16PS: 16 lanes x 2 products x 2, 2 units);
  without either, bf16 runs at the fp32 rate;
- int8: AMX-INT8 2048 (same Intel source), AVX-512 VNNI 256 (VPDPBUSD: 16 lanes x 4 products x 2, 2 units; Intel
  quotes 256 INT8 ops/cycle for it), AVX-VNNI 128 (256-bit), AVX2 without VNNI 64 (VPMADDUBSW + VPMADDWD pairs);
- AMD Zen 4 (AuthenticAMD, cpu family 25 with AVX-512) runs each 512-bit instruction on two 256-bit units, one
  512-bit FMA per cycle: the AVX-512 rows are halved there.

The table was wrong by up to 4x on the machines measured, which is why the probe goes first: on the 2-core AMX
Xeon VM VDPBF16PS ran at a quarter of VFMADD231PS's instruction rate (32 bf16 operations per cycle, not 128), and
its cores ran integer adds at 4.16 GHz and 7.7 AVX-512 FMAs per ns while /proc/cpuinfo said 2600 MHz
(bench/results/2026-12-06-cpu-peaks/measured-peaks.md: a plain fp32 torch.mm reached 130% of the table's "peak");
its AMX tiles ran at 90% of Intel's per-cycle figures at that clock.

The clock: measured (dependent adds on every physical core at once), else the highest of
/sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq where the kernel exposes it (the turbo maximum), else
/proc/cpuinfo "cpu MHz" (in a VM often the nominal TSC clock, below what the cores run at). A measured vector peak
includes AVX-512 down-clocking; a table peak times the integer clock does not, so it is an upper bound and an
efficiency computed from it a lower bound.

``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``) caps the instruction sets oneDNN, and with it
OpenVINO's CPU plugin and torch's oneDNN kernels, may use: e.g. ``AVX512_CORE_BF16`` on an AMX Xeon runs every
oneDNN kernel as on an AVX-512 BF16 CPU without AMX (measured: OpenVINO's fused attention 3x slower). read_cpu
leaves the flags above the cap out, so the peaks, the "% of peak" column and --precision auto's order follow the
instruction sets the libraries really use, and records the cap.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from zsad.triton_models.zsad_common.int8 import VNNI_FLAGS, cpu_flags, isa_capped, weight_bits_for

# (ISA name, the /proc/cpuinfo flags it needs, operations per cycle per core); best first within a precision
PEAK_TABLE: dict[str, list[tuple[str, tuple[str, ...], int]]] = {
    "fp32": [("AVX-512F", ("avx512f",), 64), ("AVX2+FMA", ("avx2", "fma"), 32), ("SSE/AVX", (), 16)],
    "bf16": [("AMX-BF16", ("amx_bf16", "amx_tile"), 1024), ("AVX-512 BF16", ("avx512_bf16",), 128)],
    "int8": [("AMX-INT8", ("amx_int8", "amx_tile"), 2048), ("AVX-512 VNNI", ("avx512_vnni",), 256),
             ("AVX-VNNI", ("avx_vnni",), 128), ("AVX2", ("avx2",), 64)],
}
# a row's precision -> the arithmetic its bulk (the linear layers) runs in; the int8 mixes are held to the int8 peak
ARITHMETIC = {"fp32": "fp32", "bf16": "bf16", "fp16": "bf16", "int8": "int8", "int8-bf16": "int8",
              "int8-qk-bf16": "int8"}


@dataclass
class CpuInfo:
    model: str = "unknown"
    vendor: str = "unknown"
    flags: frozenset[str] = field(default_factory=frozenset)
    physical_cores: int = 1
    mhz: float = 0.0
    mhz_source: str = "unknown"
    mhz_reported: float = 0.0  # what cpufreq / /proc/cpuinfo said, where the clock was measured
    family: int | None = None  # /proc/cpuinfo "cpu family"
    # ISA name -> operations per second per core with every core busy, measured by zsad.cpu_probe
    measured_ops: dict[str, float] = field(default_factory=dict)
    isa_cap: str = ""  # what read_cpu made of ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA where one is set (a sentence)

    def best_isa(self, precision: str) -> tuple[str, int]:
        """(ISA name, operations per cycle per core) of the best ISA this CPU has for ``precision``'s arithmetic
        (:data:`ARITHMETIC`); bf16 without a bf16 ISA falls to the fp32 rate, int8 without any to the fp32 rate."""
        arithmetic = ARITHMETIC.get(precision, "fp32")
        for name, needs, ops in PEAK_TABLE[arithmetic]:
            if all(f in self.flags for f in needs):
                return name, ops // 2 if self.avx512_half_width and name.startswith("AVX-512") else ops
        return self.best_isa("fp32")  # no bf16 / int8 ISA: that arithmetic runs at the fp32 rate (fp32 always matches)

    @property
    def avx512_half_width(self) -> bool:
        """AMD Zen 4: AVX-512 on 256-bit units (Zen 3 shares its family number but has no AVX-512)."""
        return self.vendor == "AuthenticAMD" and self.family == 25 and "avx512f" in self.flags

    def peak_tflops(self, precision: str) -> tuple[float, str]:
        """(peak TFLOP/s or TOP/s for ``precision`` on this CPU, the ISA it assumes): measured where zsad.cpu_probe
        measured that ISA, else cores x clock x the table; 0.0 with an unknown clock."""
        isa, ops = self.best_isa(precision)
        if isa in self.measured_ops:
            return self.physical_cores * self.measured_ops[isa] / 1e12, isa
        return self.physical_cores * self.mhz * 1e6 * ops / 1e12, isa

    def summary(self) -> dict:
        """What a report records about this CPU (JSON-ready)."""
        wanted = sorted({f for table in PEAK_TABLE.values() for _, needs, _ in table for f in needs})
        return {"model": self.model, "vendor": self.vendor, "physical_cores": self.physical_cores, "mhz": self.mhz,
                "mhz_source": self.mhz_source, "mhz_reported": self.mhz_reported,
                "isa_flags": [f for f in wanted if f in self.flags],
                "isa_cap": self.isa_cap,
                "peak_tflops": {p: round(self.peak_tflops(p)[0], 3) for p in PEAK_TABLE},
                "peak_isa": {p: self.best_isa(p)[0] for p in PEAK_TABLE},
                "peak_measured": {p: self.best_isa(p)[0] in self.measured_ops for p in PEAK_TABLE}}


def parse_cpuinfo(text: str, allowed_cpus: set[int] | None = None) -> CpuInfo:
    """A :class:`CpuInfo` from the text of /proc/cpuinfo. Physical cores: distinct (physical id, core id) pairs among
    the logical CPUs in ``allowed_cpus`` (all when None): two hyperthreads of one core count once."""
    info = CpuInfo()
    cores: set[tuple[str, str]] = set()
    for block in text.strip().split("\n\n"):
        kv = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in block.splitlines()) if k.strip()}
        if "processor" not in kv or (allowed_cpus is not None and int(kv["processor"]) not in allowed_cpus):
            continue
        info.model = kv.get("model name", info.model)
        info.vendor = kv.get("vendor_id", info.vendor)
        if kv.get("cpu family", "").isdigit():
            info.family = int(kv["cpu family"])
        info.flags = info.flags | frozenset(kv.get("flags", "").split())
        cores.add((kv.get("physical id", "0"), kv.get("core id", kv["processor"])))
        if "cpu MHz" in kv:
            info.mhz = max(info.mhz, float(kv["cpu MHz"]))
            info.mhz_source = "/proc/cpuinfo cpu MHz"
    info.physical_cores = max(1, len(cores))
    return info


def apply_isa_cap(info: CpuInfo, environ) -> CpuInfo:
    """``info`` with the flags above oneDNN's ISA cap left out, where ``environ`` sets ONEDNN_MAX_CPU_ISA (else
    DNNL_MAX_CPU_ISA) to a name oneDNN knows (zsad_common.int8.isa_capped); what was done goes in ``isa_cap``."""
    info.flags, note = isa_capped(info.flags, environ)
    if note:
        info.isa_cap = note
    return info


def read_cpu(measure: bool = True) -> CpuInfo:
    """This machine's CPU (the logical CPUs this process may run on) as oneDNN may use it (the ISA cap applied, see
    the module docstring). ``measure``: the clock and the vector peaks measured by zsad.cpu_probe (~0.3-0.5 s once per
    process; skipped where only the flags are wanted); where it cannot run, the clock from cpufreq's maximum where
    the kernel has it, else /proc/cpuinfo, and the peaks from the table."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text(), allowed)
    except OSError:
        return apply_isa_cap(CpuInfo(physical_cores=os.cpu_count() or 1), os.environ)
    freqs = []
    for cpu in sorted(allowed or []):
        with contextlib.suppress(OSError, ValueError):  # no cpufreq in most VMs
            freqs.append(int(Path(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq").read_text()) / 1e3)
    if freqs:
        info.mhz, info.mhz_source = max(freqs), "cpufreq cpuinfo_max_freq"
    info = apply_isa_cap(info, os.environ)
    if measure:
        apply_probe(info, probe_cpu(info.physical_cores, info.flags))
    return info


def apply_probe(info: CpuInfo, probe: dict | None) -> CpuInfo:
    """``info`` with zsad.cpu_probe's measurement (:func:`probe_cpu`; None: it could not run, ``info`` unchanged): the
    measured clock in place of the reported one, and the measured operations per second of each ISA probed."""
    if not probe:
        return info
    clock = probe.get("clock_mhz", {})
    if clock.get("add", 0) > 0:
        info.mhz_reported, reported = info.mhz, info.mhz_source
        info.mhz = clock["add"]
        info.mhz_source = (f"measured: dependent adds on {info.physical_cores} core(s) at once (dependent imuls: "
                           f"{clock.get('imul', 0):.0f} MHz; {reported}: {info.mhz_reported:.0f} MHz)")
    info.measured_ops = {isa: rate for isa, rate in probe.get("ops_per_s", {}).items() if rate > 0}
    return info


@functools.lru_cache(maxsize=8)
def probe_cpu(threads: int, flags: frozenset[str]) -> dict | None:
    """zsad.cpu_probe run in a child process (an illegal instruction or a kernel without executable memory costs
    the child, not this process): {"clock_mhz": {..}, "ops_per_s": {..}} from the lines it printed before it ended,
    however it ended; None where it cannot run here or measured nothing."""
    from zsad import cpu_probe

    if not cpu_probe.supported():
        return None
    try:
        done = subprocess.run([sys.executable, "-I", cpu_probe.__file__, str(threads), *sorted(flags)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out: dict = {"clock_mhz": {}, "ops_per_s": {}}
    for line in done.stdout.splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            kind, key, value = json.loads(line)
            out[kind][key] = max(float(value), out[kind].get(key, 0.0))  # the best of the probe's rounds
    return out if out["clock_mhz"] or out["ops_per_s"] else None


def int8_weight_bits_here() -> int:
    """The int8 weight width zsad quantises with on this machine (oneDNN's ISA cap applied): 8 where its int8 dot
    products accumulate in int32 (VNNI, AMX, or not x86), 7 on x86 without VNNI, where 8-bit weights can overflow
    VPMADDUBSW's int16. Read with zsad_common.int8.cpu_flags, the reader the served stages refuse 8-bit weights
    by, so export and serving decide on the same flags."""
    return weight_bits_for(cpu_flags())


def has_bf16(flags: frozenset[str] | set[str]) -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX-BF16); elsewhere bf16 is emulated and slow."""
    return "avx512_bf16" in flags or {"amx_bf16", "amx_tile"} <= set(flags)


def precision_preference(flags: frozenset[str] | set[str], bf16_ratio: float | None = None) -> list[tuple[str, str]]:
    """The OpenVINO precisions to try on a CPU with ``flags``, fastest first, each with the reason (zsad-export
    --precision auto tries them in order and keeps the first that passes its gate; fp32 is always last). Measured
    on the paper-profile BAG-CLIP encoder (issue 25):

    - AMX (amx_bf16, amx_int8): int8-bf16 first (int8 linear layers on AMX-INT8, attention in bf16 on AMX-BF16:
      OpenVINO's fused attention kernel does use the AMX tiles, 3x slower with oneDNN capped below AMX), then bf16,
      then int8-qk-bf16 (as fast as bf16, but int8), then int8 (its attention and the rest around it in fp32); a
      quiet 2-core AMX Xeon: int8-bf16 1.18-1.31 s, bf16 1.64-1.66 s, int8-qk-bf16 1.63 s, int8 1.94 s;
    - AVX-512 BF16 without AMX: int8-qk-bf16 (int8 linear layers and Q.K^T on VNNI, the attention's P.V and the rest
      in bf16), then int8-bf16, int8, bf16; the 2-core Zen 4 EPYC, 2026-12-07: 2.02 s, 2.16-2.21 s, 2.40-2.53 s;
    - VNNI without bf16: int8;
    - else (AVX2, or AVX-512 without VNNI) fp32 only: without VNNI OpenVINO 2026.4 runs int8 linear layers through
      oneDNN's jit_gemm (no brgemm int8 kernel below VNNI), slower than its fp32 ones; on a 2-core Zen 3 EPYC (AVX2)
      the paper-profile BAG-CLIP chain took 16.1 s in int8 against 10.4 s in fp32
      (bench/results/2026-12-07-cpu-zen3-avx2/).

    The flags say what a CPU can run, not how fast: ``bf16_ratio`` (measured here by
    zsad.export.openvino_export.bf16_matmul_ratio) above BF16_FAST means bf16 is no faster than fp32 on this
    machine, and then int8 goes first (int8 attention, the rest fp32), then int8-qk-bf16 and int8-bf16 (slower, but
    tried where int8 fails its gate), bf16 not at all. Measured on an AMX Xeon capped at
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (the stand-in for an Intel CPU with AVX-512 BF16 and no AMX): VDPBF16PS ran
    at a quarter of VFMADD231PS's instruction rate (half its FLOP rate); a bf16 linear layer took 1.5x its fp32
    time; the encoder int8 1.89-1.97 s, int8-qk-bf16 2.20 s, int8-bf16 2.66-2.80 s, fp32 4.05 s, bf16 6.15 s
    (bench/results/2026-12-06-cpu-no-amx/); on the AMD EPYC bf16 runs at twice fp32's speed."""
    order = _preference_by_flags(flags)
    if bf16_ratio is None or bf16_ratio <= BF16_FAST:
        return order
    names = [p for p, _ in order]
    slow = (f"bf16 measured {bf16_ratio:.2f}x fp32's time for a linear layer here" if math.isfinite(bf16_ratio)
            else "OpenVINO cannot compile bf16 on this CPU")
    out = []
    if "int8" in names:
        out.append(("int8", f"{slow}: int8 linear layers and attention, the rest fp32"))
    if math.isfinite(bf16_ratio):
        out += [(p, f"{slow}: {why} (slower than int8 here, tried where int8 fails its gate)")
                for p, why in (("int8-qk-bf16", "int8 linear layers and Q.K^T, the rest in bf16"),
                               ("int8-bf16", "int8 linear layers, attention in bf16")) if p in names]
    return [*out, order[-1]]


def _preference_by_flags(flags: frozenset[str] | set[str]) -> list[tuple[str, str]]:
    """precision_preference's order from the ISA flags alone."""
    amx = {"amx_bf16", "amx_int8", "amx_tile"} <= set(flags)
    bf16 = has_bf16(flags)
    vnni = bool(VNNI_FLAGS & set(flags))
    fp32 = ("fp32", "the fallback every CPU runs, gated by the fp32 parity gate")
    if amx:
        return [("int8-bf16", "AMX: int8 linear layers on AMX-INT8, attention and the rest in bf16 on AMX-BF16"),
                ("bf16", "AMX: every matmul, attention included, in bf16 on AMX-BF16"),
                ("int8-qk-bf16", "AMX: int8 linear layers and Q.K^T, the rest in bf16 (as fast as bf16 here: "
                                 "reorders and FakeQuantize around the int8 attention)"),
                ("int8", "AMX: int8 linear layers and attention, the rest in fp32"), fp32]
    if bf16:
        return [("int8-qk-bf16", "AVX-512 BF16 without AMX: int8 linear layers and Q.K^T on VNNI, the attention's "
                                 "P.V and the rest in bf16"),
                ("int8-bf16", "AVX-512 BF16 without AMX: int8 linear layers on VNNI, attention in bf16"),
                ("int8", "AVX-512 without AMX: int8 linear layers and attention on VNNI, the rest in fp32"),
                ("bf16", "AVX-512 BF16 without AMX: bf16"), fp32]
    if vnni:
        return [("int8", "VNNI without bf16: int8 linear layers and attention"), fp32]
    # without VNNI OpenVINO's int8 is slower than its fp32 (AVX2 Zen 3 EPYC, 2026-12-07: oneDNN's jit_gemm int8
    # linear layers at 29% of the int8 table peak, the paper-profile chain 16.1 s against 10.4 s fp32)
    return [fp32]


BF16_FAST = 0.8  # bf16 counts as faster than fp32 where its linear layer takes at most this share of fp32's time


# one flag set per kind of CPU precision_preference tells apart, named as --help names them
CPU_KINDS = (("AMX", frozenset({"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16"})),
             ("AVX-512 BF16 without AMX", frozenset({"avx512_bf16", "avx512_vnni"})),
             ("VNNI without bf16", frozenset({"avx2", "avx512f", "avx512_vnni"})),
             ("AVX2 without VNNI", frozenset({"avx2"})))


def preference_text() -> str:
    """--precision auto's order on each kind of CPU, for --help (from precision_preference, so it cannot drift)."""
    def tried(flags):
        return ", ".join(p for p, _ in precision_preference(flags) if p != "fp32") or "none (int8 is slower there)"

    return "; ".join(f"{kind}: {tried(flags)}" for kind, flags in CPU_KINDS) + "; then fp32"


if __name__ == "__main__":  # python -m zsad.cpu: what zsad-bench reads of this CPU, its measured peaks included
    print(json.dumps(read_cpu().summary(), indent=1))
