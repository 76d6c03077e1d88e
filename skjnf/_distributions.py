"""Log-densities written analytically: Gaussians, flow experts and the smooth clamp."""

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
