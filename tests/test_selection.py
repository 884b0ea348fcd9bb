"""Discontinuous steps (zsad.selection) and the gate's tie rule (export/parity.py).

The rule is checked against a brute force over perturbed scores written from its definition; the gate on toy chains
whose 'exported' runners flip a near-tie, swap a far candidate, use a wrong k / similarity / rounding, or add a
continuous error after the selection; the real BAG-CLIP graph stage (tiny, trained a few epochs) under the same
mutations; and a paper-width graph (1369 patches of width 1024, k = 8) exported to ONNX Runtime on features built to
sit on near-ties of the 2^-14 rounding.
"""
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import zsad.methods as M
from zsad.export import parity
from zsad.methods.stages import Stage
from zsad.selection import TopKSelection


# -- the rule against a brute force ----------------------------------------------------------------------------------
def _rule(scores, k, bits, row, exclude_self=True):
    """The top-k of one row by the definition: round half to even at 2^-bits, then higher first, lower index first."""
    q = [round(v * 2 ** bits) / 2 ** bits if bits else v for v in scores]
    cols = [j for j in range(len(scores)) if not (exclude_self and j == row)]
    return frozenset(sorted(cols, key=lambda j: (-q[j], j))[:k])


def _explained_brute(scores, chosen, k, bits, row, eps):
    """Whether some perturbation of every score by -eps, 0 or +eps makes ``chosen`` the rule's top-k."""
    for deltas in itertools.product((-eps, 0.0, eps), repeat=len(scores)):
        if _rule([s + d for s, d in zip(scores, deltas, strict=True)], k, bits, row) == chosen:
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("bits", [0, 4])
def test_tie_rule_equals_a_brute_force_over_perturbations(bits):
    rng = np.random.default_rng(bits)
    m, k, eps = 6, 2, 0.02
    spec = TopKSelection("x", lambda t: t, k, bits)
    seen = {"near-tie": 0, "unexplained": 0}  # differing rows of each kind met
    for _ in range(120):
        # scores on a coarse grid plus offsets of the order of eps: many near-ties, many far apart
        s = np.round(rng.uniform(-1, 1, (1, m, m)) * 4) / 4 + rng.uniform(-0.03, 0.03, (1, m, m))
        ref = np.array([[sorted(_rule(list(s[0, r]), k, bits, r)) for r in range(m)]])
        # candidates: the rule's choice on perturbed scores (often a valid near-tie) or a random pair
        got = ref.copy()
        for r in range(m):
            if rng.random() < 0.5:
                got[0, r] = sorted(_rule(list(s[0, r] + rng.uniform(-eps, eps, m)), k, bits, r))
            else:
                got[0, r] = sorted(rng.choice([j for j in range(m) if j != r], k, replace=False))
        c = spec.check(s, ref, got, eps)
        explained = [_explained_brute(list(s[0, r]), frozenset(got[0, r]), k, bits, r, eps) for r in range(m)]
        differing = [set(got[0, r]) != set(ref[0, r]) for r in range(m)]
        assert c.differing == sum(differing)
        assert c.unexplained == sum(d and not e for d, e in zip(differing, explained, strict=True))
        seen["near-tie"] += sum(d and e for d, e in zip(differing, explained, strict=True))
        seen["unexplained"] += c.unexplained
        # the largest gap crossed: best left-out score minus worst chosen one, over the differing rows
        gaps = [max(s[0, r, j] for j in range(m) if j != r and j not in got[0, r]) - min(s[0, r, got[0, r]])
                for r in range(m) if differing[r]]
        assert c.max_gap == pytest.approx(max(gaps, default=0.0))
    assert seen["near-tie"] >= 10 and seen["unexplained"] >= 10, seen  # both outcomes met, many times


