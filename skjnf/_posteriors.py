"""The posterior objects: each answers ``mean(n_mean_samples, generator)`` (n, D) and
``sample(n_draws, generator)`` (n_draws, n, D) for the rows of one observed pattern, and the
importance proposals ``propose(rows, noise)``. Which one serves a conditioning set is
:mod:`~skjnf._routing`'s job."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._chunks import row_chunks
from ._distributions import FlowDistribution, gaussian_log_prob, reparameterize, std_normal_log_prob
from ._gaussian_product import GaussianProduct, linearized_expert
from ._hmc import hmc_sample, product_of_experts_log_prob
from ._modules import JNFModule
from ._warnings import user_stacklevel

__all__ = [
    "SUBSET_POSTERIORS",
    "HMCSettings",
    "HMCStats",
    "JointPosterior",
    "FlowPosterior",
    "ProductPosterior",
    "HMCPosterior",
    "joint_posterior",
    "device_chunks",
]

#: Most (draws x rows) pushed through a network at once, per device type: bounds memory.
MAX_BATCH_ELEMENTS = {"cpu": 2**14, "cuda": 2**16}
#: Budget units one row costs in an encoder pass: its activations are hidden-layer wide.
JOINT_ROW_COST = 4
#: Most latents per decoder pass when scoring or decoding. On CPU, chunks this small keep the
#: hidden activations in cache: the joint log-likelihood ran 2-3x faster than with 2**14
#: (benchmarks/README.md); on CUDA, large batches keep the device busy.
DECODE_BATCH_ELEMENTS = {"cpu": 2**10, "cuda": 2**16}


#: How the posterior given a subset of 2..M-1 modalities is computed (``subset_posterior``).
SUBSET_POSTERIORS = ("amortized", "product", "product_prior", "generative")


@dataclass(frozen=True)
class HMCSettings:
    n_chains: int
    n_steps: int
    n_leapfrog: int
    step_size: float | str

    @classmethod
    def for_mean(cls, n_posterior_samples: int, n_steps: int, n_leapfrog: int, step_size) -> HMCSettings:
        """Enough chains that their kept (post-burn-in) positions number ``n_posterior_samples``."""
        kept = n_steps - n_steps // 2
        return cls(math.ceil(n_posterior_samples / kept), n_steps, n_leapfrog, step_size)


@dataclass
class HMCStats:
    """HMC diagnostics accumulated over the patterns of one call."""

    n_rows: int = 0
    accepted: float = 0.0
    step_size_sum: float = 0.0
    n_divergent: int = 0
    escaped_rows: list = field(default_factory=list)

    def add(self, result, rows: np.ndarray) -> None:
        n = len(rows)
        self.n_rows += n
        self.accepted += float(result.acceptance_per_row.sum())
        self.step_size_sum += float(result.step_size.sum())
        self.n_divergent += int(result.n_divergent)
        escaped = rows[result.escaped.cpu().numpy()]
        self.escaped_rows += escaped.tolist()

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.n_rows if self.n_rows else None

    @property
    def step_size(self) -> float | None:
        return self.step_size_sum / self.n_rows if self.n_rows else None

    def warn(self) -> None:
        """Warn about the call's HMC diagnostics, at the user's call (however deep inside skjnf)."""
        if not self.n_rows:
            return
        stacklevel = user_stacklevel()
        if abs(self.acceptance - 0.75) > 0.15:
            warnings.warn(
                f"HMC acceptance {self.acceptance:.2f} is far from its 0.75 target; consider a larger "
                "n_mcmc_steps (longer adaptation) or step_size='auto'.",
                UserWarning,
                stacklevel=stacklevel,
            )
        if self.escaped_rows:
            warnings.warn(
                f"HMC chains of row(s) {self.escaped_rows[:10]} ended far from the origin (|z| > 10): "
                "the product of experts may be improper for these rows.",
                UserWarning,
                stacklevel=stacklevel,
            )

    def as_dict(self) -> dict:
        return {
            "acceptance": self.acceptance,
            "step_size": self.step_size,
            "n_divergent": self.n_divergent,
            "escaped_rows": list(self.escaped_rows),
        }


def device_chunks(n_rows: int, per_row: int, device: torch.device, budgets=MAX_BATCH_ELEMENTS) -> list[slice]:
    """:func:`row_chunks` with the budget of ``device``'s type."""
    return row_chunks(n_rows, per_row, budgets.get(device.type, budgets["cuda"]))


