"""Planar normalizing flows (Rezende & Mohamed, 2015) as Bayes-PFL's prompt flow module uses them.

One planar step maps z (width W) to

    h(z) = z + u * tanh(w^T z + b)        log|det dh/dz| = log|1 + u^T psi(z)|,  psi(z) = tanh'(w^T z + b) w

(the Jacobian is I + u psi^T, whose determinant is 1 + u^T psi by the matrix determinant lemma; psi is taken at
the step's *input*). K steps are chained. As in the released code, no invertibility constraint is put on u,
and ``eps`` (1e-5) is added inside the log: log(|1 + u^T psi| + eps).

A flow starts from a diagonal Gaussian q0 = N(mu, var) given by :class:`GaussianEncoder`: z0 = mu + noise * std.
The released code reads its second MLP's output h as log(var) = 0.5 h (std = exp(0.25 h)); ``GaussianEncoder``
returns that ``log_var``. The per-sample regulariser (the KL term of the paper's Eq. 7 with a standard normal
prior on z_K, Gaussian log-densities without the 2 pi constant, as the code computes them) is

    kl = log q0(z0) - log N(z_K; 0, I) - sum_k log|det_k|
       = -0.5 sum(log_var + noise^2) + 0.5 sum(z_K^2) - sum_k log|det_k|

Two flows per Bayes-PFL model:
- :class:`ConditionalPlanarFlow` (the image-specific distribution, ISD): mu / log_var and the K (u, w, b) are
  functions of a condition vector (the image's global embedding): "amortised" flow parameters;
- :class:`StatePlanarFlows` (the image-agnostic distributions, IAD): one encoder shared by a normal and an
  abnormal branch, each fed a learned free vector xi and owning free (u, w, b).

Everything is a plain tensor op (MatMul / Tanh / Add), with the K steps unrolled: exports as it runs.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn

from zsad import ZsadError
from zsad.modules.precision import as_fp32, fp32_region


def planar_flow(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Run K planar steps. ``z`` [..., W]; ``u``, ``w`` [..., K, W]; ``b`` [..., K] (leading axes broadcast).

    Returns ``(z_K [..., W], sum_k log(|1 + u_k^T psi_k| + eps) [...])``.
    """
    if u.shape[-2:] != w.shape[-2:] or u.shape[-1] != z.shape[-1] or b.shape[-1] != u.shape[-2]:
        raise ZsadError(f"planar flow shapes do not fit: z {tuple(z.shape)}, u {tuple(u.shape)}, "
                        f"w {tuple(w.shape)}, b {tuple(b.shape)}")
    log_det = torch.zeros((), dtype=z.dtype, device=z.device)
    for k in range(u.shape[-2]):
        u_k, w_k, b_k = u[..., k, :], w[..., k, :], b[..., k]
        t = torch.tanh((z * w_k).sum(-1) + b_k)
        # u^T psi = (1 - tanh^2) * u^T w, evaluated at the step's input z
        log_det = log_det + torch.log(torch.abs(1.0 + (1.0 - t * t) * (u_k * w_k).sum(-1)) + eps)
        z = z + u_k * t.unsqueeze(-1)
    return z, log_det


def flow_kl(noise: torch.Tensor, log_var: torch.Tensor, z_k: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """log q0(z0) - log N(z_K; 0, I) - sum log|det| per sample (no 2 pi constants), z0 = mu + noise * std."""
    log_q0 = -0.5 * (log_var + noise * noise).sum(-1)
    log_prior = -0.5 * (z_k * z_k).sum(-1)
    return log_q0 - log_prior - log_det


def _init_linear(module: nn.Module) -> None:
    """Bayes-PFL's init: every Linear weight N(0, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
                         nn.Linear(hidden, out_dim))


class GaussianEncoder(nn.Module):
    """q0's parameters: mu = MLP_mu(x), log_var = 0.5 * MLP_lv(x); each MLP in -> hidden -> hidden -> out (Softplus).

    ``log_var_init`` sets the last log-variance bias so that q0 starts near variance exp(log_var_init) (released: 0,
    i.e. unit variance).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, log_var_init: float = 0.0):
        super().__init__()
        self.mu = _mlp(in_dim, hidden, out_dim)
        self.log_var = _mlp(in_dim, hidden, out_dim)
        _init_linear(self)
        nn.init.constant_(cast(nn.Linear, self.log_var[-1]).bias, 2.0 * log_var_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), 0.5 * self.log_var(x)