def test_tie_rule_hand_cases():
    step = 2.0 ** -14
    spec = TopKSelection("x", lambda t: t, 1, 14)
    # row 0 chooses between column 1 and column 2; column 3 is far below
    base = 0.5 + 0.5 * step  # a rounding boundary: just below rounds to 0.5, just above to 0.5 + step
    s = np.array([[[0.0, base - 3e-8, base - 1e-8, 0.1], [0.2, 0.0, 0.1, 0.3],
                   [0.2, 0.3, 0.0, 0.1], [0.3, 0.2, 0.1, 0.0]]])
    ref = np.array([[[1], [3], [1], [0]]])  # both round to 0.5: the lower index (1) wins
    flipped = ref.copy()
    flipped[0, 0] = 2  # another runtime rounded column 2 (1e-8 below the boundary) up: a near-tie
    c = spec.check(s, ref, flipped, eps=1e-7)
    assert (c.differing, c.unexplained) == (1, 0) and c.max_gap == pytest.approx(-2e-8)
    assert spec.check(s, ref, flipped, eps=5e-9).unexplained == 1  # too small to reach the boundary
    far = ref.copy()
    far[0, 0] = 3  # 0.1 instead of ~0.5: no near-tie
    c = spec.check(s, ref, far, eps=1e-4)
    assert c.unexplained == 1 and "column 1" in c.first_bad and "column 3" in c.first_bad
    for bad, why in ((np.array([[[0], [3], [1], [0]]]), "itself"), (np.array([[[7], [3], [1], [0]]]), "outside"),
                     (np.array([[[1, 1], [3, 0], [1, 0], [0, 1]]]), "shape")):
        c = spec.check(s, ref, bad, eps=1e-4)
        assert not c.ok and why in c.first_bad
    assert not spec.check(s, ref, ref.astype(np.float32), eps=1e-4).ok  # indices must be integers
    two = TopKSelection("x", lambda t: t, 2, 0)
    dup = np.array([[[1, 1], [3, 0], [1, 0], [0, 1]]])
    assert "twice" in two.check(s, np.array([[[1, 2], [3, 0], [1, 0], [0, 1]]]), dup, 1e-4).first_bad


# -- the gate on a toy chain -------------------------------------------------------------------------------------------
class _Select(nn.Module):
    """x [B,N,D] -> (x, each row's most similar other row by dot product [B,N,1], lowest index first among ties)."""

    def forward(self, x):
        sim = x @ x.transpose(-1, -2)
        sim = sim.masked_fill(torch.eye(x.shape[1], dtype=torch.bool), float("-inf"))
        return x, torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., :1]


class _Gather(nn.Module):
    """(x, idx) -> per row, 1 + 100 x its neighbour's second feature (a map that moves when idx moves)."""

    def forward(self, x, idx):
        return 1.0 + 100.0 * torch.stack([x[b, idx[b, :, 0], 1] for b in range(x.shape[0])])


def _toy_stages():
    sel = TopKSelection("x", lambda x: x @ x.transpose(-1, -2), 1, 0)
    return [Stage("select", _Select(), {"images": ("B", 5, 3)}, {"x": ("B", 5, 3), "idx": ("B", 5, 1)},
                  dtypes={"idx": torch.int64}, selections={"idx": sel}),
            Stage("head", _Gather(), {"x": ("B", 5, 3), "idx": ("B", 5, 1)}, {"out": ("B", 5)},
                  dtypes={"idx": torch.int64}, index_bounds={"idx": 5})]


def _toy_images():
    """Row 0's best neighbour is row 2 (dot 0.950001), 1e-6 ahead of row 1 (0.95): a near-tie; the rest are apart."""
    x = np.array([[1.0, 0.0, 0.0], [0.95, 0.3, 0.0], [0.950001, 0.0, 0.3], [0.1, 0.9, 0.0], [0.0, 0.1, 0.9]])
    return np.stack([x, x[::-1].copy()])


def _toy_runners(select_fn, head_shift=0.0):
    head_module = _toy_stages()[1].module

    def select(feed):
        x = np.asarray(feed["images"], np.float64)
        return {"x": x, "idx": select_fn(x)}

    def head(feed):
        out = parity.torch_runner(head_module, ["x", "idx"], ["out"])(feed)["out"]
        return {"out": out + head_shift * np.abs(out).max()}

    return {"select": select, "head": head}


