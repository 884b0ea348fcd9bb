"""The measured CPU peaks (zsad.cpu_probe, issue 25's "% of peak" column): the machine code against the GNU
assembler, the clock two independent ways (dependent adds, dependent imuls of three times the latency), the
measured fp32 peak against a real GEMM (which cannot beat it and reaches over half of it), the ratio of the
int8 and fp32 rates the hardware fixes, and how read_cpu uses the measurement (by hand), falls back without it,
and halves the AVX-512 table on AMD Zen 4."""
import copy
import shutil
import subprocess
import time

import pytest

from zsad import cpu_probe
from zsad.cpu import CpuInfo, apply_probe, parse_cpuinfo, probe_cpu, read_cpu

pytestmark = pytest.mark.skipif(not cpu_probe.supported(), reason="the probe is x86-64 Linux machine code")

AMX_XEON = "fpu sse sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8"


@pytest.fixture(scope="module")
def here():
    """This machine read as the bench reads it, once (the probe ran in its child process), and its probe JSON."""
    info = read_cpu()
    return info, probe_cpu(info.physical_cores, info.flags)


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("objcopy")), reason="needs binutils (as, objcopy)")
def test_machine_code_matches_the_gnu_assembler(tmp_path):
    lines, ours = [".intel_syntax noprefix"], b""
    for _, instruction, bits, _ in cpu_probe.PROBES.values():
        reg = "zmm" if bits == 512 else "ymm"
        prefix = "{evex} " if bits == 512 else "{vex} "  # AVX-VNNI's VEX form, not AVX512-VL's EVEX one
        for dst in range(cpu_probe.ACCUMULATORS):
            lines.append(f"{prefix}{instruction} {reg}{dst}, {reg}14, {reg}15")
            ours += cpu_probe.encode(instruction, bits, dst, 14, 15)
    lines += ["add rax, rsi", "imul rax, rsi", "vzeroall", "vzeroupper", "mov rcx, rdi", "dec rcx", "dec rdi",
              "xor eax, eax", "ret", "ldtilecfg [rsi]", "tilerelease"]
    ours += (cpu_probe.CHAINS["add"][0] + cpu_probe.CHAINS["imul"][0] + cpu_probe.VZEROALL + cpu_probe.VZEROUPPER
             + cpu_probe.MOV_RCX_RDI + cpu_probe.DEC_RCX + cpu_probe.DEC_RDI + cpu_probe.XOR_EAX + cpu_probe.RET
             + cpu_probe.LDTILECFG_RSI + cpu_probe.TILERELEASE)
    # the AMX loop: tilezero of tmm0-7, then four tile products (accumulator, A, B) per iteration
    amx_products = ((0, 4, 5), (1, 4, 6), (2, 7, 5), (3, 7, 6))
    for isa, instruction in (("AMX-BF16", "tdpbf16ps"), ("AMX-INT8", "tdpbssd")):
        loop = cpu_probe.tile_loop(isa)
        lines += [f"tilezero tmm{t}" for t in range(8)]
        lines += [f"{instruction} tmm{acc}, tmm{a}, tmm{b}" for acc, a, b in amx_products]
        start = len(cpu_probe.LDTILECFG_RSI)
        ours += loop[start:start + 8 * 5]  # tilezero x 8
        body = start + 8 * 5 + len(cpu_probe.MOV_RCX_RDI)
        ours += loop[body:body + 4 * 5]  # the four products
    (tmp_path / "p.s").write_text("\n".join(lines) + "\n")
    subprocess.run(["as", "-o", str(tmp_path / "p.o"), str(tmp_path / "p.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.text", str(tmp_path / "p.o"),
                    str(tmp_path / "p.bin")], check=True)
    assert (tmp_path / "p.bin").read_bytes() == ours
    # the loop closes on its own start: a short jnz back over the body and itself
    body = cpu_probe.CHAINS["add"][0] * cpu_probe.CHAIN_UNROLL + cpu_probe.DEC_RDI
    assert cpu_probe.chain_loop("add") == cpu_probe.XOR_EAX + body + bytes([0x75, 256 - len(body) - 2, 0xC3])


def test_operations_per_instruction_by_hand():
    # fp32 FMA: one multiply-add per 32-bit lane; vdpbf16ps: two bf16 products summed into each fp32 lane;
    # vpdpbusd: four u8 x s8 products into each int32 lane; a multiply-add counts 2
    lanes = {512: 16, 256: 8}
    products = {"vfmadd231ps": 1, "vdpbf16ps": 2, "vpdpbusd": 4}
    for isa, (_, instruction, bits, ops) in cpu_probe.PROBES.items():
        assert ops == lanes[bits] * products[instruction] * 2, isa
    # an AMX tile product: 16 x 16 accumulators, each over one 64-byte row of A (32 bf16 or 64 int8)
    assert cpu_probe.AMX_PROBES["AMX-BF16"][3] == 16 * 16 * 32 * 2
    assert cpu_probe.AMX_PROBES["AMX-INT8"][3] == 16 * 16 * 64 * 2
    config = cpu_probe.tile_config()  # palette 1; tiles 0-7: 16 rows of 64 bytes; the rest unused
    assert len(config) == 64 and config[0] == 1 and config[16:18] == (64).to_bytes(2, "little")
    assert config[16 + 2 * 7:16 + 2 * 8] == (64).to_bytes(2, "little") and config[16 + 2 * 8:16 + 2 * 9] == bytes(2)
    assert list(config[48:64]) == [16] * 8 + [0] * 8


def test_every_probed_isa_is_a_peak_table_row_needing_no_more_flags_than_probed():
    # the child runs alone (stdlib only) and so names its ISAs itself: a name that drifted from zsad.cpu's table
    # would leave its measurement unused, and a row needing a flag the probe does not check would run it unsupported
    from zsad.cpu import PEAK_TABLE

    rows = {name: set(needs) for table in PEAK_TABLE.values() for name, needs, _ in table}
    for isa, (needs, *_) in {**cpu_probe.PROBES, **cpu_probe.AMX_PROBES}.items():
        assert isa in rows and rows[isa] <= set(needs), isa


def test_the_clock_two_independent_ways(here):
    info, probe = here
    assert probe is not None, "the probe did not run on an x86-64 Linux machine"
    add, imul = probe["clock_mhz"]["add"], probe["clock_mhz"]["imul"]
    # a one-cycle and a three-cycle dependency chain give the same clock
    assert imul == pytest.approx(add, rel=0.1)
    assert 800 < add < 6500  # an x86-64 core of any year
    assert info.mhz == add and info.mhz_source.startswith("measured")
    if info.mhz_reported > 0:  # the kernel's figure is nominal or turbo: within 2x of what the cores run
        assert 0.5 < add / info.mhz_reported < 2.0


def test_measured_fp32_peak_bounds_a_real_gemm(here):
    import torch

    info, probe = here
    isa = info.best_isa("fp32")[0]
    if isa not in probe["ops_per_s"]:
        pytest.skip(f"{isa} is not probed")
    n, best = 2048, 0.0
    a, b = torch.randn(n, n), torch.randn(n, n)
    per_core = info.peak_tflops("fp32")[0] / info.physical_cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, timed by its own CPU time as the probe is: another process costs nothing
    try:
        torch.mm(a, b)
        # the best of up to 16 GEMMs (~0.3 s each), stopping once one is past half the peak: a shared VM's core
        # runs its vector units at about half speed in spells of up to ~1.5 s, which CPU time does not exclude
        # (the 2-core Zen 3 EPYC: 3 GEMMs in a row at 44-49% of the peak, the next runs at 60-79%)
        for _ in range(16):
            t = time.thread_time()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.thread_time() - t) / 1e12)
            if best > 0.5 * per_core:
                break
    finally:
        torch.set_num_threads(threads)
    for _ in range(2):
        if best / per_core < 1.15:
            break
        # every round of the probe fell in one of a shared VM's half-rate spells (zsad.cpu_probe's docstring; the
        # Zen 3 EPYC under pytest -n 2: 47.7 GFLOP/s per core, 90-92 probed again, a GEMM at 68): measure again and
        # keep the best, as the probe keeps the best of its rounds (a peak off by 2x still fails below)
        again = apply_probe(copy.copy(info), probe_cpu.__wrapped__(info.physical_cores, info.flags))
        per_core = max(per_core, again.peak_tflops("fp32")[0] / info.physical_cores)
    # a GEMM cannot beat the peak (one core may turbo a little above the all-core rate the probe measured); a
    # BLAS GEMM of this size reaches well over half of it
    assert 0.5 < best / per_core < 1.15, (best, per_core)


