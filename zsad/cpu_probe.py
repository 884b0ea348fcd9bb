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
  operations per second each core sustains with all of them busy, AVX-512 down-clocking included.

Only instructions the CPU's /proc/cpuinfo flags list are run, and the loops run in a child process
(``python zsad/cpu_probe.py``, stdlib only), so an illegal instruction, a kernel that forbids executable memory, or a
non-x86 machine costs a fallback to the table, never the caller. AMX is not probed (its tiles need a permission
request and a tile configuration); its peak stays table x measured clock.

The instruction bytes are encoded here from their fields (Intel SDM vol. 2, 2.3 VEX and 2.7 EVEX); the tests check
them against the GNU assembler where one is installed.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import platform
import sys
import threading
import time

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
CHAIN_UNROLL = 16
CHAINS = {"add": (bytes.fromhex("4801f0"), 1), "imul": (bytes.fromhex("480fafc6"), 3)}  # rax op= rsi; cycles
VZEROALL, VZEROUPPER, RET = bytes.fromhex("c5fc77"), bytes.fromhex("c5f877"), b"\xc3"
MOV_RCX_RDI, DEC_RCX, DEC_RDI, XOR_EAX = (bytes.fromhex(h) for h in ("4889f9", "48ffc9", "48ffcf", "31c0"))


def encode(instruction: str, bits: int, dst: int, src1: int, src2: int) -> bytes:
    """``instruction dst, src1, src2`` on vector registers 0-15: EVEX for 512 bits, three-byte VEX for 256."""
    pp, opcode = OPCODES[instruction]
    modrm = 0xC0 | (dst & 7) << 3 | (src2 & 7)
    r, b = (dst >> 3) & 1, (src2 >> 3) & 1
    if bits == 512:
        # P0: R X B R' (inverted) 0 0 mm (2 = 0F38); P1: W vvvv (inverted) 1 pp; P2: z L'L b V' (inverted) aaa
        p0 = (1 - r) << 7 | 1 << 6 | (1 - b) << 5 | 1 << 4 | 0b10
        p1 = (~src1 & 0xF) << 3 | 1 << 2 | pp
        p2 = 0b10 << 5 | 1 << 3
        return bytes([0x62, p0, p1, p2, opcode, modrm])
    # C4: R X B (inverted) m-mmmm (2 = 0F38); W vvvv (inverted) L pp
    vex1 = (1 - r) << 7 | 1 << 6 | (1 - b) << 5 | 0b00010
    return bytes([0xC4, vex1, (~src1 & 0xF) << 3 | 1 << 2 | pp, opcode, modrm])


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


def _rate_per_core(fn, units_per_iteration: float, threads: int, seconds: float, trials: int) -> float:
    """Units (cycles or operations) per second per core: ``fn`` run in ``threads`` threads at once (ctypes releases
    the GIL, so each runs on its own core), the best of ``trials`` trials, each trial the mean over its threads.
    Each thread divides by its own CPU time, not the wall clock: time it spent preempted (another process on its
    core) does not count, so a busy machine reads its cores' rate rather than a share of it."""
    fn(1000, 1)
    start = time.perf_counter()
    fn(100_000, 1)
    n = max(1000, int(100_000 * seconds / max(time.perf_counter() - start, 1e-6)))
    best = 0.0
    for _ in range(trials):
        barrier, rates = threading.Barrier(threads), [0.0] * threads
        pool = [threading.Thread(target=_timed, args=(fn, n, units_per_iteration, barrier, rates, k))
                for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        best = max(best, sum(rates) / threads)
    return best


def _timed(fn, n: int, units_per_iteration: float, barrier: threading.Barrier, rates: list[float], k: int) -> None:
    barrier.wait()
    t0 = time.thread_time()
    fn(n, 1)
    rates[k] = n * units_per_iteration / max(time.thread_time() - t0, 1e-9)


def measure(flags: set[str], threads: int, seconds: float = 0.01, trials: int = 5) -> dict:
    """{"clock_mhz": {"add": .., "imul": ..}, "ops_per_s": {ISA: operations per second per core}} on this machine,
    for the ISAs of :data:`PROBES` whose flags are all in ``flags``."""
    out: dict = {"clock_mhz": {}, "ops_per_s": {}}
    for op, (_, cycles) in CHAINS.items():
        code = _Code(chain_loop(op))
        out["clock_mhz"][op] = _rate_per_core(code.fn, CHAIN_UNROLL * cycles, threads, seconds, trials) / 1e6
    for isa, (needs, instruction, bits, ops) in PROBES.items():
        if all(f in flags for f in needs):
            code = _Code(vector_loop(instruction, bits))
            out["ops_per_s"][isa] = _rate_per_core(code.fn, ACCUMULATORS * ops, threads, seconds, trials)
    return out


def supported() -> bool:
    """x86-64 Linux: the machine code and the executable mapping this needs."""
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


if __name__ == "__main__":  # python zsad/cpu_probe.py THREADS FLAG ... -> the JSON of measure()
    print(json.dumps(measure(set(sys.argv[2:]), int(sys.argv[1]))))
