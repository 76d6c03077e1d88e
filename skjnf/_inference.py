"""Posterior inference for any conditioning set, and importance-weighted likelihoods."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._chunks import row_chunks
from ._distributions import gaussian_log_prob, reparameterize, std_normal_log_prob
from ._gaussian_product import GaussianProduct, linearized_expert
from ._hmc import hmc_sample, product_of_experts_log_prob
from ._modules import JNFModule, pick_route, subset_label, subsets_by_size

__all__ = [
    "SUBSET_POSTERIORS",
    "HMCSettings",
    "frozen_inference",
    "joint_posterior",
    "pattern_groups",
    "pattern_generator",
    "posterior_latents",
    "latents_by_pattern",
    "marginal_log_likelihood",
    "joint_log_likelihood",
    "conditional_log_likelihood",
    "observed_log_likelihood",
    "flow_posterior",
    "routed_posterior",
    "decode_in_chunks",
    "choose_target_routes",
    "target_conditioning",
]

#: Most (draws x rows) pushed through a network at once, per device type: bounds memory.
MAX_BATCH_ELEMENTS = {"cpu": 2**14, "cuda": 2**16}
#: Budget units one row costs in an encoder pass: its activations are hidden-layer wide.
JOINT_ROW_COST = 4
#: Most latents per decoder pass when scoring or decoding. On CPU, chunks this small keep the
#: hidden activations in cache: the joint log-likelihood ran 2-3x faster than with 2**14
#: (benchmarks/README.md); on CUDA, large batches keep the device busy.
DECODE_BATCH_ELEMENTS = {"cpu": 2**10, "cuda": 2**16}


@dataclass(frozen=True)
class HMCSettings:
    n_chains: int
    n_steps: int
    n_leapfrog: int
    step_size: float | str


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

    def as_dict(self) -> dict:
        return {
            "acceptance": self.acceptance,
            "step_size": self.step_size,
            "n_divergent": self.n_divergent,
            "escaped_rows": list(self.escaped_rows),
        }


@contextmanager
def frozen_inference(module: torch.nn.Module):
    """``eval()``, ``no_grad`` and every parameter's ``requires_grad`` off; all restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if was_training:  # a fitted module is already in eval mode: skip the recursive walk
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if was_training:
            module.train()


