"""fp16 / bf16 on the CPU (issue 26 item 2), before a GPU sees them.

1. Targeted inputs, one per op kept in fp32 under autocast (zsad.modules.precision), each against a float64 (or
   constructed) reference: the kNN similarity and its 2^-14 rounding, the temperature-scaled cosines of every head,
   the Gaussian smoothing. Each fails without its fix (tools/mutants.toml, area "half-precision").
2. Every method's stage chain under ``torch.autocast("cpu", fp16 / bf16)`` against fp32 at the paper's widths
   (ViT-L-14-336: 1024 / 16 heads, patch 14, 518 px; SOWA 336 px) with two vision blocks, by the GPU tests' comparison
   (tests/test_chain_gpu.py: TOL per dtype, max relative error). The full paper profile runs in
   ``python -m zsad.bench.half_precision`` (results under bench/results/).
3. The fp16 ONNX (``zsad-export --fp16``, zsad.export.fp16) on ONNX Runtime's CPU provider: every converted stage loads,
   keeps its fp32 inputs / outputs and passes the export's fp16 parity gate (parity.FP16_TOL) against the torch chain.
"""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import zsad.methods as M
from zsad.bench.half_precision import TOL, compare_method, shallow_config, shallow_overrides

HALF = [torch.float16, torch.bfloat16]
HALF_IDS = ["fp16", "bf16"]


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype)


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def _two_cosines(n, d, c, deltas, seed=0):
    """Unit rows z_i (n of them, width d) and unit text rows t_0, t_1 with cos(z_i, t_0) = c and cos(z_i, t_1) =
    c + deltas[i] exactly (float64), the whole space rotated at random so every product involves all d columns."""
    z = np.zeros((n, d))
    t = np.zeros((2, d))
    t[0, 0] = t[1, 1] = 1.0
    for i, delta in enumerate(deltas):
        z[i, 0], z[i, 1] = c, c + delta
        z[i, 2 + i % (d - 2)] = math.sqrt(1.0 - c * c - (c + delta) ** 2)
    q = _rotation(d, seed)
    return z @ q, t @ q


# -- 1. targeted inputs --------------------------------------------------------------------------------------------
def _spaced_neighbours(groups=4, cands=16, d=128, seed=0):
    """Anchor g and its candidates j = 0..cands-1 (indices after it) at cosine 0.5 + j 2^-13 exactly: on the 2^-14
    grid (so the fp32 selection keeps them apart), but inside one bf16 step (2^-8) and four per fp16 step (2^-11)
    near 0.5, where rounding ties them and the lowest index wins. Each anchor's true 8 neighbours are its last 8."""
    n = groups * (cands + 1)
    x = np.zeros((n, d))
    for g in range(groups):
        a = g * (cands + 1)
        x[a, a] = 1.0
        for j in range(cands):
            b = 0.5 + j * 2.0 ** -13
            x[a + 1 + j, a] = b
            x[a + 1 + j, a + 1 + j] = math.sqrt(1 - b * b)
    anchors = [g * (cands + 1) for g in range(groups)]
    expected = [set(range(a + 1 + cands - 8, a + 1 + cands)) for a in anchors]
    return torch.from_numpy((x @ _rotation(d, seed))[None].astype(np.float32)), anchors, expected


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_knn_similarity_and_selection_stay_fp32_under_autocast(dtype):
    """Without autocast off in cosine_similarity_matrix, the Gram runs in half precision although its inputs are fp32:
    bf16 ties all 16 candidates (the 8 lowest indices win: none right), fp16 swaps some."""
    from zsad.modules.graph import cosine_similarity_matrix, knn_select

    x, anchors, expected = _spaced_neighbours()
    ref = torch.from_numpy(np.asarray(x, np.float64)).squeeze(0)
    ref = ref / ref.norm(dim=-1, keepdim=True)
    with _autocast(dtype):
        sim = cosine_similarity_matrix(x)
        index = knn_select(x, 8, resolution_bits=14)
    assert sim.dtype == torch.float32
    assert (sim[0].double() - ref @ ref.T).abs().max() < 1e-6
    assert [set(index[0, a].tolist()) for a in anchors] == expected


