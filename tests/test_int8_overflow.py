"""int8 weights and CPUs without VNNI (issue 25, found on a 2-core AVX2 AMD EPYC): there OpenVINO's and ONNX Runtime's
int8 dot products add u8 x s8 product pairs into a saturating int16, so 8-bit weights can overflow silently.

The ground truth is the live kernels of this machine, not zsad's own reading: a dot product built to overflow int16
(activations 127, weights 127) must come back exact exactly where zsad says 8-bit weights are safe on this CPU, and
7-bit weights (|w| <= 64) must be exact everywhere. Then: NNCF / ORT quantise with the width zsad asks for, the export
records it, and the served OpenVINO stage refuses an IR whose weights would overflow its CPU."""
import json

import numpy as np
import pytest

from zsad.triton_models.zsad_common.int8 import VNNI_FLAGS, cpu_flags, overflow_refusal, weight_bits_for

K, N = 256, 8
AVX2 = frozenset({"sse2", "avx", "avx2", "fma"})


def test_weight_bits_and_refusal_per_cpu_kind():
    assert weight_bits_for(AVX2) == 7
    assert weight_bits_for(AVX2 | {"avx512f", "avx512bw"}) == 7  # Skylake-X: AVX-512 without VNNI
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert weight_bits_for(AVX2 | {vnni}) == 8
    assert weight_bits_for(None) == 8  # not x86: no VPMADDUBSW
    assert "--portable-int8" in overflow_refusal(8, AVX2)
    assert overflow_refusal("8", AVX2)  # rt_info holds text
    for bits, flags in ((7, AVX2), (None, AVX2), (8, AVX2 | {"avx512_vnni"}), (8, None), (7, None)):
        assert overflow_refusal(bits, flags) is None, (bits, flags)