def _row_chunks(n_rows: int, per_row: int, device: torch.device, budgets=MAX_BATCH_ELEMENTS) -> list[slice]:
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
        for part in _row_chunks(n, JOINT_ROW_COST, device)
    ]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def pattern_groups(observed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows grouped by observed pattern: ``[(pattern (M,), row indices)]``, in first-seen order."""
    patterns, inverse = np.unique(observed, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort([np.flatnonzero(inverse == k)[0] for k in range(len(patterns))])
    return [(patterns[k], np.flatnonzero(inverse == k)) for k in order]


def pattern_generator(seed: int, pattern: np.ndarray, device: torch.device) -> torch.Generator:
    """A generator seeded from (call seed, pattern bitmask): patterns never share noise."""
    bitmask = int(sum(1 << j for j, on in enumerate(pattern) if on))
    state = np.random.SeedSequence([seed, bitmask]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))


#: How the posterior given a subset of 2..M-1 modalities is computed (``subset_posterior``).
SUBSET_POSTERIORS = ("amortized", "product", "product_prior", "generative")


def _flow_draws(base: tuple[Tensor, Tensor], flow: torch.nn.Module, noise: Tensor) -> Tensor:
    """f⁻¹(μ + σ·ε) for a base Gaussian (μ, log σ²) of shape (n, D), noise (P, n, D) or (P, 1, D)."""
    mean, log_var = base
    u = reparameterize(mean, log_var, noise)
    u = u.expand(noise.shape[0], *mean.shape)
    z, _ = flow.inverse(u.reshape(-1, u.shape[-1]))
    return z.reshape(u.shape)


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


def _supported_mean(module: JNFModule, draws: Tensor, fallback: Callable[[], Tensor]) -> Tensor:
    """Mean over draws (P, n, D) inside the aggregate posterior's support; rows with none take
    ``fallback()`` (n, D), computed only when some row needs it.

    A flow posterior's far tails (where its inverse amplifies the base noise most) can put a
    few draws hundreds of units out; the experts integrate to the aggregate posterior, so mass
    beyond its 1 − 1e-6 region is an artefact, and one such draw would ruin a row's mean.
    """
    inside = (module.aggregate_whitened(draws) ** 2).sum(-1) <= support_radius(module.latent_dim)
    count = inside.sum(0)
    mean = torch.where(inside[..., None], draws, torch.zeros_like(draws)).sum(0) / count.clamp(min=1)[:, None]
    if bool((count > 0).all()):
        return mean
    return torch.where((count > 0)[:, None], mean, fallback())


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
    """A flow posterior: z = f⁻¹(u), u ~ N(μ, σ²) from ``encode(rows)`` (a slice of rows); one
    expert's, or the subset posterior's. Computed in row chunks: memory bounded in n."""

    def __init__(self, module: JNFModule, encode: Callable[[slice], tuple[Tensor, Tensor]], flow, n: int):
        self.module, self.encode, self.flow, self.n = module, encode, flow, n

    def mean(self, n_mean_samples: int, generator) -> Tensor:
        """Mean of ``n_mean_samples`` draws inside the aggregate posterior's support
        (:func:`_supported_mean`); a row with none falls back to f⁻¹ of its base mean. The noise
        is shared by all rows (common random numbers: a row's mean never depends on its batch
        mates) and antithetic (:func:`antithetic_noise`)."""
        device, D = generator.device, self.module.latent_dim
        noise = antithetic_noise(n_mean_samples, D, generator, device)
        chunks = []
        for part in _row_chunks(self.n, n_mean_samples, device):
            base = self.encode(part)
            draws = _flow_draws(base, self.flow, noise)
            chunks.append(_supported_mean(self.module, draws, lambda base=base: self.flow.inverse(base[0])[0]))
        return torch.cat(chunks)

    def sample(self, n_draws: int, generator) -> Tensor:
        device, D = generator.device, self.module.latent_dim
        noise = torch.randn(n_draws, self.n, D, generator=generator, device=device)
        chunks = [
            _flow_draws(self.encode(part), self.flow, noise[:, part]) for part in _row_chunks(self.n, n_draws, device)
        ]
        return torch.cat(chunks, dim=1)

    def propose(self, part: slice, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Draws of rows ``part`` from base noise (k, 1, D), with their log-density from the same
        inverse pass: log q(z) = log N(u; μ, σ²) − log|det dz/du|."""
        mean, log_var = self.encode(part)
        u = reparameterize(mean, log_var, noise)  # (k, r, D)
        z, log_det = self.flow.inverse(u.reshape(-1, u.shape[-1]))
        return z.reshape(u.shape), gaussian_log_prob(u, mean, log_var) - log_det.reshape(u.shape[:-1])


class ProductPosterior:
    """The Gaussian product of the linearised experts of ``cond`` divided by the aggregate
    posterior (:class:`~skjnf._gaussian_product.GaussianProduct`): closed form, in row chunks.

    ``linearized`` maps (modality, row chunk) to that expert's linearisation; products over
    several subsets of the same rows share one dict, so each expert is linearised once
    (:func:`choose_target_routes`: 170 flow Jacobians on digits6 otherwise, for 6 experts).
    """

    def __init__(self, module: JNFModule, blocks: dict[str, Tensor], cond: Sequence[str], n: int, linearized=None):
        self.module, self.blocks, self.cond, self.n = module, blocks, list(cond), n
        self.linearized = {} if linearized is None else linearized

    def _expert(self, name: str, part: slice) -> tuple[Tensor, Tensor]:
        key = (name, part.start, part.stop)
        if key not in self.linearized:
            module = self.module
            base = module.expert_posterior(name, self.blocks[name][part])
            flow = module.flows[module.index(name)]
            self.linearized[key] = linearized_expert(flow, base, module.aggregate_scale_tril, module.aggregate_mean)
        return self.linearized[key]

    def _product(self, part: slice) -> GaussianProduct:
        experts = [self._expert(name, part) for name in self.cond]
        return GaussianProduct(experts, self.module.aggregate_scale_tril, self.module.aggregate_mean)

    def _chunks(self, per_row: int) -> list[slice]:
        device = self.module.aggregate_mean.device
        return _row_chunks(self.n, max(per_row, self.module.latent_dim), device)

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
        self.experts = []
        for name in cond:
            mean, log_var = module.expert_posterior(name, blocks[name])
            self.experts.append((mean, log_var, module.flows[module.index(name)]))
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
        chunk = [(mean[rows], log_var[rows], flow) for mean, log_var, flow in experts]
        return product_of_experts_log_prob(z, chunk, module.aggregate_log_prob)

    return log_target


def _subset_route(module: JNFModule, cond: Sequence[str]) -> list[str]:
    """The modalities whose posterior subset ``cond`` uses (``choose_subset_routes``)."""
    if module.subset_routes.numel() == 0:
        return list(cond)
    used = int(module.subset_routes[module.bitmask(cond)])
    return [m for j, m in enumerate(module.names) if used >> j & 1]


def flow_posterior(module: JNFModule, blocks: dict[str, Tensor], cond: Sequence[str]) -> FlowPosterior:
    """The flow posterior given 1..M-1 modalities ``cond``.

    One modality: its expert. More: the subset encoder and its flow, or, where
    :func:`choose_subset_routes` found a subset of ``cond`` fitting held-out rows better, that one's.
    """
    n = len(next(iter(blocks.values())))
    cond = _subset_route(module, cond) if len(cond) > 1 else list(cond)
    if len(cond) == 1:
        name = cond[0]

        def encode(part: slice) -> tuple[Tensor, Tensor]:
            return module.expert_posterior(name, blocks[name][part])

        return FlowPosterior(module, encode, module.flows[module.index(name)], n)
    mask = torch.tensor([[float(m in cond) for m in module.names]], device=next(iter(blocks.values())).device)

    def encode(part: slice) -> tuple[Tensor, Tensor]:
        sub = {m: blocks[m][part] for m in cond}
        return module.subset_posterior(sub, mask.expand(len(next(iter(sub.values()))), -1))

    return FlowPosterior(module, encode, module.subset_flow, n)


def routed_posterior(module: JNFModule, blocks: dict[str, Tensor], cond: Sequence[str]):
    """The posterior ``fit`` chose for 1..M-1 modalities ``cond`` (``subset_posterior="amortized"``):
    :func:`flow_posterior`, or the Gaussian product of the experts (:class:`ProductPosterior`) where
    :func:`choose_target_routes` found that it predicts held-out modalities better."""
    if len(cond) > 1:
        routed = _subset_route(module, cond)
        if module.subset_products.numel() and bool(module.subset_products[module.bitmask(routed)]):
            return ProductPosterior(module, blocks, routed, len(next(iter(blocks.values()))))
    return flow_posterior(module, blocks, cond)


def _target_losses(module: JNFModule, blocks, found, targets: Sequence[str], n_mean_samples: int, generator):
    """Per target t, the per-row −log p(x_t | z̄) (n,) at the posterior mean z̄ of ``found``."""
    z = found.mean(n_mean_samples, generator)
    return {t: -module.log_likelihood(t, blocks[t], z) for t in targets}


def _mean_over_targets(losses: dict[str, Tensor], rows: dict[str, Tensor]) -> float:
    """Σ_t of the mean of ``losses[t]`` over ``rows[t]`` (targets with no rows left out)."""
    return sum(float(loss[rows[t]].mean()) for t, loss in losses.items() if rows[t].any())


@torch.no_grad()
def choose_target_routes(
    module: JNFModule, blocks: dict[str, Tensor], observed: Tensor | None, n_mean_samples: int, seed: int
) -> dict[str, dict[str, str]]:
    """For each subset S of 2..M-1 modalities and each target t outside S, the conditioning set,
    among S and its subsets, whose posterior mean predicts t best on held-out rows.

    ``blocks`` are validation rows. Each conditioning set C is scored by the mean of
    −log p(x_t | z̄_C) over the rows observing S and t, with z̄_C the posterior mean that
    ``predict`` decodes (:func:`routed_posterior`, ``n_mean_samples`` draws). First, where S uses
    its own posterior (``choose_subset_routes``), the subset flow's mean and the Gaussian product
    of S's experts (:class:`ProductPosterior`) are scored over every target outside S, and the
    better becomes S's own posterior (``module.subset_products[S]``): the subset flow learns each
    subset from a fraction of stage 2's steps, while near-Gaussian experts make the product
    nearly exact (a linear-Gaussian table at 30 stage-2 epochs: MSE 0.00214 → 0.00205). Going up by size, S
    keeps its own posterior for t unless S minus one modality already predicts t better (through
    whichever set that one uses): so, on held-out rows, adding a modality never makes a
    prediction worse. The subset posterior serves every S with one network; where one view
    determines the latent almost alone, its mean for S follows that view even for a target the
    others predict better. This is model selection on validation rows, the way
    :func:`~skjnf._modules.choose_subset_routes` chooses ``transform``'s posterior; it needs
    2^M - 2 posterior means, so it runs for M <= ``MAX_TARGET_ROUTED_MODALITIES``.
    ``module.target_routes[S, t]`` gets the bitmask of the set to use; returns
    ``{"a+b": {"c": "a"}}`` for the pairs routed elsewhere.
    """
    routes, names = module.target_routes, module.names
    n_modalities = len(names)
    if routes.numel() == 0:
        return {}
    n = len(next(iter(blocks.values())))
    device = next(iter(blocks.values())).device
    has = torch.ones(n, n_modalities, dtype=torch.bool, device=device) if observed is None else observed > 0
    losses = {}  # (bitmask, t) -> per-row −log p(x_t | z̄) of that set's posterior mean (n,)
    used = {}  # (bitmask, t) -> bitmask of the set whose posterior predicts t
    module.subset_products.zero_()
    linearized = {}  # each expert's linearisation, shared by the products: M·n·D² floats at most
    for bits, members in subsets_by_size(n_modalities):
        cond = [names[j] for j in members]
        sub = {m: blocks[m] for m in cond}
        targets = [names[t] for t in range(n_modalities) if not bits >> t & 1]
        rows = {t: has[:, members + [module.index(t)]].all(1) for t in targets}
        generator = torch.Generator(device=device).manual_seed(seed)
        own = _target_losses(module, blocks, routed_posterior(module, sub, cond), targets, n_mean_samples, generator)
        if len(members) > 1 and _subset_route(module, cond) == cond:  # S's own: the subset flow or the product
            found = ProductPosterior(module, sub, cond, n, linearized)
            product = _target_losses(module, blocks, found, targets, n_mean_samples, generator)  # closed form
            if _mean_over_targets(product, rows) < _mean_over_targets(own, rows):
                module.subset_products[bits] = True
                own = product
        for target in targets:
            t = module.index(target)
            losses[bits, t], used[bits, t] = own[target], bits
            if len(members) > 1:  # one modality: its expert, nothing smaller to compare with
                route, loss = (lambda c, t=t: used[c, t]), (lambda c, t=t: losses[c, t])
                used[bits, t] = pick_route(bits, members, route, loss, rows[target])
            routes[bits, t] = used[bits, t]
    chosen = {}
    for (bits, t), target_bits in used.items():
        if target_bits != bits:
            chosen.setdefault(subset_label(names, bits), {})[names[t]] = subset_label(names, target_bits)
    return chosen


def target_conditioning(module: JNFModule, conditioning: np.ndarray, target: str) -> np.ndarray:
    """The conditioning mask (n, M) whose posterior mean predicts ``target`` for each row whose
    conditioning set is ``conditioning`` (:func:`choose_target_routes`; unchanged where none was chosen)."""
    routes = module.target_routes
    if routes.numel() == 0:
        return conditioning
    powers = 1 << np.arange(len(module.names))
    bits = conditioning.astype(np.int64) @ powers
    used = routes[:, module.index(target)].cpu().numpy()[bits]
    return (used[:, None] & powers) > 0


def posterior(
    module: JNFModule,
    blocks: dict[str, Tensor],
    cond: Sequence[str],
    *,
    subset_posterior: str,
    hmc: HMCSettings,
    stats: HMCStats,
    rows: np.ndarray,
    progress: bool = False,
):
    """The posterior of the rows in ``blocks`` (one observed pattern) given ``cond``, an object
    with ``mean(n_mean_samples, generator)`` (n, D) and ``sample(n_draws, generator)`` (n_draws, n, D).

    ``cond`` = every modality: the joint encoder; one: that expert through its flow; otherwise
    ``subset_posterior``: "amortized", the subset encoder through its flow; else HMC on the
    product of experts divided by the aggregate posterior ("product") or by the prior
    ("product_prior", the paper's), or on the decoders' posterior ("generative").
    """
    if len(cond) == len(module.names):
        return JointPosterior(module, blocks)
    if len(cond) == 1 or subset_posterior == "amortized":
        return routed_posterior(module, blocks, cond)
    return HMCPosterior(module, blocks, cond, subset_posterior, hmc, stats, rows, progress)


def posterior_latents(
    module: JNFModule,
    blocks: dict[str, Tensor],
    cond: Sequence[str],
    *,
    n_draws: int | None,
    n_mean_samples: int,
    hmc: HMCSettings,
    generator: torch.Generator,
    stats: HMCStats,
    rows: np.ndarray,
    progress: bool = False,
    subset_posterior: str = "amortized",
) -> Tensor:
    """Posterior mean (``n_draws=None``, shape (n, D)) or draws (n_draws, n, D) given ``cond``,
    from :func:`posterior`; ``blocks`` holds the rows of one observed pattern."""
    found = posterior(
        module, blocks, cond, subset_posterior=subset_posterior, hmc=hmc, stats=stats, rows=rows, progress=progress
    )
    return found.mean(n_mean_samples, generator) if n_draws is None else found.sample(n_draws, generator)


def latents_by_pattern(
    module: JNFModule,
    data,
    conditioning: np.ndarray,
    *,
    n_draws: int | None,
    n_mean_samples: int,
    hmc: HMCSettings,
    seed: int,
    stats: HMCStats,
    subset_posterior: str,
    progress: bool = False,
) -> np.ndarray:
    """Posterior means (n, D) or draws (n_draws, n, D) of every row of ``data`` (``ModalityData``),
    each given the modalities ``conditioning`` (n, M) marks: one batched posterior per pattern,
    with noise of its own (:func:`pattern_generator`)."""
    device, D = next(module.parameters()).device, module.latent_dim
    shape = (data.n_samples, D) if n_draws is None else (n_draws, data.n_samples, D)
    out = np.empty(shape, dtype=np.float32)
    for pattern, rows in pattern_groups(conditioning):
        cond = [m for m, on in zip(module.names, pattern) if on]
        blocks = {m: data.blocks[m][torch.from_numpy(rows)].to(device) for m in cond}
        z = posterior_latents(
            module,
            blocks,
            cond,
            n_draws=n_draws,
            n_mean_samples=n_mean_samples,
            hmc=hmc,
            generator=pattern_generator(seed, pattern, device),
            stats=stats,
            rows=rows,
            progress=progress,
            subset_posterior=subset_posterior,
        )
        out[..., rows, :] = z.cpu().numpy()
    return out


def marginal_log_likelihood(module: JNFModule, data, n_samples: int, seed: int) -> np.ndarray:
    """log p̂(x_O) of every row of ``data`` (``ModalityData``) on what it observes, by pattern: the
    joint posterior proposes for complete rows (noise from ``seed``), the flow posterior given O
    for the others (noise of their pattern's own)."""
    device = next(module.parameters()).device
    out = np.empty(data.n_samples, dtype=np.float64)
    for pattern, rows in pattern_groups(data.observed):
        cond = [m for m, on in zip(module.names, pattern) if on]
        blocks = {m: data.blocks[m][torch.from_numpy(rows)].to(device) for m in cond}
        if len(cond) == len(module.names):
            generator = torch.Generator(device=device).manual_seed(seed)
            log_p = joint_log_likelihood(module, blocks, n_samples, generator)
        else:
            generator = pattern_generator(seed, pattern, device)
            log_p = observed_log_likelihood(module, blocks, cond, n_samples, generator)
        out[rows] = log_p.cpu().numpy()
    return out


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


def _importance_log_likelihood(
    module: JNFModule,
    blocks: dict[str, Tensor],
    names: Sequence[str],
    n_samples: int,
    draw: Callable[[slice, slice], tuple[Tensor, Tensor | float]],
    observed: Tensor | None = None,
) -> Tensor:
    """log p̂(x_names) per row (float64): logmeanexp_k of log w_k = Σ_m log p(x_m | z_k) + c_k, for
    draws ``draw(rows, ks)`` -> (z_k (k, r, D), c_k): c_k = log p(z_k) − log q(z_k) for importance
    sampling from a proposal q, 0 for draws from the posterior itself (a plain Monte Carlo mean).

    ``observed`` (n, len(names)) leaves out the modalities a row does not observe (a row
    observing none of them scores 0, the log-probability of nothing). Rows and draws go in
    chunks, so memory stays bounded in n and K.
    """
    n, device = len(next(iter(blocks.values()))), next(iter(blocks.values())).device
    out = torch.empty(n, dtype=torch.float64, device=device)
    k_step = min(n_samples, DECODE_BATCH_ELEMENTS.get(device.type, DECODE_BATCH_ELEMENTS["cuda"]))
    for part in _row_chunks(n, k_step, device, DECODE_BATCH_ELEMENTS):
        acc = None
        for k in range(0, n_samples, k_step):
            z, log_w = draw(part, slice(k, k + k_step))
            for t, name in enumerate(names):
                term = module.log_likelihood(name, blocks[name][part], z)
                log_w = log_w + (term if observed is None else observed[part, t] * term)
            chunk = torch.logsumexp(torch.as_tensor(log_w).double(), dim=0)
            acc = chunk if acc is None else torch.logaddexp(acc, chunk)
        out[part] = acc - math.log(n_samples)
    return out


def _importance_draws(proposal, n_samples: int, latent_dim: int, generator):
    """``draw(rows, ks)`` for :func:`_importance_log_likelihood` from a posterior object's
    ``propose``; the base noise (K, 1, D) is shared by all rows, so a row's estimate never
    depends on its batch mates."""
    noise = torch.randn(n_samples, 1, latent_dim, generator=generator, device=generator.device)

    def draw(part: slice, ks: slice) -> tuple[Tensor, Tensor]:
        z, log_q = proposal.propose(part, noise[ks])
        return z, std_normal_log_prob(z) - log_q

    return draw


def joint_log_likelihood(module: JNFModule, blocks: dict[str, Tensor], n_samples: int, generator) -> Tensor:
    """Importance-weighted log p̂(X) per row (float64), the joint posterior as the proposal."""
    draw = _importance_draws(JointPosterior(module, blocks), n_samples, module.latent_dim, generator)
    return _importance_log_likelihood(module, blocks, module.names, n_samples, draw)


def observed_log_likelihood(
    module: JNFModule, blocks: dict[str, Tensor], cond: Sequence[str], n_samples: int, generator
) -> Tensor:
    """Importance-weighted log p̂(x_O) per row (float64) of rows observing only ``cond`` (1..M-1).

    The proposal is the flow posterior given ``cond`` (:func:`flow_posterior`): trained to cover
    the joint posterior, it is mass-covering, as an importance proposal should be.
    """
    draw = _importance_draws(flow_posterior(module, blocks, cond), n_samples, module.latent_dim, generator)
    return _importance_log_likelihood(module, blocks, cond, n_samples, draw)


def conditional_log_likelihood(
    module: JNFModule, blocks: dict[str, Tensor], targets: Sequence[str], draws: Tensor, observed: Tensor | None = None
) -> Tensor:
    """log p̂(x_T | x_S) = logsumexp_k Σ_{m∈T} log p(x_m | z_k) − log K, z_k posterior draws (K, n, D).

    ``observed`` (n, len(targets)) leaves out, per row, the targets it does not observe.
    """
    return _importance_log_likelihood(
        module, blocks, targets, draws.shape[0], lambda part, ks: (draws[ks, part], 0.0), observed
    )


def decode_in_chunks(decode, latent: Tensor) -> Tensor:
    """``decode`` (a (m, D) -> (m, ...) map) over latents of any leading shape, in row chunks."""
    flat = latent.reshape(-1, latent.shape[-1])
    parts = [decode(flat[part]) for part in _row_chunks(len(flat), 1, latent.device, DECODE_BATCH_ELEMENTS)]
    out = torch.cat(parts) if parts else decode(flat)
    return out.reshape(*latent.shape[:-1], *out.shape[1:])
