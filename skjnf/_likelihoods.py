"""Decoder likelihoods p(x_m | z): normal, laplace and bernoulli, with linear natural parameters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LIKELIHOODS", "Likelihood", "Normal", "Laplace", "Bernoulli", "make_likelihood"]

#: Learned scales never go below this fraction of the feature's standard deviation.
SCALE_FLOOR_FRACTION = 1e-3

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


class Likelihood(nn.Module):
    """p(x | a) for one modality; ``a`` is the decoder output (its natural parameter).

    Subclasses implement ``log_prob`` (summed over features), ``mean`` and ``sample``.
    """

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, a: Tensor) -> Tensor:
        return a

    def natural_parameter(self, mean: Tensor) -> Tensor:
        """The ``a`` whose mean is ``mean`` (used to start decoders at the data mean)."""
        return mean

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError


class _LocationScale(Likelihood):
    """A likelihood with a per-feature scale: fixed, or learned as ``floor + softplus(rho)``."""

    def __init__(self, scale: Tensor, learn: bool, data_std: Tensor | None = None):
        super().__init__()
        if learn:
            std = torch.where(data_std > 0, data_std, torch.ones_like(data_std))
            floor = torch.where(data_std > 0, SCALE_FLOOR_FRACTION * data_std, torch.full_like(data_std, 1e-3))
            self.register_buffer("floor", floor.float())
            self.rho = nn.Parameter(_inverse_softplus((std - floor).float()))
        else:
            self.register_buffer("fixed_scale", scale.float())

    @property
    def scale(self) -> Tensor:
        if hasattr(self, "rho"):
            return self.floor + F.softplus(self.rho)
        return self.fixed_scale


class Normal(_LocationScale):
    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        s = self.scale
        return (-0.5 * ((x - a) / s) ** 2 - torch.log(s) - _HALF_LOG_2PI).sum(-1)

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        return a + self.scale * noise


class Laplace(_LocationScale):
    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        s = self.scale
        return (-(x - a).abs() / s - torch.log(2 * s)).sum(-1)

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype) - 0.5
        return a - self.scale * torch.sign(u) * torch.log1p(-2 * u.abs())


class Bernoulli(Likelihood):
    """``a`` is the logit: log p = x·a − softplus(a) (the negative BCE with logits)."""

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        return (x * a - F.softplus(a)).sum(-1)

    def mean(self, a: Tensor) -> Tensor:
        return torch.sigmoid(a)

    def natural_parameter(self, mean: Tensor) -> Tensor:
        return torch.logit(mean.clamp(1e-3, 1 - 1e-3))

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(a), generator=generator)


LIKELIHOODS = {"normal": Normal, "laplace": Laplace, "bernoulli": Bernoulli}


def make_likelihood(name: str, width: int, scale, data_std: Tensor) -> Likelihood:
    """Build the likelihood ``name``; ``scale`` is a positive float or ``"learn"``."""
    if name == "bernoulli":
        return Bernoulli()
    learn = isinstance(scale, str)
    fixed = torch.full((width,), 1.0 if learn else float(scale))
    return LIKELIHOODS[name](fixed, learn=learn, data_std=data_std)
