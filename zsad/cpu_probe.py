"""Measure this CPU's clock and its arithmetic peak per instruction set, by running loops of machine code.

The peaks in zsad.cpu were a vendor table (operations per cycle per core) times the clock the kernel reports, and
both can be wrong on the machines users have: a VM's /proc/cpuinfo gives the nominal TSC clock (2600 MHz on the
2-core AMX Xeon VM, whose cores run their integer adds at ~4.0 GHz), AMD Zen 4 runs AVX-512 on 256-bit units (half
Intel's operations per cycle), and VDPBF16PS ran at a quarter of the FMA instruction rate on that Xeon's core
(half the fp32 FLOP rate, not Intel's nominal twice). So the peaks are measured where this can be done:

- **clock**: a chain of dependent ``add rax, rsi`` (one cycle each on every x86-64 core) timed on each physical core
  at once; ``imul rax, rsi`` (three cycles) measures it a second, independent way (the tests hold them together);
- **vector peaks**: 12 independent accumulators per loop (more than latency x ports on any core) of
  ``vfmadd231ps`` (fp32), ``vdpbf16ps`` (bf16 pairs) and ``vpdpbusd`` (u8 x s8 quads), 512-bit (EVEX) or 256-bit
  (VEX: AVX2 FMA, AVX-VNNI), on zeroed registers (no denormal assists), on every physical core at once: the
  operations per second each core sustains with all of them busy, AVX-512 down-clocking included;
- **AMX**: four independent tile products per iteration (``tdpbf16ps`` / ``tdpbssd``, tiles of 16 rows x 64
  bytes), after asking Linux for tile data (arch_prctl ARCH_REQ_XCOMP_PERM); measured last;
- **each key in rounds** until its two best rounds agree within 3% (:func:`rounds_until_agreed`): a shared VM's
  cores halve their vector rate for spells of up to a second, and the reader keeps each key's best.

Only instructions the CPU's /proc/cpuinfo flags list are run, and the loops run in a child process
(``python zsad/cpu_probe.py``, stdlib only), so an illegal instruction, a kernel that forbids executable memory, or a
non-x86 machine costs a fallback to the table, never the caller; each measurement is printed as it is made, so a
crash keeps what came before it.

The instruction bytes are encoded here from their fields (Intel SDM vol. 2, 2.3 VEX and 2.7 EVEX; AMX in the ISA
extensions reference); the tests check them against the GNU assembler where one is installed.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

# ISA name (zsad.cpu.PEAK_TABLE's) -> (the /proc/cpuinfo flags it needs, instruction, vector bits, operations per
# instruction: lanes of 32 bits x products per lane x 2 for the multiply-add)
PROBES: dict[str, tuple[tuple[str, ...], str, int, int]] = {
    "AVX-512F": (("avx512f",), "vfmadd231ps", 512, 16 * 1 * 2),
    "AVX2+FMA": (("avx2", "fma"), "vfmadd231ps", 256, 8 * 1 * 2),
    "AVX-512 BF16": (("avx512f", "avx512_bf16"), "vdpbf16ps", 512, 16 * 2 * 2),
    "AVX-512 VNNI": (("avx512f", "avx512_vnni"), "vpdpbusd", 512, 16 * 4 * 2),
    "AVX-VNNI": (("avx2", "avx_vnni"), "vpdpbusd", 256, 8 * 4 * 2),
}
# instruction -> (SIMD prefix field pp: 1 = 66, 2 = F3; opcode byte), all in the 0F38 opcode map, W0
OPCODES = {"vfmadd231ps": (1, 0xB8), "vdpbf16ps": (2, 0x52), "vpdpbusd": (1, 0x50)}
ACCUMULATORS = 12  # registers 0-11 accumulate, 14 and 15 are the (zero) sources
# AMX ISA -> (flags, VEX pp (2 = F3: tdpbf16ps; 3 = F2: tdpbssd), opcode, operations per tile product: 16 x 16
# accumulators, each summing K products (bf16: 32 pairs of a 64-byte row; int8: 64), 2 per multiply-add)
AMX_PROBES: dict[str, tuple[tuple[str, ...], int, int, int]] = {
    "AMX-BF16": (("amx_bf16", "amx_tile"), 2, 0x5C, 16 * 16 * 32 * 2),
    "AMX-INT8": (("amx_int8", "amx_tile"), 3, 0x5E, 16 * 16 * 64 * 2),
}
AMX_PRODUCTS = 4  # per iteration of tile_loop
CHAIN_UNROLL = 16
CHAINS = {"add": (bytes.fromhex("4801f0"), 1), "imul": (bytes.fromhex("480fafc6"), 3)}  # rax op= rsi; cycles
VZEROALL, VZEROUPPER, RET = bytes.fromhex("c5fc77"), bytes.fromhex("c5f877"), b"\xc3"
MOV_RCX_RDI, DEC_RCX, DEC_RDI, XOR_EAX = (bytes.fromhex(h) for h in ("4889f9", "48ffc9", "48ffcf", "31c0"))
LDTILECFG_RSI, TILERELEASE = bytes.fromhex("c4e2784906"), bytes.fromhex("c4e27849c0")


def vex(pp: int, opcode: int, reg: int, vvvv: int, rm: int, wide: int) -> bytes:
    """Three-byte VEX, opcode map 0F38, W0, register operands 0-15: ModRM.reg, VEX.vvvv, ModRM.rm; ``wide`` is L
    (1: 256-bit)."""
    # C4; R X B (inverted) m-mmmm (2 = 0F38); W vvvv (inverted) L pp; opcode; ModRM 11 reg rm
    return bytes([0xC4, (1 - (reg >> 3)) << 7 | 1 << 6 | (1 - (rm >> 3)) << 5 | 0b00010,
                  (~vvvv & 0xF) << 3 | wide << 2 | pp, opcode, 0xC0 | (reg & 7) << 3 | (rm & 7)])


def encode(instruction: str, bits: int, dst: int, src1: int, src2: int) -> bytes:
    """``instruction dst, src1, src2`` on vector registers 0-15: EVEX for 512 bits, three-byte VEX for 256."""
    pp, opcode = OPCODES[instruction]
    if bits == 256:
        return vex(pp, opcode, dst, src1, src2, 1)
    r, b = (dst >> 3) & 1, (src2 >> 3) & 1
    # P0: R X B R' (inverted) 0 0 mm (2 = 0F38); P1: W vvvv (inverted) 1 pp; P2: z L'L b V' (inverted) aaa
    p0 = (1 - r) << 7 | 1 << 6 | (1 - b) << 5 | 1 << 4 | 0b10
    p1 = (~src1 & 0xF) << 3 | 1 << 2 | pp
    p2 = 0b10 << 5 | 1 << 3
    return bytes([0x62, p0, p1, p2, opcode, 0xC0 | (dst & 7) << 3 | (src2 & 7)])


def tile_loop(isa: str) -> bytes:
    """``long f(long n, const char *tile_config)``: load the config (:func:`tile_config`), zero tiles 0-7, then n
    iterations of four independent AMX products (accumulators tmm0-3, sources tmm4 / tmm7 x tmm5 / tmm6)."""
    _, pp, opcode, _ = AMX_PROBES[isa]
    body = b"".join(vex(pp, opcode, acc, b, a, 0) for acc, a, b in ((0, 4, 5), (1, 4, 6), (2, 7, 5), (3, 7, 6)))
    zero = b"".join(vex(3, 0x49, t, 0, 0, 0) for t in range(8))  # tilezero tmm<t>
    return LDTILECFG_RSI + zero + MOV_RCX_RDI + _loop(body + DEC_RCX) + TILERELEASE + RET


def tile_config() -> bytes:
    """The 64-byte AMX tile configuration: palette 1, tiles 0-7 of 16 rows x 64 bytes (bf16: 16 x 32, int8:
    16 x 64, fp32 / int32 accumulators 16 x 16)."""
    colsb = b"".join((64 if t < 8 else 0).to_bytes(2, "little") for t in range(16))
    rows = bytes(16 if t < 8 else 0 for t in range(16))
    return bytes([1, 0]) + bytes(14) + colsb + rows


def request_amx() -> bool:
    """Linux gives a process AMX tile data only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA); without it
    the first tile instruction is an illegal instruction."""
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64
    except (OSError, AttributeError):
        return False


def vector_loop(instruction: str, bits: int) -> bytes:
    """``long f(long n)``: n iterations of ACCUMULATORS independent ``instruction``s on zeroed registers."""
    body = b"".join(encode(instruction, bits, i, 14, 15) for i in range(ACCUMULATORS)) + DEC_RCX
    return VZEROALL + MOV_RCX_RDI + _loop(body) + VZEROUPPER + RET


def chain_loop(op: str) -> bytes:
    """``long f(long n, long x)``: n iterations of CHAIN_UNROLL dependent ``rax op= x``; returns rax."""
    return XOR_EAX + _loop(CHAINS[op][0] * CHAIN_UNROLL + DEC_RDI) + RET


def _loop(body: bytes) -> bytes:
    """``body`` (ending in a decrement) then a short jnz back to its start."""
    return body + bytes([0x75, (-(len(body) + 2)) & 0xFF])


class _Code:
    """Machine code in an executable anonymous mapping, callable as ``long f(long, long)`` (the GIL released)."""

    def __init__(self, code: bytes):
        self.mem = mmap.mmap(-1, max(4096, len(code)), prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self.mem.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.fn = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_long)(address)


def _rate_per_core(fn, units_per_iteration: float, threads: int, seconds: float, trials: int, arg: int = 1) -> float:
    """Units (cycles or operations) per second per core: ``fn`` run in ``threads`` threads at once (ctypes releases
    the GIL, so each runs on its own core), the best of ``trials`` trials, each trial the mean over its threads.
    Each thread divides by its own CPU time, not the wall clock: time it spent preempted (another process on its
    core) does not count, so a busy machine reads its cores' rate rather than a share of it."""
    fn(100, arg)
    start = time.perf_counter()
    fn(10_000, arg)
    n = max(100, int(10_000 * seconds / max(time.perf_counter() - start, 1e-6)))
    best = 0.0
    for _ in range(trials):
        barrier, rates = threading.Barrier(threads), [0.0] * threads
        pool = [threading.Thread(target=_timed, args=(fn, n, arg, units_per_iteration, barrier, rates, k))
                for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        best = max(best, sum(rates) / threads)
    return best


def _timed(fn, n: int, arg: int, units_per_iteration: float, barrier: threading.Barrier, rates: list[float],
           k: int) -> None:
    barrier.wait()
    t0 = time.thread_time()
    fn(n, arg)
    rates[k] = n * units_per_iteration / max(time.thread_time() - t0, 1e-9)


def measure(flags: set[str], threads: int, seconds: float = 0.01, trials: int = 2):
    """Yield ("clock_mhz", "add" | "imul", MHz) and ("ops_per_s", ISA, operations per second per core) on this
    machine, for the ISAs of :data:`PROBES` and :data:`AMX_PROBES` whose flags are all in ``flags`` (AMX last, and
    only where the kernel grants it), one at a time: what was measured before a crash is kept. Each key is measured
    in rounds (:func:`rounds_until_agreed`) and every round's value is yielded: the reader keeps each key's best."""
    probes: dict[tuple[str, str], Callable[[], float]] = {}
    for op, (_, cycles) in CHAINS.items():
        probes["clock_mhz", op] = _probe(_Code(chain_loop(op)), CHAIN_UNROLL * cycles / 1e6, threads, seconds, trials)
    for isa, (needs, instruction, bits, ops) in PROBES.items():
        if all(f in flags for f in needs):
            probes["ops_per_s", isa] = _probe(_Code(vector_loop(instruction, bits)), ACCUMULATORS * ops, threads,
                                              seconds, trials)
    for (kind, key), value in rounds_until_agreed(probes):
        yield kind, key, value
    amx = [isa for isa, (needs, *_) in AMX_PROBES.items() if all(f in flags for f in needs)]
    if amx and request_amx():
        config = ctypes.create_string_buffer(tile_config(), 64)
        tiles = {("ops_per_s", isa): _probe(_Code(tile_loop(isa)), AMX_PRODUCTS * AMX_PROBES[isa][3], threads,
                                            seconds, trials, ctypes.addressof(config)) for isa in amx}
        for (kind, key), value in rounds_until_agreed(tiles):
            yield kind, key, value


def _probe(code: _Code, units: float, threads: int, seconds: float, trials: int, arg: int = 1) -> Callable[[], float]:
    """One measurement of ``code`` (kept alive by the closure, its mapping with it)."""
    return lambda: _rate_per_core(code.fn, units, threads, seconds, trials, arg)


K = TypeVar("K")
AGREE = 0.03  # two rounds within 3% confirm a key's best
MIN_ROUNDS, MAX_ROUNDS = 3, 12


def rounds_until_agreed(probes: dict[K, Callable[[], float]], agree: float = AGREE, min_rounds: int = MIN_ROUNDS,
                        max_rounds: int = MAX_ROUNDS) -> Iterator[tuple[K, float]]:
    """Yield (key, value) for each of ``probes`` (key -> a function measuring it once), in rounds over the keys
    still open, until a key's two best values agree within ``agree`` (at least ``min_rounds`` rounds, at most
    ``max_rounds``).

    Why: a shared VM's cores halve their vector rate for spells of up to a second (measured on the 2-core EPYC VM:
    AVX-512F at 58-75 GFLOP/s in every round of one probe, 115-117 in the next; most likely our two vCPUs placed on
    one host core's two threads), and one such spell over a key's back-to-back trials once failed CI. The true rate
    repeats itself; the rates in a spell scatter, so the best two agreeing is what confirms a key, and rounds spread
    its trials over the probe's whole time."""
    seen: dict[K, list[float]] = {key: [] for key in probes}
    for done in range(max_rounds):
        open_keys = [key for key, values in seen.items() if done < min_rounds or not _agreed(values, agree)]
        if not open_keys:
            return
        for key in open_keys:
            value = probes[key]()
            seen[key].append(value)
            yield key, value


def _agreed(values: list[float], agree: float) -> bool:
    best, second = sorted(values, reverse=True)[:2]
    return best - second <= agree * best


def supported() -> bool:
    """x86-64 Linux: the machine code and the executable mapping this needs."""
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


if __name__ == "__main__":  # python zsad/cpu_probe.py THREADS FLAG ... -> one JSON line per measurement
    for kind, key, value in measure(set(sys.argv[2:]), int(sys.argv[1])):
        print(json.dumps([kind, key, value]), flush=True)