def test_int8_and_bf16_rates_against_fp32(here):
    _, probe = here
    ops = probe["ops_per_s"]
    # vpdpbusd issues at the FMA's rate on every VNNI core (two ports on Xeon Gold/Platinum, one 512-bit on Zen 4):
    # four times fp32's operations
    for vnni, fma in (("AVX-512 VNNI", "AVX-512F"), ("AVX-VNNI", "AVX2+FMA")):
        if vnni in ops:
            assert 3.0 < ops[vnni] / ops[fma] < 5.0, (vnni, ops)
    if "AVX-512 BF16" in ops:  # a quarter of the FMA's instruction rate on an AMX Xeon core, more elsewhere
        assert 0.2 < ops["AVX-512 BF16"] / ops["AVX-512F"] < 2.5, ops


def test_amx_against_intels_figure_and_a_bf16_gemm(here):
    import torch

    info, probe = here
    ops = probe["ops_per_s"]
    if not {"amx_bf16", "amx_tile"} <= info.flags:
        pytest.skip("no AMX on this CPU")
    assert {"AMX-BF16", "AMX-INT8"} <= set(ops), "AMX in the flags but not measured: the kernel refused tile data?"
    # Intel: 1024 bf16 / 2048 int8 operations per cycle per core; the tile unit cannot beat it at the measured clock
    for isa, per_cycle in (("AMX-BF16", 1024), ("AMX-INT8", 2048)):
        assert 0.5 < ops[isa] / (per_cycle * info.mhz * 1e6) < 1.1, (isa, ops[isa], info.mhz)
    n, best = 2048, 0.0
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.mm(a, b)
        for _ in range(3):
            t = time.thread_time()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.thread_time() - t))
    finally:
        torch.set_num_threads(threads)
    assert 0.15 < best / ops["AMX-BF16"] < 1.05  # oneDNN's AMX GEMM: under the peak, not far under
    assert info.peak_tflops("bf16") == pytest.approx((info.physical_cores * ops["AMX-BF16"] / 1e12, "AMX-BF16"))