def _torch_select(x, k=1):
    sim = np.einsum("bnd,bmd->bnm", x, x)
    sim[:, np.arange(x.shape[1]), np.arange(x.shape[1])] = -np.inf
    return np.argsort(-sim, axis=-1, kind="stable")[..., :k]


def _near_tie_flip(x):
    """What another runtime may do: row 0 of the first image takes its second best, 1e-6 behind the best."""
    idx = _torch_select(x)
    if np.array_equal(x[0, 0], [1.0, 0.0, 0.0]):  # the toy images (the gate's random inputs are left alone)
        idx[0, 0, 0] = 1
    return idx


def test_gate_takes_a_near_tie_flip_and_compares_the_rest_on_it():
    stages, images = _toy_stages(), _toy_images()
    torch_idx = _torch_select(images)
    assert torch_idx[0, 0, 0] == 2 and _near_tie_flip(images)[0, 0, 0] == 1
    rows = parity.check_stages(stages, _toy_runners(_near_tie_flip), {"images": images}, 1e-4)
    sel = [r for r in rows if r.tensor == "idx (selection)" and r.case == "images b=2"]
    assert sel and sel[0].differing == 1 and sel[0].ok and sel[0].max_abs == pytest.approx(1e-6, rel=0.05)
    e2e = {r.tensor: r for r in rows if r.stage == "end-to-end" and r.case == "images b=2"}
    assert e2e["idx (selection)"].differing == 1 and e2e["out"].max_rel < 1e-6  # on the flipped choice
    # the flip moves the output far beyond the tolerance: against torch's own choice the chain would fail
    head = parity.torch_runner(stages[1].module, ["x", "idx"], ["out"])
    ref, got = head({"x": images, "idx": torch_idx})["out"], head({"x": images, "idx": _near_tie_flip(images)})["out"]
    assert parity.compare("e", "c", "out", ref, got, 1e-4).max_rel > 1e-2
    # the same flip where the two candidates are 1e-3 apart is no near-tie at 1e-4
    apart = images.copy()
    apart[:, 2, 0] = apart[:, 2, 0] + 1e-3 - 1e-6
    with pytest.raises(parity.ParityError, match="no near-tie"):
        parity.check_stages(stages, _toy_runners(_near_tie_flip), {"images": apart}, 1e-4)


def test_gate_refuses_what_no_near_tie_explains():
    stages, images = _toy_stages(), _toy_images()

    def far_swap(x):  # row 3 takes row 0 (dot 0.1) instead of its best, row 1 (0.365)
        idx = _torch_select(x)
        idx[0, 3, 0] = 0
        return idx

    with pytest.raises(parity.ParityError, match=r"stage 'select', tensor 'idx \(selection\)'.*no near-tie"):
        parity.check_stages(stages, _toy_runners(far_swap), {"images": images}, 1e-4)
    with pytest.raises(parity.ParityError, match=r"idx \(selection\).*shape"):  # a wrong k: two neighbours
        parity.check_stages(stages, _toy_runners(lambda x: _torch_select(x, k=2)), {"images": images}, 1e-4)

    def wrong_similarity(x):  # a sign error: the least similar row instead of the most similar
        sim = np.einsum("bnd,bmd->bnm", x, x)
        sim[:, np.arange(5), np.arange(5)] = np.inf
        return np.argsort(sim, axis=-1, kind="stable")[..., :1]

    assert not np.array_equal(wrong_similarity(images), _torch_select(images))
    with pytest.raises(parity.ParityError, match=r"idx \(selection\)"):
        parity.check_stages(stages, _toy_runners(wrong_similarity), {"images": images}, 1e-4)
    # a continuous error after the selection is caught on identical inputs, with or without a flip
    for select in (_torch_select, _near_tie_flip):
        with pytest.raises(parity.ParityError, match=r"stage 'head', tensor 'out'"):
            parity.check_stages(stages, _toy_runners(select, head_shift=2e-4), {"images": images}, 1e-4)