class ConditionalPlanarFlow(nn.Module):
    """Image-specific distribution: q0 and the K planar steps are all functions of a condition vector.

    ``forward(cond [N,C], noise [N|1,R,W])`` -> (samples [N,R,W], kl [N,R]). ``noise`` [1,R,W] shares one noise bank
    across the images (the deterministic inference mode).
    """

    def __init__(self, cond_dim: int, width: int, length: int = 10, hidden: int = 512, eps: float = 1e-5,
                 log_var_init: float = 0.0):
        super().__init__()
        self.width, self.length, self.eps = int(width), int(length), float(eps)
        self.encoder = GaussianEncoder(cond_dim, width, hidden, log_var_init)
        self.u = nn.Linear(cond_dim, length * width)
        self.w = nn.Linear(cond_dim, length * width)
        self.b = nn.Linear(cond_dim, length)
        _init_linear(self.u)
        _init_linear(self.w)
        _init_linear(self.b)

    def forward(self, cond: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if noise.dim() != 3 or noise.shape[-1] != self.width:
            raise ZsadError(f"flow noise must be [N|1,R,{self.width}], got {tuple(noise.shape)}")
        n, k, width = cond.shape[0], self.length, self.width
        # fp32 under autocast (a few small Linear layers): the K planar steps amplify the half rounding of the
        # amortised u, w (bf16: 0.26%) into errors of 1-2% on the samples, and exp(log_var / 2) overflows fp16 from
        # log_var > 22.2 (65504 = exp(11.09)), which makes every prompt NaN
        with fp32_region(cond):
            cond = as_fp32(cond)
            mu, log_var = self.encoder(cond)  # [N,W]
            mu, log_var = mu.unsqueeze(1), log_var.unsqueeze(1)
            z0 = mu + noise * torch.exp(0.5 * log_var)
            u = self.u(cond).reshape(n, 1, k, width)
            w = self.w(cond).reshape(n, 1, k, width)
            b = self.b(cond).reshape(n, 1, k)
            z, log_det = planar_flow(z0, u, w, b, self.eps)
            return z, flow_kl(noise, log_var, z, log_det)


class FreePlanarFlow(nn.Module):
    """One image-agnostic branch: a learned input vector xi, free (u, w, b); N(0, init_std^2) at init (released: 1)."""

    def __init__(self, width: int, length: int = 10, init_std: float = 1.0):
        super().__init__()
        self.xi = nn.Parameter(torch.randn(1, width) * init_std)
        self.u = nn.Parameter(torch.randn(length, width) * init_std)
        self.w = nn.Parameter(torch.randn(length, width) * init_std)
        self.b = nn.Parameter(torch.randn(length) * init_std)


class StatePlanarFlows(nn.Module):
    """Image-agnostic distributions of the normal and abnormal state words (encoder shared by both branches).

    ``forward(noise_normal [R,W], noise_abnormal [R,W])`` -> (phi_n [R,W], phi_a [R,W], kl_n [R], kl_a [R]).
    """

    def __init__(self, width: int, length: int = 10, hidden: int = 512, eps: float = 1e-5, init_std: float = 1.0,
                 log_var_init: float = 0.0):
        super().__init__()
        self.width, self.eps = int(width), float(eps)
        self.encoder = GaussianEncoder(width, width, hidden, log_var_init)
        self.normal = FreePlanarFlow(width, length, init_std)
        self.abnormal = FreePlanarFlow(width, length, init_std)

    def branch(self, flow: FreePlanarFlow, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if noise.dim() != 2 or noise.shape[-1] != self.width:
            raise ZsadError(f"state-flow noise must be [R,{self.width}], got {tuple(noise.shape)}")
        with fp32_region(noise):  # fp32 under autocast, as ConditionalPlanarFlow
            mu, log_var = self.encoder(flow.xi)  # [1,W]
            z0 = mu + noise * torch.exp(0.5 * log_var)
            z, log_det = planar_flow(z0, flow.u, flow.w, flow.b, self.eps)
            return z, flow_kl(noise, log_var, z, log_det)

    def forward(self, noise_normal: torch.Tensor, noise_abnormal: torch.Tensor):
        phi_n, kl_n = self.branch(self.normal, noise_normal)
        phi_a, kl_a = self.branch(self.abnormal, noise_abnormal)
        return phi_n, phi_a, kl_n, kl_a
