"""Decoder likelihoods p(x_m | z) for real, binary, count and categorical features."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._distributions import inverse_softplus

__all__ = [
    "LIKELIHOODS",
    "Likelihood",
    "Decoded",
    "Normal",
    "Laplace",
    "Bernoulli",
    "Categorical",
    "Poisson",
    "NegativeBinomial",
    "make_likelihood",
]

#: Learned scales never go below this fraction of the feature's standard deviation.
SCALE_FLOOR_FRACTION = 1e-3
#: ``likelihood_scale="auto"``: one fixed scale per modality, this fraction of its features' RMS std.
AUTO_SCALE_FRACTION = 0.5
#: Smallest mean a count decoder starts at (log 0 is not a natural parameter).
COUNT_MEAN_FLOOR = 1e-3
#: Smallest probability a bernoulli or categorical decoder starts at.
PROBABILITY_FLOOR = 1e-3
#: The negative binomial's total count r = floor + softplus(rho) stays above this.
TOTAL_COUNT_FLOOR = 1e-4
#: Range of the method-of-moments start of r (r -> inf is the Poisson limit).
TOTAL_COUNT_INIT_RANGE = (1e-2, 1e4)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _is_count(x: Tensor) -> Tensor:
    return torch.isfinite(x) & (x >= 0) & (x == torch.floor(x))


def _log_factorial(x: Tensor) -> Tensor:
    return torch.lgamma(x + 1)


def _standard_gamma(shape: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gamma(shape, 1) draws from ``generator`` (Marsaglia & Tsang, 2000; shape < 1 boosted).

    ``torch._standard_gamma`` takes no generator, so this rejection sampler redraws only the
    rejected entries until all are accepted (about 2-5 % are rejected per round).
    """
    boost = shape < 1
    d = torch.where(boost, shape + 1, shape) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(shape)
    todo = torch.ones_like(shape, dtype=torch.bool)
    while bool(todo.any()):
        dt, ct = d[todo], c[todo]
        normal = torch.randn(dt.shape, generator=generator, dtype=dt.dtype, device=dt.device)
        uniform = torch.rand(dt.shape, generator=generator, dtype=dt.dtype, device=dt.device)
        v = (1 + ct * normal) ** 3
        log_v = torch.log(v.clamp_min(torch.finfo(v.dtype).tiny))
        accept = (v > 0) & (torch.log(uniform) < 0.5 * normal**2 + dt - dt * v + dt * log_v)
        accepted = tuple(i[accept] for i in todo.nonzero(as_tuple=True))
        out[accepted] = (dt * v)[accept]
        todo[accepted] = False
    if bool(boost.any()):
        # Gamma(a) = Gamma(a + 1) * U^(1/a); in logs, as U^(1/a) underflows for tiny a
        uniform = torch.rand(shape.shape, generator=generator, dtype=shape.dtype, device=shape.device)
        boosted = torch.exp(torch.log(out) + torch.log(uniform) / shape)
        out = torch.where(boost, boosted, out)
    return out


class Likelihood(nn.Module):
    """p(x | a) for one modality, where ``a`` is the decoder output (the natural parameter).

    ``x`` has shape (n, width) in the data's layout; ``a`` has shape (..., n, n_outputs), any
    leading sample dimensions (IWAE, HMC) broadcasting against ``x``.

    Parameters
    ----------
    width : int
        Number of columns of the modality's data block.
    """

    def __init__(self, width: int):
        super().__init__()
        self.width = int(width)

    @property
    def n_outputs(self) -> int:
        """How many natural parameters the decoder outputs per row."""
        return self.width

    @classmethod
    def from_data(cls, width: int, scale, train_block: Tensor) -> Likelihood:
        """Build from the training rows (scale and data are ignored unless a subclass reads them)."""
        return cls(width)

    @classmethod
    def check_data(cls, name: str, x: Tensor) -> None:
        """Raise ``ValueError`` naming modality ``name`` if ``x`` is outside the support."""

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        """log p(x | a) summed over the modality's features: shape ``a.shape[:-1]``."""
        raise NotImplementedError

    def mean(self, a: Tensor) -> Tensor:
        """E[x | a] in the data's layout."""
        return a

    def predict(self, a: Tensor) -> Tensor:
        """The point prediction in the data's layout (the mean unless a subclass says otherwise)."""
        return self.mean(a)

    def probabilities(self, a: Tensor) -> Tensor:
        """Outcome probabilities; defined for bernoulli and categorical likelihoods only."""
        raise NotImplementedError(f"{type(self).__name__} likelihoods have no outcome probabilities.")

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        """One draw of x ~ p(x | a) per row, in the data's layout."""
        raise NotImplementedError

    def natural_parameter(self, mean: Tensor) -> Tensor:
        """The ``a`` of shape (n_outputs,) whose mean is ``mean`` (starts decoders at the data mean)."""
        return mean

    def natural_parameter_from_data(self, x: Tensor) -> Tensor:
        """The ``a`` of shape (n_outputs,) whose mean is the mean of the rows ``x``."""
        return self.natural_parameter(x.mean(0))

    def encoder_input(self, x: Tensor) -> Tensor:
        """``x`` as encoder features (categorical codes become one-hot rows)."""
        return x