def test_afclip_summed_cosines_at_temperature_stay_fp32(tiny_method):
    """p = softmax(sum over the 12 sets of cos / 0.07): logits near 12 x 0.3 / 0.07 = 51, where bf16 steps by 0.25 and
    fp16 by 2^-5; the probability is sigmoid(12 delta / 0.07), delta = the cosine gap (float64 reference)."""
    m = tiny_method("afclip")
    e, sets, n = m.backbone.info.embed_dim, m.n_sets, 24
    deltas = np.linspace(-2e-3, 2e-3, n)
    z, t = _two_cosines(n, e, 0.3, deltas)
    z = torch.from_numpy(z).float()[None, None].expand(1, sets, n, e)  # the same tokens in every set
    ref = 1.0 / (1.0 + np.exp(-sets * deltas / m.config.temperature))
    for dtype in HALF:
        with _autocast(dtype):
            p = m.probabilities(z, torch.from_numpy(t).float())
        assert p.dtype == torch.float32 and np.abs(p[0].double().numpy() - ref).max() < 1e-4, dtype


@pytest.mark.parametrize("name", ["anomalyclip", "bagclip"])
def test_anomalyclip_cosines_at_temperature_stay_fp32(tiny_method, name):
    """layer_probs and image_logits: cos / 0.07 (logits near 3.6, bf16 steps 2^-6, fp16 2^-9) against float64."""
    m = tiny_method(name)
    e, g = m.backbone.info.embed_dim, m.backbone.info.grid
    n = g * g
    deltas = np.linspace(-3e-3, 3e-3, n)
    z, t = _two_cosines(n, e, 0.25, deltas)
    text = torch.from_numpy(t).float()
    zt = torch.from_numpy(z).float()
    ref_p = 1.0 / (1.0 + np.exp(-deltas / m.config.temperature))
    ref_logits = np.stack([np.full(n, 0.25), 0.25 + deltas], axis=-1) / m.config.temperature
    for dtype in HALF:
        with _autocast(dtype):
            probs = m.layer_probs(zt[None, None], text)  # [1, 1, 2, g, g]
            logits = m.image_logits(zt, text)
        assert np.abs(probs[0, 0, 1].flatten().double().numpy() - ref_p).max() < 1e-5, dtype
        assert logits.dtype == torch.float32 and np.abs(logits.double().numpy() - ref_logits).max() < 1e-4, dtype


def test_sowa_cosine_difference_stays_fp32(tiny_method):
    """SOWA's patch logit is cos_abnormal - cos_normal (no temperature): two cosines near 0.2 a few 1e-3 apart, which
    a half-precision matmul output rounds before the subtraction (bf16: 2^-10 steps, fp16: 2^-13)."""
    m = tiny_method("sowa")
    e, g = m.backbone.info.embed_dim, m.backbone.info.grid
    n = g * g
    deltas = np.linspace(-3e-3, 3e-3, n)
    z, t = _two_cosines(n, e, 0.2, deltas)
    text, zt = torch.from_numpy(t).float(), torch.from_numpy(z).float()
    ref_logits = np.stack([np.full(n, 0.2), 0.2 + deltas], axis=-1) / m.config.temperature
    for dtype in HALF:
        with _autocast(dtype):
            diff = m.layer_logits(zt[None, None], text)  # [1, 1, g, g]
            logits = m.image_logits(zt, text)
        assert np.abs(diff.flatten().double().numpy() - deltas).max() < 1e-6, dtype
        assert logits.dtype == torch.float32 and np.abs(logits.double().numpy() - ref_logits).max() < 1e-4, dtype


class _FixedRca(nn.Module):
    """Stands in for Bayes-PFL's RCA: returns the given (patches, refined text), whatever it is fed."""

    def __init__(self, patches, refined):
        super().__init__()
        self.patches, self.refined = patches, refined

    def forward(self, taps, text):
        return self.patches, self.refined


