"""The parity gate (export/parity.py) on hand-made stages whose 'exported' runners are perturbed by known amounts:
it must fail just past its tolerance, pass just under, and catch a ranking swap the element-wise check allows."""
import numpy as np
import pytest
from torch import nn

from zsad.export import parity
from zsad.methods.stages import Stage


class _Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_documented_tolerances():
    # README / DESIGN: max relative error <= 1e-4 in fp32, 2e-2 in fp16 (literal values, not the module's own)
    assert parity.FP32_TOL == 1e-4 and parity.FP16_TOL == 2e-2



def _perturbed_runner(rel, at=(0, 1)):
    """The stage's own math (identity) plus rel * max|ref| added to one element: a max relative error of rel."""
    def run(feed):
        x = np.asarray(feed["images"], np.float64).copy()
        x[at[0] % len(x), at[1]] += rel * np.abs(x).max()
        return {"out": x}
    return run


@pytest.mark.parametrize("magnitude", [1.0, 1e-3])  # the error is relative to the tensor's own scale
def test_gate_fails_just_past_the_fp32_tolerance_and_passes_just_under(magnitude):
    stages = [Stage("head", _Scale(1.0), {"images": ("B", 3)}, {"out": ("B", 3)})]
    images = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32) * magnitude
    rows = parity.check_stages(stages, {"head": _perturbed_runner(0.9e-4)}, {"images": images}, tol=parity.FP32_TOL)
    assert rows and all(r.ok for r in rows)
    assert max(r.max_rel for r in rows) == pytest.approx(0.9e-4, rel=1e-3)
    with pytest.raises(parity.ParityError) as e:
        parity.check_stages(stages, {"head": _perturbed_runner(1.1e-4)}, {"images": images}, tol=parity.FP32_TOL)
    assert e.value.row.stage == "head" and e.value.row.tensor == "out"
    assert e.value.row.max_rel == pytest.approx(1.1e-4, rel=1e-3) and not e.value.row.ok
    assert "head" in str(e.value) and "out" in str(e.value)


def test_compare_is_max_abs_over_max_ref():
    ref = np.array([[0.002, -0.004], [0.001, 0.0]])
    got = ref + np.array([[0.0, 0.0], [3e-7, 0.0]])
    row = parity.compare("s", "c", "t", ref, got, 1e-4)
    assert row.max_abs == pytest.approx(3e-7) and row.max_rel == pytest.approx(3e-7 / 0.004) and row.ok
    row = parity.compare("s", "c", "t", ref, got * 1.0 + np.array([[0, 5e-7], [0, 0]]), 1e-4)
    assert row.max_rel == pytest.approx(5e-7 / 0.004) and not row.ok  # 1.25e-4 > 1e-4
    assert not parity.compare("s", "c", "t", ref, ref[:1], 1e-4).ok  # shape mismatch
    assert not parity.compare("s", "c", "t", ref, ref * np.nan, 1e-4).ok


def _ranking_chain():
    """encoder: identity feature [B, 1]; head: score = 5 * feature. The exported encoder moves two features by
    0.9e-4 of their scale (within the stage tolerance); the exact head then turns that into a score error of
    0.9e-4 relative (within the tolerance) but swaps two scores that were 1.5e-4 (relative) apart."""
    class Head(nn.Module):
        def forward(self, f):
            return 5.0 * f[:, 0]

    stages = [Stage("encoder", _Scale(1.0), {"images": ("B", 1)}, {"feat": ("B", 1)}),
              Stage("head", Head(), {"feat": ("B", 1)}, {"score": ("B",)})]

    def encoder(feed):
        x = np.asarray(feed["images"], np.float64).copy()
        shift = 0.9e-4 * np.abs(x).max()
        x[0, 0] -= shift
        if len(x) > 1:
            x[1, 0] += shift
        return {"feat": x}

    def head(feed):
        return {"score": 5.0 * np.asarray(feed["feat"], np.float64)[:, 0]}

    return stages, {"encoder": encoder, "head": head}


def test_gate_catches_a_ranking_swap_within_the_tolerance():
    stages, runners = _ranking_chain()
    images = np.array([[1.0], [0.99985], [0.5], [0.2]], np.float32)
    with pytest.raises(parity.ParityError) as e:
        parity.check_stages(stages, runners, {"images": images}, tol=1e-4)
    assert e.value.row.tensor == "score ranking" and e.value.row.max_abs == 1.0  # one discordant pair
    # the same perturbation where the two scores are farther apart than it: no swap, the gate passes
    images = np.array([[1.0], [0.999], [0.5], [0.2]], np.float32)
    rows = parity.check_stages(stages, runners, {"images": images}, tol=1e-4)
    assert any(r.tensor == "score ranking" and r.ok for r in rows)
    # pairs closer than the tolerance may swap: 0.5e-4 relative apart
    images = np.array([[1.0], [0.99995], [0.5], [0.2]], np.float32)
    rows = parity.check_stages(stages, runners, {"images": images}, tol=1e-4)
    assert all(r.ok for r in rows)


def test_ranking_row_counts_discordant_pairs_beyond_the_tolerance():
    ref = np.array([0.9, 0.5, 0.1, 0.3])
    assert parity._ranking_row(ref, ref + 1e-6, 1e-4, 4).ok
    row = parity._ranking_row(ref, np.array([0.1, 0.5, 0.9, 0.3]), 1e-4, 4)  # 0.9 <-> 0.1 swapped
    # discordant pairs: (0,1), (0,2), (0,3), (1,2), (2,3) -> 5
    assert row.max_abs == 5.0 and not row.ok