class _LocationScale(Likelihood):
    """A likelihood with a per-feature scale: fixed, or learned as ``floor + softplus(rho)``."""

    def __init__(self, scale: Tensor, learn: bool, data_std: Tensor | None = None):
        super().__init__(scale.numel())
        if learn:
            std = torch.where(data_std > 0, data_std, torch.ones_like(data_std))
            floor = torch.where(data_std > 0, SCALE_FLOOR_FRACTION * data_std, torch.full_like(data_std, 1e-3))
            self.register_buffer("floor", floor.float())
            self.rho = nn.Parameter(inverse_softplus((std - floor).float()))
        else:
            self.register_buffer("fixed_scale", scale.float())

    @classmethod
    def from_data(cls, width: int, scale, train_block: Tensor) -> _LocationScale:
        """``scale``: a positive float; ``"auto"``, a fixed scale of half the block's RMS feature
        std (one per modality; ``fit`` calibrates it after stage 1, see :meth:`calibrate`); or
        ``"learn"``, one learned scale per feature starting at its std."""
        learn = scale == "learn"
        if scale == "auto":
            spread = float(train_block.std(0, unbiased=False).pow(2).mean().sqrt())
            scale = AUTO_SCALE_FRACTION * spread if spread > 0 else 1.0
        fixed = torch.full((width,), 1.0 if learn else float(scale))

        return cls(fixed, learn=learn, data_std=train_block.std(0, unbiased=False))

    def calibrate(self, x: Tensor, a: Tensor) -> float:
        """Set the fixed scale to its maximum-likelihood value for data ``x`` (n, d) at natural
        parameters ``a`` (k, n, d), one value for the modality, floored at ``SCALE_FLOOR_FRACTION``
        of the scale it replaces; returns it."""
        current = float(self.fixed_scale.max())
        value = max(float(self._scale_estimate(x - a)), SCALE_FLOOR_FRACTION * current)
        self.fixed_scale.fill_(value)
        return value

    @property
    def scale(self) -> Tensor:
        if hasattr(self, "rho"):
            return self.floor + F.softplus(self.rho)
        return self.fixed_scale


class Normal(_LocationScale):
    """``a`` is the mean: log p = −½((x − a)/s)² − log s − ½ log 2π per feature."""

    @staticmethod
    def _scale_estimate(residual: Tensor) -> Tensor:
        return residual.pow(2).mean().sqrt()

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        s = self.scale
        return (-0.5 * ((x - a) / s) ** 2 - torch.log(s) - _HALF_LOG_2PI).sum(-1)

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        return a + self.scale * noise


class Laplace(_LocationScale):
    """``a`` is the location: log p = −|x − a|/s − log 2s per feature."""

    @staticmethod
    def _scale_estimate(residual: Tensor) -> Tensor:
        return residual.abs().mean()

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        s = self.scale
        return (-(x - a).abs() / s - torch.log(2 * s)).sum(-1)

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype) - 0.5
        return a - self.scale * torch.sign(u) * torch.log1p(-2 * u.abs())


class Bernoulli(Likelihood):
    """``a`` is the logit: log p = x·a − softplus(a) (the negative BCE with logits)."""

    def __init__(self, width: int | None = None):
        super().__init__(0 if width is None else width)

    @classmethod
    def check_data(cls, name: str, x: Tensor) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(f"Modality {name!r} uses likelihood='bernoulli' and must hold only 0 and 1 values.")

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        return (x * a - F.softplus(a)).sum(-1)

    def mean(self, a: Tensor) -> Tensor:
        return torch.sigmoid(a)

    def probabilities(self, a: Tensor) -> Tensor:
        """P(x_f = 1 | a) per feature."""
        return torch.sigmoid(a)

    def natural_parameter(self, mean: Tensor) -> Tensor:
        return torch.logit(mean.clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR))

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(a), generator=generator)