def test_peaks_from_the_measurement_by_hand():
    info = CpuInfo(vendor="GenuineIntel", flags=frozenset(AMX_XEON.split()), physical_cores=2, mhz=2600.0,
                   mhz_source="/proc/cpuinfo cpu MHz")
    apply_probe(info, {"clock_mhz": {"add": 3800.0, "imul": 3790.0},
                       "ops_per_s": {"AVX-512F": 220e9, "AVX-512 BF16": 110e9, "AVX-512 VNNI": 880e9}})
    assert (info.mhz, info.mhz_reported) == (3800.0, 2600.0)
    assert info.peak_tflops("fp32") == pytest.approx((2 * 220e9 / 1e12, "AVX-512F"))  # measured
    assert info.peak_tflops("bf16") == pytest.approx((2 * 3.8e9 * 1024 / 1e12, "AMX-BF16"))  # table x the clock
    assert info.summary()["peak_measured"] == {"fp32": True, "bf16": False, "int8": False}
    apply_probe(info, {"clock_mhz": {"add": 3800.0}, "ops_per_s": {"AMX-INT8": 7.6e12}})
    assert info.peak_tflops("int8-bf16") == pytest.approx((15.2, "AMX-INT8"))
    no_amx = CpuInfo(flags=frozenset(AMX_XEON.split()) - {"amx_bf16", "amx_int8", "amx_tile"}, physical_cores=2)
    apply_probe(no_amx, {"clock_mhz": {"add": 3800.0}, "ops_per_s": {"AVX-512 BF16": 110e9, "AVX-512 VNNI": 880e9}})
    assert no_amx.peak_tflops("bf16") == pytest.approx((0.22, "AVX-512 BF16"))
    assert no_amx.peak_tflops("int8-bf16") == pytest.approx((1.76, "AVX-512 VNNI"))
    # no probe (not x86-64 Linux, or its child failed): the reported clock and the table
    plain = apply_probe(CpuInfo(flags=frozenset(AMX_XEON.split()), physical_cores=2, mhz=2600.0), None)
    assert plain.peak_tflops("fp32") == pytest.approx((2 * 2.6e9 * 64 / 1e12, "AVX-512F"))


