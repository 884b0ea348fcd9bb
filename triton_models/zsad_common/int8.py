"""Whether an int8 model's weights fit this CPU's int8 dot products without overflow (zsad-export decides the weight
bits with it, and the served OpenVINO stages refuse to load a model that would overflow here).

x86 CPUs without VNNI (AVX2; AVX-512 before Cascade Lake) multiply int8 with VPMADDUBSW, which adds two unsigned x
signed 8-bit products into a *saturating* int16. oneDNN (so OpenVINO's CPU plugin) and ONNX Runtime's MLAS both run
int8 matmuls that way there, shifting signed activations by +128 into the unsigned operand. Two products of 255 x 127
(64770) overflow int16 (32767) and are clipped, silently: measured on a 2-core AMD EPYC (Zen 3, AVX2, no VNNI), a
256-long int8 dot product of activations 127 and weights 127 came back as 32640 instead of 4129024, in OpenVINO 2026.4
and ONNX Runtime 1.32 alike. With 7-bit weights (|w| <= 64) a pair sums to at most 255 x 64 x 2 = 32640: no overflow.
VNNI (VPDPBUSD, AVX-512 VNNI or AVX-VNNI) and AMX accumulate in int32 directly, so 8-bit weights are exact there.
CPUs that are not x86 (no ``flags`` line in /proc/cpuinfo) have no such instruction: 8-bit weights are fine.
"""

# the flags whose int8 dot products accumulate in int32 (oneDNN's ISA names: avx512_core_vnni, avx2_vnni, amx)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset | None:
    """The x86 feature flags of this machine's first CPU, or None where there are none to read (not x86, not
    Linux): then :func:`weight_bits_for` and :func:`overflow_refusal` take it for a CPU without this hazard."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def weight_bits_for(flags) -> int:
    """The int8 weight width whose dot products are exact on a CPU with ``flags``: 8 with VNNI / AMX or off x86
    (None), 7 on x86 without VNNI."""
    return 8 if flags is None or VNNI_FLAGS & set(flags) else 7


def overflow_refusal(weight_bits, flags) -> str | None:
    """Why an int8 model whose weights use ``weight_bits`` bits (None: not an int8 model) must not run on a CPU with
    ``flags``, or None where it is safe."""
    if weight_bits is None or int(weight_bits) <= weight_bits_for(flags):
        return None
    return (f"this int8 model was quantised with {int(weight_bits)}-bit weights, for CPUs with VNNI or AMX; this CPU "
            f"has neither ({', '.join(sorted(VNNI_FLAGS))} all absent), and its int8 dot products (VPMADDUBSW) add "
            f"products into a saturating int16 that such weights overflow, giving wrong results silently. Re-export "
            f"on this machine (zsad-export then quantises with 7-bit weights) or with --portable-int8 (7-bit weights "
            f"anywhere), or serve an fp32 / bf16 export")