def test_bayespfl_cosines_at_temperature_stay_fp32():
    """Image and pixel logits exp(tau) cos (tau = ln(1/0.07) at init): logits near 4.3 against float64."""
    m = M.create("bayespfl", "tiny").eval()
    e, g = m.backbone.info.embed_dim, m.backbone.info.grid
    n = g * g
    deltas = np.linspace(-3e-3, 3e-3, n)
    z, t = _two_cosines(n, e, 0.3, deltas)
    zt, text = torch.from_numpy(z).float(), torch.from_numpy(t).float()
    scale = math.exp(float(m.pfl.tau_pixel.detach()))
    m.pfl.class_mapping = nn.Identity()
    m.pfl.rca = _FixedRca(zt[None, None], text[None, None])  # patches [1,1,N,E], refined text [1,1,2,E]
    ref = np.stack([np.full(n, 0.3), 0.3 + deltas], axis=-1) * scale  # [N, 2]
    taps = torch.zeros(1, 1, n, m.backbone.info.width)
    for dtype in HALF:
        with torch.no_grad(), _autocast(dtype):
            pixel = m.pixel_logits(taps, text[None])  # [1, 1, 2, g, g]
            image = m.image_logits(zt, taps, text[None].expand(n, 2, e), fused=False)  # [N, 2]
        got = pixel[0, 0].flatten(1).T.double().numpy()
        assert np.abs(got - ref).max() < 1e-4, dtype
        assert image.dtype == torch.float32 and np.abs(image.double().numpy() - ref).max() < 1e-4, dtype


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_gaussian_smoothing_stays_fp32(dtype):
    """A map of values near 2 (four summed probabilities) blurred under autocast equals scipy's float64 filter: in
    half precision the values round to 2^-6 (bf16) / 2^-9 (fp16) steps and the weights no longer sum to 1."""
    from scipy.ndimage import gaussian_filter

    from zsad.postprocess import gaussian_blur

    x = 2.0 + 0.01 * torch.rand(2, 48, 48, generator=torch.Generator().manual_seed(0))
    ref = np.stack([gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in x.numpy().astype(np.float64)])
    with _autocast(dtype):
        y = gaussian_blur(x, 4.0)
    assert y.dtype == torch.float32 and np.abs(y.double().numpy() - ref).max() < 1e-5


def test_residual_stream_stays_fp32_under_autocast():
    """An outlier channel of 300 in the residual stream (ln_pre's bias; CLIP's residual carries outlier channels): with
    the stream in half precision every residual add rounds it (bf16 steps of 2 at 256..512: errors of 1.4 measured,
    fp16 0.2); kept in fp32, only the blocks' own half-precision outputs differ from the fp32 run."""
    m = M.create("anomalyclip", "tiny").eval()
    bb = m.backbone
    with torch.no_grad():
        bb.visual.ln_pre.bias[5] = 300.0
    x = torch.randn(1, 3, bb.info.image_size, bb.info.image_size, generator=torch.Generator().manual_seed(0))
    taps = list(range(1, bb.info.layers + 1))
    with torch.inference_mode():
        _, ref = bb.forward_taps(x, taps, mode="dual", start=2)
        assert ref[..., 5].abs().min() > 290  # the outlier is in the tapped residual stream
        for dtype in HALF:
            with _autocast(dtype):
                _, got = bb.forward_taps(x, taps, mode="dual", start=2)
            assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.05, dtype