def joint_posterior(
    module: JNFModule, blocks: dict[str, Tensor], observed: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(mean, log-variance) of q(z | X), or q(z | x_O) given ``observed`` (n, M), for every row,
    in row chunks: memory bounded in n."""
    n = len(next(iter(blocks.values())))
    device = next(iter(blocks.values())).device
    parts = [
        module.joint_posterior(
            {name: x[part] for name, x in blocks.items()}, None if observed is None else observed[part]
        )
        for part in device_chunks(n, JOINT_ROW_COST, device)
    ]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


#: Standard normal quantile at 1 − 1e-6: draws beyond this much of the aggregate posterior are tails.
SUPPORT_QUANTILE_Z = 4.753


def support_radius(latent_dim: int) -> float:
    """Squared Mahalanobis radius holding all but 1e-6 of a D-dimensional Gaussian's mass.

    The χ²_D quantile at 1 − 1e-6 by the Wilson–Hilferty approximation, slightly conservative:
    15 % too large at D = 1, 2 % at D = 10.
    """
    c = 2.0 / (9.0 * latent_dim)
    return latent_dim * (1.0 - c + SUPPORT_QUANTILE_Z * math.sqrt(c)) ** 3


def antithetic_noise(k: int, dim: int, generator, device) -> Tensor:
    """k base draws (k, 1, dim) in pairs ±ε (and one 0, the base mean, when k is odd): their mean
    is exactly zero.

    A posterior mean averages k draws whose noise every row shares, so independent draws would
    shift every row's mean by the same ε̄ ~ N(0, I / k) base standard deviations: about 0.7 for
    k = 20 in 10 dimensions, and a prediction's MSE then differed from its value with 1000 draws
    by -22 % to +7 % across conditioning sets and targets (the digits in six views). With ±ε
    pairs the shift is zero for a Gaussian posterior and only the flow's curvature is left to
    average.
    """
    half = torch.randn(k // 2, 1, dim, generator=generator, device=device)
    zero = torch.zeros(k % 2, 1, dim, device=device)
    return torch.cat([half, -half, zero])


def _supported_mean(module: JNFModule, draws: Tensor, fallback: Callable[[Tensor], Tensor]) -> Tensor:
    """Mean over draws (P, n, D) inside the aggregate posterior's support; rows with none take
    ``fallback(rows)`` (len(rows), D), computed only for those rows (a few, when any).

    A flow posterior's far tails (where its inverse amplifies the base noise most) can put a
    few draws hundreds of units out; the experts integrate to the aggregate posterior, so mass
    beyond its 1 − 1e-6 region is an artefact, and one such draw would ruin a row's mean.
    """
    inside = (module.aggregate_whitened(draws) ** 2).sum(-1) <= support_radius(module.latent_dim)
    count = inside.sum(0)
    mean = torch.where(inside[..., None], draws, torch.zeros_like(draws)).sum(0) / count.clamp(min=1)[:, None]
    empty = torch.nonzero(count == 0).squeeze(1)
    if len(empty):
        mean[empty] = fallback(empty)
    return mean


class JointPosterior:
    """q(z | X) of complete rows: the joint encoder's Gaussian."""

    def __init__(self, module: JNFModule, blocks: dict[str, Tensor]):
        self.loc, self.log_var = joint_posterior(module, blocks)

    def mean(self, n_mean_samples: int, generator) -> Tensor:
        return self.loc

    def sample(self, n_draws: int, generator) -> Tensor:
        noise = torch.randn(n_draws, *self.loc.shape, generator=generator, device=self.loc.device)
        return reparameterize(self.loc, self.log_var, noise)

    def propose(self, part: slice, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Draws of rows ``part`` from base noise (k, 1, D), with their log-density: ((k, r, D), (k, r))."""
        z = reparameterize(self.loc[part], self.log_var[part], noise)
        return z, gaussian_log_prob(z, self.loc[part], self.log_var[part])


class FlowPosterior:
    """A flow posterior (:class:`~skjnf._distributions.FlowDistribution`) of n rows, built chunk by
    chunk by ``density(rows)`` (a slice of rows): one expert's, or the subset posterior's. Memory
    stays bounded in n."""

    def __init__(self, module: JNFModule, density: Callable[[slice], FlowDistribution], n: int):
        self.module, self.density, self.n = module, density, n

    def mean(self, n_mean_samples: int, generator) -> Tensor:
        """Mean of ``n_mean_samples`` draws inside the aggregate posterior's support
        (:func:`_supported_mean`); a row with none falls back to f⁻¹ of its base mean. The noise
        is shared by all rows (common random numbers: a row's mean never depends on its batch
        mates) and antithetic (:func:`antithetic_noise`)."""
        device, D = generator.device, self.module.latent_dim
        noise = antithetic_noise(n_mean_samples, D, generator, device)
        chunks = []
        for part in device_chunks(self.n, n_mean_samples, device):
            found = self.density(part)
            chunks.append(_supported_mean(self.module, found.rsample(noise), found.base_mean_image))
        return torch.cat(chunks)

    def sample(self, n_draws: int, generator) -> Tensor:
        device, D = generator.device, self.module.latent_dim
        noise = torch.randn(n_draws, self.n, D, generator=generator, device=device)
        parts = device_chunks(self.n, n_draws, device)
        return torch.cat([self.density(part).rsample(noise[:, part]) for part in parts], dim=1)

    def propose(self, part: slice, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Draws of rows ``part`` from base noise (k, 1, D), with their log-density (one inverse pass)."""
        return self.density(part).rsample_and_log_prob(noise)


class ProductPosterior:
    """The Gaussian product of the linearised experts of ``cond`` divided by the aggregate
    posterior (:class:`~skjnf._gaussian_product.GaussianProduct`): closed form, in row chunks.

    ``linearized`` maps (modality, row chunk) to that expert's linearisation; products over
    several subsets of the same rows share one dict, so each expert is linearised once
    (:func:`~skjnf._routing.choose_target_routes`: 170 flow Jacobians on digits6 otherwise, for 6 experts).
    """

    def __init__(self, module: JNFModule, blocks: dict[str, Tensor], cond: Sequence[str], n: int, linearized=None):
        self.module, self.blocks, self.cond, self.n = module, blocks, list(cond), n
        self.linearized = {} if linearized is None else linearized

    def _expert(self, name: str, part: slice) -> tuple[Tensor, Tensor]:
        key = (name, part.start, part.stop)
        if key not in self.linearized:
            module = self.module
            expert = module.expert(name, self.blocks[name][part])
            self.linearized[key] = linearized_expert(expert, module.aggregate_scale_tril, module.aggregate_mean)
        return self.linearized[key]

    def _product(self, part: slice) -> GaussianProduct:
        experts = [self._expert(name, part) for name in self.cond]
        return GaussianProduct(experts, self.module.aggregate_scale_tril, self.module.aggregate_mean)

    def _chunks(self, per_row: int) -> list[slice]:
        device = self.module.aggregate_mean.device
        return device_chunks(self.n, max(per_row, self.module.latent_dim), device)

    def mean(self, n_mean_samples: int, generator) -> Tensor:
        return torch.cat([self._product(part).mean() for part in self._chunks(1)])

    def sample(self, n_draws: int, generator) -> Tensor:
        device, D = generator.device, self.module.latent_dim
        noise = torch.randn(n_draws, self.n, D, generator=generator, device=device)
        return torch.cat([self._product(part).sample(noise[:, part]) for part in self._chunks(n_draws)], dim=1)


class HMCPosterior:
    """A subset posterior known up to a constant, sampled by HMC from the experts (``method``:
    "product", "product_prior" or "generative"; see :func:`_subset_log_target`)."""

    def __init__(self, module, blocks, cond, method: str, hmc: HMCSettings, stats: HMCStats, rows, progress: bool):
        self.experts = [module.expert(name, blocks[name]) for name in cond]
        self.log_target = _subset_log_target(module, blocks, cond, self.experts, method)
        self.hmc, self.stats, self.rows = hmc, stats, rows
        self.progress = _progress_bar(f"HMC on {len(rows)} rows given {list(cond)}") if progress else None

    def _run(self, n_chains: int, generator):
        hmc = self.hmc
        result = hmc_sample(
            self.experts,
            n_chains,
            hmc.n_steps,
            hmc.n_leapfrog,
            hmc.step_size,
            generator,
            progress=self.progress,
            log_target=self.log_target,
        )
        self.stats.add(result, self.rows)
        return result

    def mean(self, n_mean_samples: int, generator) -> Tensor:
        """The mean of the kept positions of ``hmc.n_chains`` chains (the settings size them)."""
        return self._run(self.hmc.n_chains, generator).mean

    def sample(self, n_draws: int, generator) -> Tensor:
        return self._run(n_draws, generator).draws


def _subset_log_target(module: JNFModule, blocks: dict[str, Tensor], cond: Sequence[str], experts, method: str):
    """``log_target(z, rows)`` of HMC for a subset posterior ``method`` other than "amortized";
    None for "product_prior", the product divided by the prior, which is ``hmc_sample``'s own."""
    if method == "generative":  # the model's own posterior: p(z) Π_{j∈S} p(x_j | z)

        def log_target(z, rows):
            return std_normal_log_prob(z) + sum(module.log_likelihood(m, blocks[m][rows], z) for m in cond)

        return log_target
    if method == "product_prior":
        return None

    def log_target(z, rows):
        return product_of_experts_log_prob(z, [e.rows(rows) for e in experts], module.aggregate_log_prob)

    return log_target


def _progress_bar(description: str):
    """A ``progress(chunk_index, n_chunks)`` callback drawing a tqdm bar."""
    bar = None

    def update(index: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, leave=False)
        bar.update(1)
        if index + 1 >= total:
            bar.close()

    return update
