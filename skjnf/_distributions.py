"""Log-densities written analytically: Gaussians, flow posteriors and the smooth clamp."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOG_VAR_BOUNDS",
    "softclamp",
    "inverse_softclamp",
    "gaussian_log_prob",
    "std_normal_log_prob",
    "expert_log_prob",
    "FlowDistribution",
    "reparameterize",
]

#: Smooth two-sided bounds of every log-variance head (docs/algorithm.md §6).
LOG_VAR_BOUNDS = (-10.0, 10.0)

_LOG_2PI = math.log(2.0 * math.pi)


def softclamp(a: Tensor, low: float = LOG_VAR_BOUNDS[0], high: float = LOG_VAR_BOUNDS[1]) -> Tensor:
    """Smooth clamp to ``[low, high]``: about ``a`` in the middle, gradients never vanish."""
    return low + F.softplus(high - F.softplus(high - a) - low)


def inverse_softplus(y: Tensor) -> Tensor:
    """The x with softplus(x) = y, for y > 0 (stable for small and large y)."""
    return y + torch.log(-torch.expm1(-y))


def inverse_softclamp(y: Tensor, low: float = LOG_VAR_BOUNDS[0], high: float = LOG_VAR_BOUNDS[1]) -> Tensor:
    """Inverse of :func:`softclamp` for ``low < y < high``."""
    return high - inverse_softplus(high - inverse_softplus(y - low) - low)


def gaussian_log_prob(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Diagonal Gaussian log-density, summed over the last dimension."""
    return -0.5 * ((x - mean) ** 2 * torch.exp(-log_var) + log_var + _LOG_2PI).sum(-1)


def std_normal_log_prob(z: Tensor) -> Tensor:
    """Log-density of the prior N(0, I), summed over the last dimension."""
    return -0.5 * (z**2 + _LOG_2PI).sum(-1)


def expert_log_prob(z: Tensor, mean: Tensor, log_var: Tensor, flow) -> Tensor:
    """log q_j(z | x_j) = log N(f_j(z); mean, var) + log|det df_j/dz|.

    ``mean`` and ``log_var`` are precomputed encoder outputs broadcastable to ``z``;
    ``flow`` maps latents to the base space and returns ``(u, log_det)``.
    """
    u, log_det = flow(z)
    return gaussian_log_prob(u, mean, log_var) + log_det


def reparameterize(mean: Tensor, log_var: Tensor, noise: Tensor) -> Tensor:
    """``mean + sigma * noise`` with ``sigma = exp(log_var / 2)``."""
    return mean + torch.exp(0.5 * log_var) * noise


class FlowDistribution:
    """A flow posterior of n rows, q(z | x) = N(f(z); μ, σ²)·|det ∂f/∂z|: z = f⁻¹(u), u ~ N(μ, σ²).

    One expert q_j(z | x_j) (``JNFModule.expert``), or the subset posterior given S
    (``JNFModule.subset``); like ``torch.distributions`` objects, it holds its parameters and
    answers ``log_prob`` and ``rsample``. ``loc`` and ``log_var`` (n, D) are the base Gaussian's;
    ``flow`` maps latents to the base space: ``flow(z) = (u, log|det ∂u/∂z|)``,
    ``flow.inverse(u) = (z, log|det ∂z/∂u|)``.
    """

    def __init__(self, loc: Tensor, log_var: Tensor, flow):
        self.loc, self.log_var, self.flow = loc, log_var, flow

    def __len__(self) -> int:
        return len(self.loc)

    def rows(self, index) -> FlowDistribution:
        """The posterior of the rows at ``index`` (a slice or an index tensor)."""
        return FlowDistribution(self.loc[index], self.log_var[index], self.flow)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z | x) of z (..., n, D) or (..., D) broadcastable to the rows: (..., n)."""
        return expert_log_prob(z, self.loc, self.log_var, self.flow)

    def sample(self, n_draws: int, generator: torch.Generator | None = None) -> Tensor:
        """``n_draws`` independent draws per row, (n_draws, n, D), without gradients."""
        noise = torch.randn(n_draws, *self.loc.shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype)
        with torch.no_grad():
            return self.rsample(noise)

    def rsample(self, noise: Tensor) -> Tensor:
        """Draws (k, n, D) from standard normal base noise (k, n, D) or (k, 1, D) shared by the rows."""
        return self.rsample_and_log_prob(noise, with_log_prob=False)[0]

    def rsample_and_log_prob(self, noise: Tensor, with_log_prob: bool = True) -> tuple[Tensor, Tensor | None]:
        """Draws (k, n, D) and their log q (k, n), from one inverse pass:
        log q(z) = log N(u; μ, σ²) − log|det ∂z/∂u|."""
        u = reparameterize(self.loc, self.log_var, noise).expand(noise.shape[0], *self.loc.shape)
        z, log_det = self.flow.inverse(u.reshape(-1, u.shape[-1]))
        if not with_log_prob:
            return z.reshape(u.shape), None
        return z.reshape(u.shape), gaussian_log_prob(u, self.loc, self.log_var) - log_det.reshape(u.shape[:-1])

    def base_mean_image(self, rows: Tensor | slice = slice(None)) -> Tensor:
        """f⁻¹(μ) (n, D) of the ``rows`` (all by default): the base mean carried to the latent space."""
        return self.flow.inverse(self.loc[rows])[0]