# -- the real BAG-CLIP graph stage, trained ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_bag(trained_run):
    from zsad.checkpoint import load_checkpoint

    return load_checkpoint(trained_run("bagclip"))[0].eval()


def _graph_runner(method, k=None, bits=None, similarity=None):
    """The torch graph stage with one thing changed: what a buggy export would compute."""
    from zsad.kernels import knn_graph as KG

    g = method.config.graph

    def run(feed):
        with torch.no_grad():
            fused = method.fuse(torch.from_numpy(feed["taps"]))
            sim = (similarity or KG.cosine_similarity_matrix)(fused)
            sim = KG.quantize_similarity(sim, g.sim_resolution_bits if bits is None else bits)
            kk = k or g.knn_k
            idx = KG.mask_to_index(KG.knn_mask(sim, kk), kk)
        return {"fused": fused.numpy(), "knn_index": idx.numpy()}

    return run


def _torch_runners(method):
    return {st.name: parity.torch_runner(st.module, list(st.inputs), list(st.outputs)) for st in method.stages()}


@pytest.mark.slow
def test_trained_bagclip_gate_bites_on_wrong_k_similarity_and_rounding(trained_bag):
    stages = trained_bag.stages()
    feed = {"images": parity.synthetic_images(trained_bag.image_size, n=2)}
    rows = parity.check_stages(stages, {**_torch_runners(trained_bag), "graph": _graph_runner(trained_bag)}, feed,
                               1e-4)
    assert all(r.ok for r in rows) and max(r.max_rel for r in rows) < 1e-5  # the faithful stand-in passes
    for mutation, match in ((dict(k=trained_bag.config.graph.knn_k + 1), "knn_index"),
                            (dict(similarity=lambda f: f @ f.transpose(-1, -2)), "no near-tie"),
                            (dict(bits=8), "no near-tie")):
        runners = {**_torch_runners(trained_bag), "graph": _graph_runner(trained_bag, **mutation)}
        with pytest.raises(parity.ParityError, match=match) as err:
            parity.check_stages(stages, runners, feed, 1e-4)
        assert err.value.row.stage == "graph", mutation


# -- paper width: 1369 patches of width 1024, k = 8, features on near-ties, real ONNX Runtime --------------------------
def _paper_width_bagclip(tmp_path):
    """BAG-CLIP with a one-block ViT of width 1024 at 518 px (grid 37: N = 1369), one tap and SAFR off, so the graph
    stage's F is the tap itself and the test can place the features."""
    cfg = {"embed_dim": 768,
           "vision_cfg": {"image_size": 518, "layers": 1, "width": 1024, "head_width": 64, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 3}}
    path = tmp_path / "vit-1024-1block.json"
    path.write_text(json.dumps(cfg))
    return M.create("bagclip", "tiny", backbone={"arch": str(path), "image_size": 518}, taps=[1], dual_start=1,
                    graph={"safr": False}).eval()


