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

import os

# the flags whose int8 dot products accumulate in int32 (oneDNN's ISA names: avx512_core_vnni, avx2_vnni, amx)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

# oneDNN's ONEDNN_MAX_CPU_ISA names -> which of the flags zsad looks at (ONEDNN_GATED) a kernel may still use
# under that cap (oneDNN's ISA hierarchy: an ISA is allowed when all its bits are in the cap's; AVX2-VNNI is not
# part of AVX512_CORE nor of AVX512_CORE_VNNI / _BF16, it comes back with AVX512_CORE_FP16). Here rather than in
# zsad.cpu so the served stages apply the same cap as zsad-export: a VNNI CPU capped at AVX2 runs int8 as one
# without VNNI, and must refuse 8-bit weights as one would.
ONEDNN_GATED = frozenset({"avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                          "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"})
_AVX2 = frozenset({"avx", "avx2", "fma"})
_AVX512 = _AVX2 | {"avx512f"}
_FP16 = _AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni"}
ONEDNN_ISA_CAPS: dict[str, frozenset[str]] = {
    "SSE41": frozenset(), "AVX": frozenset({"avx"}), "AVX2": _AVX2, "AVX2_VNNI": _AVX2 | {"avx_vnni"},
    "AVX2_VNNI_2": _AVX2 | {"avx_vnni"}, "AVX512_CORE": _AVX512, "AVX512_CORE_VNNI": _AVX512 | {"avx512_vnni"},
    "AVX512_CORE_BF16": _AVX512 | {"avx512_vnni", "avx512_bf16"}, "AVX512_CORE_FP16": _FP16,
    "AVX10_1_512": _FP16, "AVX512_CORE_AMX": _FP16 | {"amx_tile", "amx_bf16", "amx_int8"},
    "AVX10_1_512_AMX": _FP16 | {"amx_tile", "amx_bf16", "amx_int8"}, "AVX512_CORE_AMX_FP16": ONEDNN_GATED,
    "AVX10_1_512_AMX_FP16": ONEDNN_GATED, "ALL": ONEDNN_GATED, "DEFAULT": ONEDNN_GATED}


def isa_cap_setting(environ) -> tuple[str, str] | None:
    """(variable, value) of oneDNN's ISA cap as ``environ`` sets it: ONEDNN_MAX_CPU_ISA, else DNNL_MAX_CPU_ISA (the
    first that is set and not blank); None where neither is."""
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = environ.get(var, "").strip()
        if value:
            return var, value
    return None


def isa_capped(flags, environ) -> tuple[frozenset, str]:
    """``flags`` with those above oneDNN's ISA cap left out, where ``environ`` sets ONEDNN_MAX_CPU_ISA (else
    DNNL_MAX_CPU_ISA) to a name oneDNN knows, and a sentence saying what was done ("" where nothing is set). Unset,
    DEFAULT / ALL or a name oneDNN does not know (oneDNN ignores it too): ``flags`` unchanged."""
    flags = frozenset(flags)
    setting = isa_cap_setting(environ)
    if setting is None:
        return flags, ""
    var, value = setting
    allowed = ONEDNN_ISA_CAPS.get(value.upper())
    if allowed is None:
        return flags, f"{var}={value} is not a oneDNN ISA name: ignored, as oneDNN ignores it"
    if value.upper() in ("ALL", "DEFAULT"):
        return flags, ""
    return (frozenset(f for f in flags if f not in ONEDNN_GATED or f in allowed),
            f"capped by {var}={value}: oneDNN, so OpenVINO's CPU plugin and torch's oneDNN kernels, used no ISA "
            f"above it; the flags and peaks here are the capped ones")


def cpu_flags(path: str = "/proc/cpuinfo", environ=None) -> frozenset | None:
    """The x86 feature flags of this machine's first CPU as oneDNN may use them (``environ``'s ISA cap applied,
    os.environ by default), or None where there are none to read (not x86, not Linux): then
    :func:`weight_bits_for` and :func:`overflow_refusal` take it for a CPU without this hazard."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return isa_capped(value.split(), os.environ if environ is None else environ)[0]
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