def test_a_failed_probe_child_falls_back_to_the_table(monkeypatch):
    printed = ""

    def died(*args, **kwargs):  # killed by SIGILL after printing ``printed``
        return subprocess.CompletedProcess(args, -4, printed, "")

    monkeypatch.setattr("zsad.cpu.subprocess.run", died)
    probe_cpu.cache_clear()
    try:
        info = read_cpu()
        assert not info.measured_ops and not info.mhz_source.startswith("measured")
        # what it measured before it died is kept (AMX runs last), a torn line is not
        printed = '["clock_mhz", "add", 4000.0]\n["ops_per_s", "AVX-512F", 2.4e11]\n["ops_per_s", "AMX-'
        probe_cpu.cache_clear()
        assert probe_cpu(2, frozenset({"avx512f"})) == {"clock_mhz": {"add": 4000.0},
                                                        "ops_per_s": {"AVX-512F": 2.4e11}}
    finally:
        probe_cpu.cache_clear()


def test_rounds_run_until_a_keys_two_best_agree():
    # scripted rates: a spell of halved rates (the shared VM's), then the true one twice
    script = {"spell": [58.6, 62.9, 116.0, 72.4, 117.0, 116.5], "quiet": [116.0, 111.0, 110.0, 116.2, 116.1],
              "steady": [116.0, 116.1, 116.2, 116.3],
              "never": [float(v) for v in range(100, 3000, 100)]}
    calls = {k: iter(v) for k, v in script.items()}
    got: dict[str, list[float]] = {k: [] for k in script}
    order = []
    for key, value in cpu_probe.rounds_until_agreed({k: (lambda k=k: next(calls[k])) for k in script},
                                                    agree=0.03, min_rounds=3, max_rounds=7):
        got[key].append(value)
        order.append(key)
    # by hand: "spell" is open until 117.0 joins 116.0 (0.9% apart; 116.0 vs 72.4 is not); "quiet" runs the
    # minimum 3 rounds (116.0 vs 111.0: 4.3%, not within 3%), then 116.2 confirms it; "steady" agrees from its
    # second round, but runs the minimum; "never" (100, 200, ...: 14-50% apart) stops at max_rounds
    assert got == {"spell": script["spell"][:5], "quiet": script["quiet"][:4],
                   "steady": script["steady"][:3], "never": script["never"][:7]}
    # rounds over the open keys (a dip then costs one round of a key, not all its trials back to back)
    assert order == (["spell", "quiet", "steady", "never"] * 3 + ["spell", "quiet", "never"] + ["spell", "never"]
                     + ["never"] * 2)


def test_every_round_is_printed_and_read_as_its_best(monkeypatch):
    lines = list(cpu_probe.measure({"avx2", "fma"}, 1, seconds=0.001, trials=1))
    for key in (("clock_mhz", "add"), ("clock_mhz", "imul"), ("ops_per_s", "AVX2+FMA")):
        assert sum((kind, name) == key for kind, name, _ in lines) >= cpu_probe.MIN_ROUNDS
    # the reader keeps each key's best, in whichever round it came
    for dip in range(3):
        rates = [1.0e11] * 3
        rates[dip] = 0.6e11
        printed = "".join(f'["ops_per_s", "AVX-512F", {r}]\n["ops_per_s", "AVX2+FMA", 5e10]\n' for r in rates)
        monkeypatch.setattr("zsad.cpu.subprocess.run",
                            lambda *a, p=printed, **k: subprocess.CompletedProcess(a, 0, p, ""))
        probe_cpu.cache_clear()
        try:
            assert probe_cpu(2, frozenset({"avx512f"}))["ops_per_s"] == {"AVX-512F": 1.0e11, "AVX2+FMA": 5e10}
        finally:
            probe_cpu.cache_clear()


def _cpuinfo(vendor: str, family: int, flags: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: Test\ncore id\t\t: 0\n"
            f"cpu MHz\t\t: 3000\nflags\t\t: {flags}\n")


def test_zen4_runs_avx512_at_half_the_table():
    flags = "avx avx2 fma avx512f avx512_vnni avx512_bf16"
    zen4 = parse_cpuinfo(_cpuinfo("AuthenticAMD", 25, flags))
    assert [zen4.best_isa(p)[1] for p in ("fp32", "bf16", "int8")] == [32, 64, 128]  # one 512-bit FMA per cycle
    for other in (_cpuinfo("AuthenticAMD", 26, flags), _cpuinfo("GenuineIntel", 6, flags)):  # Zen 5, Intel
        assert [parse_cpuinfo(other).best_isa(p)[1] for p in ("fp32", "bf16", "int8")] == [64, 128, 256]
    zen3 = parse_cpuinfo(_cpuinfo("AuthenticAMD", 25, "avx avx2 fma"))  # no AVX-512: nothing halved
    assert zen3.best_isa("fp32") == ("AVX2+FMA", 32)