def _near_tie_features(n=1369, d=1024, groups=100, seed=0):
    """Features whose similarities sit exactly on the 2^-14 rounding boundaries, then rotated at random.

    Group g (10 patches in its own 10 dimensions): an anchor e_0 and nine members b e_0 + sqrt(1 - b^2) e_j with
    b = (8192 + 1/2) 2^-14: each anchor has nine candidates at similarity b exactly, halfway between two rounding
    steps, for its eight neighbours (and members meet each other at b^2, also 2e-5 steps from a boundary). A random
    rotation keeps every similarity but spreads each vector over all 1024 dimensions, so every runtime's fp32 GEMM
    adds its own ~1e-7 and rounds some of them up, others down: which eight an anchor keeps depends on the runtime.
    The remaining patches are random directions (similarities ~0.03)."""
    rng = np.random.default_rng(seed)
    b = (8192 + 0.5) * 2.0 ** -14
    x = np.zeros((n, d))
    for g in range(groups):
        base = 10 * g
        x[base, base] = 1.0
        for j in range(1, 10):
            x[base + j, base] = b
            x[base + j, base + j] = np.sqrt(1 - b * b)
    x[10 * groups:] = rng.standard_normal((n - 10 * groups, d)) / np.sqrt(d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (x @ q).astype(np.float32)


@pytest.mark.slow
def test_paper_width_graph_on_near_ties_passes_the_gate_in_onnx_runtime(tmp_path):
    from zsad.export.onnx_export import export_stage

    m = _paper_width_bagclip(tmp_path)
    stages = [st for st in m.stages() if st.name in ("graph", "head")]
    assert stages[0].outputs["knn_index"] == ("B", 1369, 8) and stages[0].outputs["fused"] == ("B", 1369, 1024)
    runners = {}
    for st in stages:
        runners[st.name] = parity.ort_runner(export_stage(st, tmp_path / st.name / "model.onnx", max_batch=2))
    taps = np.stack([_near_tie_features(seed=s)[None] for s in (0, 1)])  # [2, 1 tap, 1369, 1024]
    glob = np.random.default_rng(2).standard_normal((2, 768)).astype(np.float32)
    rows = parity.check_stages(stages, runners, {"taps": taps, "global_embedding": glob}, 1e-4)
    sel = [r for r in rows if r.tensor == "knn_index (selection)" and r.case == "images b=2"]
    # ONNX Runtime's GEMM broke some near-ties the other way (the construction's point), all within the rule
    assert sel[0].differing > 0 and sel[0].ok, sel[0]
    assert all(r.ok for r in rows)
    patch = [r for r in rows if r.stage == "head" and r.tensor == "patch_map"]
    assert patch and all(r.max_rel <= 1e-4 for r in patch)
    # what the old gate did: the map on torch's own neighbours against the exported chain's fails the tolerance
    graph_t, head_t = (parity.torch_runner(st.module, list(st.inputs), list(st.outputs)) for st in stages)
    mine, theirs = graph_t({"taps": taps}), runners["graph"]({"taps": taps})
    assert (np.sort(mine["knn_index"], -1) != np.sort(theirs["knn_index"], -1)).any(-1).sum() > 100
    own = head_t({"global_embedding": glob, "taps": taps, **mine})["patch_map"]
    exported = runners["head"]({"global_embedding": glob, "taps": taps, **theirs})["patch_map"]
    assert parity.compare("e", "c", "patch_map", own, exported, 1e-4).max_rel > 1e-4


# -- served stage models check the indices they are sent ---------------------------------------------------------------
@pytest.mark.slow
def test_head_models_bound_the_neighbour_indices(tmp_path, tiny_method, served_imports):
    """A client can call bagclip_head directly: knn_index values must lie in 0..N-1. stage_ort finds the bound in
    the graph (ScatterElements) and both python stage models get the declared one in their config."""
    from zsad.export import runtimes
    from zsad.export.onnx_export import export_stage
    from zsad.export.triton_repo import RepoOptions

    served_imports()  # the served model's own module, imported as its stub imports it
    from zsad.triton_models.stage_ort.model import index_bounds

    head = next(st for st in tiny_method("bagclip").stages() if st.name == "head")
    assert head.index_bounds == {"knn_index": 196}
    path = export_stage(head, tmp_path / "head.onnx", max_batch=2)
    assert index_bounds(str(path), ["knn_index"]) == {"knn_index": 196}
    for backend in ("python-ort", "python-openvino"):
        opts = RepoOptions(name="bag", backend=backend, max_batch=2, instance_kind="KIND_CPU")
        cfg = runtimes.get(backend).triton_config(opts, head, "bag_head", "fp32")
        params = {p["key"]: p["value"]["string_value"] for p in cfg["parameters"]}
        assert json.loads(params["index_bounds"]) == {"knn_index": 196}, backend