class Categorical(Likelihood):
    """``a`` holds the K category logits: log p = log_softmax(a)[x].

    The data is either one-hot rows (width K) or one column of integer codes 0..K−1
    (width 1); the decoder outputs K logits in both cases.

    Parameters
    ----------
    n_categories : int
        K, the number of categories.
    codes : bool
        True when the data is one column of integer codes, False for one-hot rows.
    """

    def __init__(self, n_categories: int, codes: bool):
        super().__init__(1 if codes else n_categories)
        self.n_categories = int(n_categories)
        self.codes = bool(codes)

    @property
    def n_outputs(self) -> int:
        return self.n_categories

    @classmethod
    def from_data(cls, width: int, scale, train_block: Tensor, n_categories: int | None = None) -> Categorical:
        """Width 1 means integer codes, with K = ``n_categories`` or else the largest code + 1."""
        if width > 1:
            return cls(width, codes=False)
        if n_categories is None:
            n_categories = int(train_block.max()) + 1 if train_block.numel() else 1
        return cls(n_categories, codes=True)

    @classmethod
    def check_data(cls, name: str, x: Tensor) -> None:
        if x.shape[1] == 1:
            if not bool(_is_count(x).all()):
                raise ValueError(
                    f"Modality {name!r} uses likelihood='categorical' with one column, so it must hold "
                    "non-negative integer category codes (0, 1, ..., K-1)."
                )
        elif not bool((((x == 0) | (x == 1)).all(1) & (x.sum(1) == 1)).all()):
            raise ValueError(
                f"Modality {name!r} uses likelihood='categorical' with {x.shape[1]} columns, so every row must be "
                "one-hot (exactly one 1, all others 0); or give one column of integer category codes."
            )

    def _code_index(self, x: Tensor) -> Tensor:
        if not self.codes:
            return x.argmax(-1, keepdim=True)
        index = x.long()
        if index.numel() and (bool((index < 0).any()) or int(index.max()) >= self.n_categories):
            raise ValueError(
                f"Category codes must lie in 0..{self.n_categories - 1} (the categories seen in fit); "
                f"got codes from {int(index.min())} to {int(index.max())}."
            )
        return index

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        index = self._code_index(x).expand(*a.shape[:-1], 1)
        return torch.log_softmax(a, -1).gather(-1, index).squeeze(-1)

    def probabilities(self, a: Tensor) -> Tensor:
        """P(category k | a), shape (..., K) in both layouts."""
        return torch.softmax(a, -1)

    def mean(self, a: Tensor) -> Tensor:
        """One-hot layout: the probabilities; code layout: the expected code Σ_k k·p_k, shape (..., 1)."""
        p = self.probabilities(a)
        if not self.codes:
            return p
        return (p * torch.arange(self.n_categories, dtype=p.dtype, device=p.device)).sum(-1, keepdim=True)

    def predict(self, a: Tensor) -> Tensor:
        """The most probable category: one-hot row, or its code as a float column."""
        return self._from_index(a.argmax(-1), a.dtype)

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        # Gumbel-max: argmax(a + G) ~ Categorical(softmax a), for any leading shape
        u = torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device)
        return self._from_index((a - torch.log(-torch.log(u))).argmax(-1), a.dtype)

    def _from_index(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        if self.codes:
            return index.unsqueeze(-1).to(dtype)
        return F.one_hot(index, self.n_categories).to(dtype)

    def natural_parameter(self, mean: Tensor) -> Tensor:
        """Logits of the class probabilities ``mean`` (shape (K,), in both layouts)."""
        if mean.shape != (self.n_categories,):
            raise ValueError(
                f"A categorical natural parameter needs the {self.n_categories} class probabilities; got a "
                f"tensor of shape {tuple(mean.shape)} (for codes use natural_parameter_from_data)."
            )
        p = mean.clamp_min(PROBABILITY_FLOOR)
        return torch.log(p / p.sum())

    def natural_parameter_from_data(self, x: Tensor) -> Tensor:
        return self.natural_parameter(self.encoder_input(x).mean(0))

    def encoder_input(self, x: Tensor) -> Tensor:
        if not self.codes:
            return x
        codes = x.long().clamp(0, self.n_categories - 1).squeeze(-1)
        return F.one_hot(codes, self.n_categories).to(x.dtype)


class _Count(Likelihood):
    """Counts with ``a`` = log mean."""

    _name = ""

    @classmethod
    def check_data(cls, name: str, x: Tensor) -> None:
        if not bool(_is_count(x).all()):
            raise ValueError(
                f"Modality {name!r} uses likelihood={cls._name!r} and must hold only non-negative integer counts."
            )

    def mean(self, a: Tensor) -> Tensor:
        return torch.exp(a)

    def natural_parameter(self, mean: Tensor) -> Tensor:
        return torch.log(mean.clamp_min(COUNT_MEAN_FLOOR))


class Poisson(_Count):
    """``a`` is the log rate: log p = x·a − exp(a) − log x! per feature."""

    _name = "poisson"

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        return (x * a - torch.exp(a) - _log_factorial(x)).sum(-1)

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.poisson(torch.exp(a), generator=generator)


class NegativeBinomial(_Count):
    """``a`` is the log mean μ; one learned total count r per feature (var = μ + μ²/r).

    log p = lgamma(x + r) − lgamma(r) − log x! + r·log(r/(r+μ)) + x·log(μ/(r+μ)), with
    r = floor + softplus(ρ). Large r approaches the Poisson; small r is overdispersed.

    Parameters
    ----------
    total_count : Tensor of shape (width,)
        The starting r of each feature.
    """

    _name = "negative_binomial"

    def __init__(self, total_count: Tensor):
        super().__init__(total_count.numel())
        self.rho = nn.Parameter(inverse_softplus((total_count - TOTAL_COUNT_FLOOR).float()))

    @classmethod
    def from_data(cls, width: int, scale, train_block: Tensor) -> NegativeBinomial:
        """Start r by the method of moments, r = μ²/(var − μ), clipped (Poisson-like features get the top)."""
        mean, var = train_block.mean(0), train_block.var(0, unbiased=False)
        low, high = TOTAL_COUNT_INIT_RANGE
        overdispersed = var > mean
        moments = mean**2 / torch.where(overdispersed, var - mean, torch.ones_like(var))
        total_count = torch.where(overdispersed, moments, torch.full_like(mean, high)).clamp(low, high)
        return cls(total_count)

    @property
    def total_count(self) -> Tensor:
        return TOTAL_COUNT_FLOOR + F.softplus(self.rho)

    def log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        r = self.total_count
        logit = a - torch.log(r)  # log(μ/r): log(μ/(r+μ)) = logsigmoid(logit), log(r/(r+μ)) = logsigmoid(−logit)
        log_p = torch.lgamma(x + r) - torch.lgamma(r) - _log_factorial(x)
        return (log_p + r * F.logsigmoid(-logit) + x * F.logsigmoid(logit)).sum(-1)

    def sample(self, a: Tensor, generator: torch.Generator | None) -> Tensor:
        # Gamma–Poisson mixture: λ ~ Gamma(r, rate r/μ), x ~ Poisson(λ); counts carry no gradient
        with torch.no_grad():
            r = self.total_count.to(a.dtype).expand(a.shape).contiguous()
            rate = _standard_gamma(r, generator) * torch.exp(a) / r
            return torch.poisson(rate, generator=generator)


LIKELIHOODS = {
    "normal": Normal,
    "laplace": Laplace,
    "bernoulli": Bernoulli,
    "categorical": Categorical,
    "poisson": Poisson,
    "negative_binomial": NegativeBinomial,
}


@dataclass(frozen=True)
class Decoded:
    """A decoder's output for one modality at latents z: its likelihood p(x | z), as a distribution.

    ``a`` (..., n_outputs) are the natural parameters; every output of the decoder (the mean,
    the point prediction, probabilities, a draw, the log-density of data) is read from here.
    """

    likelihood: Likelihood
    a: Tensor

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x | z) summed over the modality's features: shape ``a.shape[:-1]``."""
        return self.likelihood.log_prob(x, self.a)

    def mean(self) -> Tensor:
        return self.likelihood.mean(self.a)

    def predict(self) -> Tensor:
        """The point prediction (categorical: the most probable category)."""
        return self.likelihood.predict(self.a)

    def probabilities(self) -> Tensor:
        return self.likelihood.probabilities(self.a)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.likelihood.sample(self.a, generator)


def make_likelihood(
    name: str, width: int, scale, train_block: Tensor | None, *, n_categories: int | None = None
) -> Likelihood:
    """Build the likelihood ``name`` for a ``width``-column modality from its training rows.

    ``scale`` (a positive float, ``"auto"`` or ``"learn"``) is read by normal and laplace only.
    ``train_block`` (n, width) sets data-dependent starts: learned scales, the negative
    binomial's dispersion, and the number of categories of code input. ``None`` builds a
    placeholder that a state dict then overwrites (unpickling); categorical codes then need
    ``n_categories``, which also overrides the count read from ``train_block``.
    """
    if train_block is None:
        if name == "categorical" and width == 1 and n_categories is None:
            raise ValueError("A placeholder categorical likelihood for integer codes needs n_categories.")
        train_block = torch.zeros(2, width)
    elif train_block.dim() != 2 or train_block.shape[1] != width:
        raise ValueError(f"train_block must have shape (n, {width}); got {tuple(train_block.shape)}.")
    if name == "categorical":
        return Categorical.from_data(width, scale, train_block, n_categories=n_categories)
    return LIKELIHOODS[name].from_data(width, scale, train_block)