def test_cpu_flags_reads_the_flags_line(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # a cap in the runner's environment would hide avx2
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n"
                   "flags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_flags(str(x86)) == {"fpu", "sse2", "avx2", "fma"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_flags(str(arm)) is None and cpu_flags(str(tmp_path / "missing")) is None


def test_served_flags_follow_oneDNN_isa_cap(tmp_path, monkeypatch):
    """The served stage reads the flags as zsad-export does, with oneDNN's ISA cap applied: a VNNI CPU whose server
    runs with ONEDNN_MAX_CPU_ISA=AVX2 computes int8 with VPMADDUBSW (no VNNI kernel below the cap), so it must
    refuse 8-bit weights; uncapped, or capped at a level that keeps VNNI, it loads them."""
    vnni = tmp_path / "vnni"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu avx avx2 fma avx512f avx512_vnni\n")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert overflow_refusal(8, cpu_flags(str(vnni))) is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # read from the process environment, as the stub inherits it
    capped = cpu_flags(str(vnni))
    assert capped == {"fpu", "avx", "avx2", "fma"} and weight_bits_for(capped) == 7
    assert "VPMADDUBSW" in overflow_refusal(8, capped)
    assert overflow_refusal(8, cpu_flags(str(vnni), {"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"})) is None
    assert cpu_flags(str(vnni), {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) == {"fpu", "avx", "avx2", "fma", "avx512f"}


def _here():
    """This CPU's flags as oneDNN may use them (its ISA cap applied), from zsad.cpu: what zsad-export decides by."""
    from zsad.cpu import read_cpu

    return read_cpu(measure=False).flags or None


def _overflowing_case(weight_max: int):
    """Activations all 127 (int8 scale 1), weights all ``weight_max`` in the first 4 output channels, random below it
    in the rest: exact answer 127 * weight_max * K in those channels."""
    rng = np.random.default_rng(0)
    w = rng.integers(-weight_max, weight_max + 1, size=(N, K)).astype(np.float32)
    w[:4] = weight_max
    x = np.full((2, K), 127.0, np.float32)
    return x, w, x @ w.T


def _openvino_int8_matmul(x, w, lo, hi):
    ov = pytest.importorskip("openvino")
    import openvino.opset13 as ops

    def c(v):
        return ops.constant(np.array(v, np.float32))

    p = ops.parameter(list(x.shape), np.float32, name="x")
    xq = ops.fake_quantize(p, c(lo), c(hi), c(lo), c(hi), 256)
    wq = ops.fake_quantize(ops.constant(w), c(-128.0), c(127.0), c(-128.0), c(127.0), 256)
    model = ov.Model([ops.matmul(xq, wq, False, True)], [p])
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": x})[0]


def _ort_int8_matmul(x, w):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(w.T.astype(np.int8), "wq"), numpy_helper.from_array(np.ones(N, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(N, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),  # QDQ, as ORT's quantize_static writes it
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_int8_dot_products_overflow_exactly_where_zsad_says(runtime):
    """8-bit weights of 127 against activations of 127 overflow VPMADDUBSW's int16 pairs (255 x 127 x 2 after the
    +128 shift of signed activations): on this CPU the result must be exact iff zsad picks 8-bit weights here; 7-bit
    weights (64) are exact on any CPU. Measured on the AVX2 EPYC: 32640 for 4129024."""
    bits_here = weight_bits_for(_here())
    for weight_max, exact in ((127, bits_here == 8), (64, True)):
        x, w, want = _overflowing_case(weight_max)
        got = (_openvino_int8_matmul(x, w, -128.0, 127.0) if runtime == "openvino" else _ort_int8_matmul(x, w))
        err = float(np.abs(got - want).max() / np.abs(want).max())
        if exact:
            assert err < 1e-6, (runtime, weight_max, bits_here, got[0, :4], want[0, :4])
        else:
            assert err > 0.5, (runtime, weight_max, bits_here, got[0, :4], want[0, :4])  # the overflow zsad avoids


def _small_ov_model():
    ov = pytest.importorskip("openvino")
    import openvino.opset13 as ops

    rng = np.random.default_rng(1)
    x = ops.parameter([1, 16, K], np.float32, name="x")
    w1 = ops.constant((rng.standard_normal((64, K)) * 0.05).astype(np.float32))
    w2 = ops.constant((rng.standard_normal((N, 64)) * 0.05).astype(np.float32))
    h = ops.matmul(x, w1, False, True)
    return ov.Model([ops.matmul(ops.relu(h), w2, False, True)], [x])


def _int_weights(model) -> list[np.ndarray]:
    return [op.get_data() for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8")]


@pytest.mark.parametrize("bits,largest", [(7, 64), (8, 127)])
def test_nncf_quantises_with_the_weight_width_asked(bits, largest):
    """zsad's quantize_int8: 7 bits -> every int8 weight within +-64 (NNCF's overflow fix on every layer); 8 -> the
    full +-127 (per channel, so the largest weight of a channel reaches 127), on a two-layer model (NNCF's default
    keeps its first layer in 7 bits: the second must reach 127)."""
    pytest.importorskip("nncf")
    from zsad.export.openvino_export import quantize_int8

    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 16, K)).astype(np.float32)} for _ in range(4)]
    weights = _int_weights(quantize_int8(_small_ov_model(), feeds, [], True, bits))
    assert weights, "NNCF left no int8 weights"
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == largest


def _saved_int8_ir(tmp_path, bits):
    """A one-layer IR saved as zsad-export saves an int8 stage (rt_info included), with ``bits``-bit weights."""
    import openvino as ov
    import openvino.opset13 as ops

    from zsad.export.openvino_export import save

    x = ops.parameter([-1, 4], np.float32, name="x")
    y = ops.matmul(x, ops.constant(np.eye(4, 3, dtype=np.float32)), False, False)
    y.output(0).get_tensor().set_names({"y"})
    model = ov.Model([y], [x])
    save(model, tmp_path / "1", "int8", True, bits)
    return model


def _load_stage(tmp_path, served_imports, monkeypatch, flags):
    served_imports()
    import zsad.triton_models.stage_openvino.model as stage

    monkeypatch.setattr(stage, "cpu_flags", lambda: flags)
    cfg = {"parameters": {"inference_precision": {"string_value": "f32"}}, "input": [{"name": "x"}],
           "output": [{"name": "y"}]}
    model = stage.TritonPythonModel()
    model.initialize({"model_config": json.dumps(cfg), "model_name": "enc", "model_repository": str(tmp_path),
                      "model_version": "1"})
    return model


def test_served_stage_refuses_weights_that_overflow_its_cpu(tmp_path, served_imports, monkeypatch):
    pytest.importorskip("openvino")
    _saved_int8_ir(tmp_path, 8)
    with pytest.raises(RuntimeError, match=r"enc: this int8 model was quantised with 8-bit weights.*--portable-int8"):
        _load_stage(tmp_path, served_imports, monkeypatch, AVX2)
    assert _load_stage(tmp_path, served_imports, monkeypatch, AVX2 | {"avx512_vnni"}).compiled  # VNNI: loads
    _saved_int8_ir(tmp_path, 7)
    assert _load_stage(tmp_path, served_imports, monkeypatch, AVX2).compiled  # 7 bits: loads without VNNI


def test_served_stage_takes_exports_older_than_the_record_for_8_bit(tmp_path, served_imports, monkeypatch):
    """An int8 IR from before int8_weight_bits was recorded was quantised with NNCF's default, 8 bits: refused
    without VNNI; an fp32 IR (int8_quantized False) loads anywhere."""
    import openvino as ov

    for quantized, refused in (("True", True), ("False", False)):
        model = _saved_int8_ir(tmp_path / "fresh", 8)  # the rt_info below replaces what save wrote
        old = ov.Model(model.outputs, model.get_parameters())
        old.set_rt_info(quantized, ["zsad", "int8_quantized"])
        ov.save_model(old, str(tmp_path / "1" / "model.xml"), compress_to_fp16=False)
        assert not ov.Core().read_model(str(tmp_path / "1" / "model.xml")).has_rt_info(["zsad", "int8_weight_bits"])
        if refused:
            with pytest.raises(RuntimeError, match="8-bit weights"):
                _load_stage(tmp_path, served_imports, monkeypatch, AVX2)
        else:
            assert _load_stage(tmp_path, served_imports, monkeypatch, AVX2).compiled


def test_int8_weights_choice_follows_the_cpu(monkeypatch):
    import zsad.cpu
    from zsad.export.openvino_export import int8_weights_choice

    monkeypatch.setattr(zsad.cpu, "int8_weight_bits_here", lambda: 7)
    assert int8_weights_choice(False)["bits"] == 7 and "no VNNI" in int8_weights_choice(False)["reason"]
    monkeypatch.setattr(zsad.cpu, "int8_weight_bits_here", lambda: 8)
    assert int8_weights_choice(False)["bits"] == 8 and "--portable-int8" in int8_weights_choice(False)["reason"]
    assert int8_weights_choice(True)["bits"] == 7


def test_vnni_flags_are_oneDNN_int32_accumulating_isas():
    """Each flag named here is one /proc/cpuinfo spells (a typo would make every VNNI CPU look unsafe)."""
    from zsad.triton_models.zsad_common.int8 import ONEDNN_GATED

    assert VNNI_FLAGS <= ONEDNN_GATED


def test_portable_int8_needs_an_int8_openvino_precision(tmp_path):
    from zsad import ZsadError
    from zsad.export.exporter import ExportOptions, export_model

    for backend, precision in (("python-openvino", "fp32"), ("openvino", "fp32"), ("onnxruntime", "fp32")):
        with pytest.raises(ZsadError, match="--portable-int8 sets the width of int8 weights"):
            export_model(ExportOptions(model="bagclip", profile="tiny", backend=backend, precision=precision,
                                       portable_int8=True, out=tmp_path / "r"), log=lambda *a: None)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bits,largest", [(7, 64), (8, 127)])
def test_ort_int8_quantises_with_the_weight_width_of_this_cpu(tmp_path, monkeypatch, bits, largest):
    """zsad-bench's ort-int8: ORT's quantize_static with reduce_range (7-bit weights) exactly where zsad.cpu says
    this CPU has no VNNI (faked both ways here), read back from the written QDQ model's int8 weights."""
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import zsad.cpu
    from zsad.export.runtimes.onnx_runtime import quantize_static_int8

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((K, N)) * 0.05).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, N])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "f.onnx")
    monkeypatch.setattr(zsad.cpu, "int8_weight_bits_here", lambda: bits)
    feeds = [{"x": rng.standard_normal((4, K)).astype(np.float32)} for _ in range(3)]
    out = quantize_static_int8(tmp_path / "f.onnx", tmp_path / "q" / "q.onnx", feeds, [])
    ints = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer if t.data_type == TensorProto.INT8
            and len(t.dims) == 2]
    assert ints and int(np.abs(ints[0].astype(np.int32)).max()) == largest