def test_flow_noise_scale_does_not_overflow_fp16():
    """q0's std = exp(log_var / 2): at log_var = 24 (std 1.6e5) fp16 overflows to inf (65504 is its largest value)."""
    from zsad.modules.flows import ConditionalPlanarFlow

    flow = ConditionalPlanarFlow(cond_dim=8, width=16, length=2, hidden=8).eval()
    last = flow.encoder.log_var[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(48.0)  # log_var = 0.5 * 48 = 24
    cond = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu = flow.encoder.mu(cond).double()
        z0_ref = mu.unsqueeze(1) + noise.double() * math.exp(12.0)
        with _autocast(torch.float16):
            z, kl = flow(cond, noise)
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()
    # the planar steps move z0 by |u| <= a few units: z stays within 1e-3 relative of mu + noise * std
    assert ((z.double() - z0_ref).abs().max() / z0_ref.abs().max()) < 1e-3


# -- 2. every method's chain at the paper's widths, two vision blocks ------------------------------------------------
@pytest.fixture(scope="module")
def shallow_arch(tmp_path_factory):
    """image size -> an open_clip config at ViT-L-14-336's widths with two vision blocks (bench.half_precision)."""
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for size in (518, 336):
        out[size] = root / f"vit-1024-2block-{size}.json"
        out[size].write_text(json.dumps(shallow_config(2, size)))
    return out


def test_tolerances_are_the_gpu_tests():
    import test_chain_gpu

    assert TOL == test_chain_gpu.TOL


def test_adopted_selection_reruns_only_the_stages_after_it(tiny_method, monkeypatch):
    """compare_method's run on fp32's selection reuses the half chain up to the selecting stage: the stages after it
    run (on the adopted selection) and give what a whole second run gives; the stages before it do not run again."""
    import zsad.methods.stages as S
    from zsad.bench.half_precision import run_chain
    from zsad.data.feeds import synthetic_feed
    from zsad.export.parity import synthetic_images

    method = tiny_method("bagclip")
    stages = method.stages()
    feed = synthetic_feed(method, torch.from_numpy(synthetic_images(method.image_size, n=2)))
    got = run_chain(stages, feed, torch.bfloat16)
    # another valid selection (each patch's neighbours shifted by one patch), so the stages after it must change
    other = {"knn_index": (got["knn_index"] + 1) % got["knn_index"].shape[1]}
    whole = run_chain(stages, feed, torch.bfloat16, adopt=other)
    ran, torch_stage = [], S.torch_stage
    monkeypatch.setattr(S, "torch_stage", lambda st, inputs: ran.append(st.name) or torch_stage(st, inputs))
    fixed = run_chain(stages, feed, torch.bfloat16, adopt=other, reuse=got)
    names = [st.name for st in stages]
    assert ran == names[names.index("graph") + 1:]
    assert not torch.equal(whole["anomaly_map"], got["anomaly_map"])
    for key in ("score", "anomaly_map", "knn_index"):
        assert torch.equal(fixed[key], whole[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", M.available())
def test_chain_in_half_precision_within_the_gpu_tolerance(name, shallow_arch):
    """fp16 and bf16 autocast against fp32 on a synthetic image: finite, score and map within TOL. BAG-CLIP's
    selection is a step: its half-precision chain picks other neighbours where its features move a near-tie, so the
    tolerance applies with fp32's selection adopted after the graph stage, and the selection difference is reported."""
    from zsad.export.parity import synthetic_images

    size = 336 if name == "sowa" else 518
    method = M.create(name, "paper", **shallow_overrides(name, str(shallow_arch[size]), size)).eval()
    assert method.backbone.info.width == 1024 and method.backbone.info.grid == size // 14
    images = torch.from_numpy(synthetic_images(size, n=1))  # one: CPU fp16 / bf16 matmuls run ~40x slower than fp32
    for row in compare_method(method, images, per_stage=False, ops=False):
        assert row["finite"], row
        if "selections" in row:
            # measured on one image (Zen 3 EPYC): fp16 3, bf16 17 of 1369 neighbour sets differ, gaps <= 2.5e-4
            sel = row["selections"]["knn_index"]
            assert sel["differing"] < 0.05 * sel["rows"] and sel["max_gap"] < 1e-3, sel
            assert row["score_rel_on_fp32_selection"] <= row["tol"], row
            assert row["map_rel_on_fp32_selection"] <= row["tol"], row
        else:
            assert row["score_rel"] <= row["tol"] and row["map_rel"] <= row["tol"], row


# -- 3. the fp16 ONNX on ONNX Runtime's CPU provider -----------------------------------------------------------------
def _converted_chain(method, tmp_path):
    """Every stage exported (batch dynamic, up to 2) and converted by zsad.export.fp16, as ``zsad-export --fp16``."""
    import onnx

    from zsad.export.fp16 import convert_to_fp16
    from zsad.export.onnx_export import export_stage

    stages, paths = method.stages(), {}
    for st in stages:
        path = export_stage(st, tmp_path / st.name / "model.onnx", max_batch=2)
        io32 = {v.name: v.type.tensor_type.elem_type for v in [*onnx.load(str(path)).graph.input,
                                                               *onnx.load(str(path)).graph.output]}
        paths[st.name] = convert_to_fp16(path)
        model = onnx.load(str(paths[st.name]))
        io16 = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
        assert io16 == io32, st.name  # the served configs and clients see the fp32 / int64 tensors they declared
        halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
        if st.selections:  # a selecting stage stays fp32 as a whole
            assert not halves, st.name
        elif st.name == "encoder":
            assert halves, st.name
    return stages, paths


@pytest.mark.slow
@pytest.mark.parametrize("name", M.available())
def test_fp16_onnx_chain_passes_the_fp16_gate_on_cpu(tmp_path, tiny_method, name):
    """The converted stages on ONNX Runtime's CPU provider against the torch chain, by the export's fp16 gate (every
    stage on random and real inputs, batch 1 and 2, then the chain end to end, selections by their tie rule). Before
    the conversion fixes, BAG-CLIP's graph / head and Bayes-PFL's prompt head did not load (type errors) and
    AnomalyCLIP's patch_map left the head as fp16."""
    from zsad.data.feeds import synthetic_feed
    from zsad.export import parity
    from zsad.export.fp16 import cpu_runner

    method = tiny_method(name)
    stages, paths = _converted_chain(method, tmp_path)
    images = torch.from_numpy(parity.synthetic_images(method.image_size, n=2))
    feed = {k: v.numpy() for k, v in synthetic_feed(method, images).items()}
    rows = parity.check_stages(stages, {n: cpu_runner(p) for n, p in paths.items()}, feed, parity.FP16_TOL)
    assert rows and all(r.ok for r in rows)


@pytest.mark.slow
def test_fp16_onnx_keeps_the_end_token_ids_exact(tmp_path, tiny_method):
    """Bayes-PFL finds the end token as the argmax of the class-token ids cast to float: the start token 49406 and the
    end token 49407 are one apart, and fp16 rounds both to 49408 (steps of 32 there), so an fp16 ArgMax picks the
    start token. The converted prompt head must return the fp32 graph's eot_index for every class name, run by ONNX's
    reference evaluator (every node in its declared dtype, as a runtime with fp16 kernels runs it) and by ONNX
    Runtime's CPU provider (whose fp32 fallback removes the cast pair around an fp16 ArgMax, so it cannot see this)."""
    from onnx.reference import ReferenceEvaluator

    from zsad.export.fp16 import convert_to_fp16, cpu_runner
    from zsad.export.onnx_export import export_stage

    method = tiny_method("bayespfl")
    st = next(s for s in method.stages() if s.name == "prompt_head")
    runner32 = cpu_runner(export_stage(st, tmp_path / "fp32" / "model.onnx", max_batch=4))
    path16 = convert_to_fp16(export_stage(st, tmp_path / "fp16" / "model.onnx", max_batch=4))
    names = ["object", "bottle", "printed circuit board", "metal nut"]
    tokens = method.encode_class_names(names).numpy()
    assert (tokens.max(axis=1) == 49407).all() and (tokens[:, 0] == 49406).all()
    glob = np.random.default_rng(0).standard_normal((4, method.backbone.info.embed_dim)).astype(np.float32)
    feed = {"global_embedding": glob, "class_tokens": tokens}
    expected = tokens.argmax(axis=1) + method.prompt_length  # position of the end token in the assembled sequence
    assert (runner32(feed)["eot_index"] == expected).all()
    assert (cpu_runner(path16)(feed)["eot_index"] == expected).all()
    assert (ReferenceEvaluator(str(path16)).run(["eot_index"], feed)[0] == expected).all()


def test_fp16_onnx_graph_stage_selects_in_fp32(tmp_path):
    """BAG-CLIP's graph stage (SAFR off, one tap: the features are the tap) converted for --fp16 on the spaced
    candidates of test 1: fp32 similarities rounded at 2^-14 pick each anchor's true 8 neighbours; an fp16 Gram
    (spacing 2^-11 near 0.5) would tie them and pick by index."""
    from zsad.export.fp16 import convert_to_fp16, cpu_runner
    from zsad.export.onnx_export import export_stage

    m = M.create("bagclip", "tiny", taps=[1], dual_start=1, graph={"safr": False}).eval()
    st = next(s for s in m.stages() if s.name == "graph")
    n, d = m.backbone.info.grid ** 2, m.backbone.info.width
    x, anchors, expected = _spaced_neighbours(d=d)
    taps = np.zeros((1, 1, n, d), np.float32)
    taps[0, 0, :x.shape[1]] = x[0].numpy()
    rest = np.random.default_rng(1).standard_normal((n - x.shape[1], d))  # other patches: random directions
    taps[0, 0, x.shape[1]:] = rest / np.linalg.norm(rest, axis=1, keepdims=True)
    index = cpu_runner(convert_to_fp16(export_stage(st, tmp_path / "graph" / "model.onnx", max_batch=2)))(
        {"taps": taps})["knn_index"]
    assert [set(index[0, a].tolist()) for a in anchors] == expected


def test_conditional_flow_samples_stay_fp32_under_autocast():
    """Bayes-PFL's image-specific flow at the paper's widths (E = W = 768, K = 10 steps, hidden 512, released init)
    under autocast against the same flow in float64: in half precision the planar steps amplified the rounding of the
    amortised u, w (bf16: 0.26%) to 2.3% on the samples (fp16: 0.4%); now 8e-7."""
    import copy

    from zsad.modules.flows import ConditionalPlanarFlow

    torch.manual_seed(0)
    flow = ConditionalPlanarFlow(768, 768, length=10, hidden=512).eval()
    cond = torch.randn(2, 768, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 10, 768, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = copy.deepcopy(flow).double()(cond.double(), noise.double())[0].numpy()
        for dtype in HALF:
            with _autocast(dtype):
                z, kl = flow(cond, noise)
            assert z.dtype == torch.float32 and torch.isfinite(kl).all()
            assert np.abs(z.double().numpy() - ref).max() / np.abs(ref).max() < 1e-5, dtype


def test_report_lists_each_row_and_the_fp32_fallbacks_and_never_overwrites(tmp_path):
    """write_report: one table row per method x precision with its numbers, the compute kernels that ran in fp32,
    and a second write to the same stem refused with the first files intact."""
    from zsad.bench.half_precision import write_report

    ops = {"half": {"addmm": 10}, "fp32": {"bmm": 3, "add": 5}, "mixed": {"layer_norm": 2}, "fp32_compute": ["bmm"]}
    row = {"precision": "bf16", "tol": 0.1, "score_rel": 0.0123, "map_rel": 0.0456, "finite": True, "fp32_s": 1.5,
           "half_s": 0.7, "selections": {"knn_index": {"rows": 64, "differing": 3, "max_gap": 2.5e-4}},
           "score_rel_on_fp32_selection": 0.001, "map_rel_on_fp32_selection": 0.002,
           "stages": {"encoder": {"patch": 0.03}, "head": {"score": 0.01}}, "ops": ops}
    rec = {"method": "bagclip", "profile": "paper", "shallow_blocks": 0, "batch": 2, "cpu": "Test CPU",
           "cpu_flags": ["amx_bf16"], "threads": 2, "torch": "2.13.0", "peak_rss_gb": 9.5, "rows": [row]}
    json_path, md_path = write_report([rec], tmp_path / "r", "python -m zsad.bench.half_precision --methods bagclip")
    md = md_path.read_text()
    assert ("| bagclip | bf16 | 0.1 | 0.012 | 0.046 | True | 3 / 64 (0.00025) | 0.001 / 0.002 | encoder.patch 0.03 "
            "| 1.5 | 0.7 |") in md
    assert "- bagclip bf16: bmm x3; half kernels 10, fp32 8, mixed 2" in md
    assert "Test CPU (2 threads; flags amx_bf16)" in md and "bagclip 9.5" in md
    assert json.loads(json_path.read_text())["records"][0]["rows"][0]["map_rel"] == 0.0456
    before = md_path.read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        write_report([rec], tmp_path / "r", "again")
    assert md_path.read_bytes() == before
