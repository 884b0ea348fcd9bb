"""Planar flows (Bayes-PFL's prompt flow module) against their change-of-variables formula: log-determinants from
the autograd Jacobian (slogdet), densities from torch.distributions, samples from a plain per-step loop."""
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from zsad import ZsadError
from zsad.modules.flows import ConditionalPlanarFlow, StatePlanarFlows, flow_kl, planar_flow


def _params(k, w, seed, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, w, generator=g, dtype=torch.float64) * scale,
            torch.randn(k, w, generator=g, dtype=torch.float64) * scale,
            torch.randn(k, generator=g, dtype=torch.float64) * scale)


def _naive_steps(z, u, w, b):
    for k in range(u.shape[0]):
        z = z + u[k] * torch.tanh(torch.dot(w[k], z) + b[k])
    return z


@pytest.mark.parametrize("k,w,seed", [(1, 3, 0), (4, 5, 1), (10, 6, 2)])
def test_log_det_is_the_jacobian_log_determinant(k, w, seed):
    u, ww, b = _params(k, w, seed)
    z0 = torch.randn(w, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    z_k, log_det = planar_flow(z0, u, ww, b, eps=0.0)
    torch.testing.assert_close(z_k, _naive_steps(z0, u, ww, b))
    jac = jacobian(lambda z: _naive_steps(z, u, ww, b), z0)
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(log_det, logabs, rtol=1e-9, atol=1e-9)
    # with the released eps the value moves by at most ~K * eps / min|det_k|
    _, log_det_eps = planar_flow(z0, u, ww, b)
    assert 0 < float(log_det_eps - log_det) < 1e-3


def test_broadcast_batches_equal_a_loop_over_samples():
    n, r, k, w = 3, 4, 5, 6
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, r, w, generator=g)
    u, ww = torch.randn(n, 1, k, w, generator=g), torch.randn(n, 1, k, w, generator=g)
    b = torch.randn(n, 1, k, generator=g)
    z_k, log_det = planar_flow(z, u, ww, b)
    assert z_k.shape == (n, r, w) and log_det.shape == (n, r)
    for i in range(n):
        for j in range(r):
            zi, ld = planar_flow(z[i, j], u[i, 0], ww[i, 0], b[i, 0])
            torch.testing.assert_close(z_k[i, j], zi)
            torch.testing.assert_close(log_det[i, j], ld)


def test_kl_term_is_the_gaussian_log_density_difference():
    g = torch.Generator().manual_seed(4)
    w = 7
    mu, log_var, noise = torch.randn(w, generator=g), torch.randn(w, generator=g), torch.randn(w, generator=g)
    std = torch.exp(0.5 * log_var)
    z0 = mu + noise * std
    z_k, log_det = torch.randn(w, generator=g), torch.tensor(0.3)
    const = 0.5 * w * math.log(2 * math.pi)  # the released code leaves out the 2 pi constants (they cancel)
    log_q0 = torch.distributions.Normal(mu, std).log_prob(z0).sum() + const
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z_k).sum() + const
    torch.testing.assert_close(flow_kl(noise, log_var, z_k, log_det), log_q0 - log_p - log_det)


def test_conditional_flow_is_the_amortised_planar_chain():
    torch.manual_seed(0)
    cond_dim, width, k = 5, 4, 3
    flow = ConditionalPlanarFlow(cond_dim, width, length=k, hidden=8, eps=0.0).double()
    with torch.no_grad():  # larger flow weights than the N(0, 0.02) init, so that every step matters
        for lin in (flow.u, flow.w, flow.b):
            lin.weight.normal_(std=0.5)
    cond = torch.randn(2, cond_dim, dtype=torch.float64)
    noise = torch.randn(2, 3, width, dtype=torch.float64)
    z, kl = flow(cond, noise)
    assert z.shape == (2, 3, width) and kl.shape == (2, 3)
    for i in range(2):
        h = flow.encoder.log_var(cond[i])
        mu = flow.encoder.mu(cond[i])
        var = torch.exp(0.5 * h)  # the released code reads exp(0.5 h) as the variance
        u = flow.u(cond[i]).reshape(k, width)
        w = flow.w(cond[i]).reshape(k, width)
        b = flow.b(cond[i])
        for r in range(3):
            z0 = mu + noise[i, r] * var.sqrt()
            torch.testing.assert_close(z[i, r], _naive_steps(z0, u, w, b))
            # change of variables: log q_K(z_K) = log q0(z0) - log|det dz_K/dz0|
            _, logabs = torch.linalg.slogdet(jacobian(lambda x, u=u, w=w, b=b: _naive_steps(x, u, w, b), z0))
            log_qk = torch.distributions.Normal(mu, var.sqrt()).log_prob(z0).sum() - logabs
            log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z[i, r]).sum()
            torch.testing.assert_close(kl[i, r], log_qk - log_p, rtol=1e-7, atol=1e-7)


def test_state_flows_share_one_encoder_and_keep_free_parameters():
    torch.manual_seed(1)
    flows = StatePlanarFlows(width=6, length=4, hidden=8, init_std=1.0)
    noise_n, noise_a = torch.randn(5, 6), torch.randn(5, 6)
    phi_n, phi_a, kl_n, kl_a = flows(noise_n, noise_a)
    assert phi_n.shape == phi_a.shape == (5, 6) and kl_n.shape == kl_a.shape == (5,)
    mu, log_var = flows.encoder(flows.abnormal.xi)
    ref, _ = planar_flow(mu + noise_a * torch.exp(0.5 * log_var), flows.abnormal.u, flows.abnormal.w,
                         flows.abnormal.b)
    torch.testing.assert_close(phi_a, ref)
    assert not torch.allclose(phi_n, phi_a)
    # one encoder for both branches; free u, w [K,W], b [K] and xi [W] per branch
    free = sum(p.numel() for p in flows.normal.parameters())
    assert free == 4 * 6 + 4 * 6 + 4 + 6
    assert sum(p.numel() for n, p in flows.named_parameters() if n.startswith("encoder.")) == \
        2 * (6 * 8 + 8 + 8 * 8 + 8 + 8 * 6 + 6)


def test_flow_shape_errors_are_clear():
    flow = ConditionalPlanarFlow(4, 6, length=2, hidden=8)
    with pytest.raises(ZsadError, match=r"flow noise must be \[N\|1,R,6\]"):
        flow(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ZsadError, match="planar flow shapes do not fit"):
        planar_flow(torch.randn(3), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2))
