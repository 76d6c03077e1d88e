"""Which posterior serves a conditioning set: the choices ``fit`` makes on the validation rows
(subset routes, target routes, Gaussian products; stored in the module's buffers) and the
dispatch that reads them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._batch import StageBatch
from ._distributions import reparameterize
from ._modules import JNFModule
from ._posteriors import FlowPosterior, HMCPosterior, HMCSettings, HMCStats, JointPosterior, ProductPosterior

__all__ = [
    "clear_gain",
    "subsets_by_size",
    "subset_label",
    "pick_route",
    "fitted_choices",
    "choose_subset_routes",
    "choose_target_routes",
    "target_conditioning",
    "subset_route",
    "flow_posterior",
    "routed_posterior",
    "posterior",
]


def subsets_by_size(n_modalities: int):
    """(bitmask, member indices) of every non-empty proper subset of M modalities, smallest first."""
    for bits in sorted(range(1, 2**n_modalities - 1), key=lambda b: bin(b).count("1")):
        yield bits, [j for j in range(n_modalities) if bits >> j & 1]


#: A target route leaves a set's own posterior for a smaller set's only where the smaller set's
#: held-out loss is lower by more than this many standard errors of the per-row difference (the
#: one-standard-error rule, here in favour of using every view given). With the plain minimum,
#: wine's 14 validation rows sent a pair to one view on noise (seeds 0-2: mean MSE from two views
#: 0.555 → 0.538, and no pair is left at one view where RidgeCV gains from the second); digits6,
#: 135 rows: mean MSE over its sets of 2+ views 0.389 → 0.390.
TARGET_ROUTE_STANDARD_ERRORS = 1.0


def pick_route(bits: int, members: list[int], used, row_loss, rows: Tensor, standard_errors: float = 0.0) -> int:
    """The posterior subset ``bits`` (S) uses, going up by size: its own unless S minus one member
    already does better through whatever that one uses (``used(smaller bitmask)``), judged by the
    mean of ``row_loss(bitmask)`` (n,) over ``rows`` and, with ``standard_errors`` > 0, better by
    more than that many standard errors of the per-row difference; with no rows to judge, its own."""
    if not rows.any():
        return bits
    candidates = [bits] + [used(bits & ~(1 << j)) for j in members]
    best = min(candidates, key=lambda c: float(row_loss(c)[rows].mean()))
    if (
        best != bits
        and standard_errors > 0
        and not clear_gain((row_loss(bits) - row_loss(best))[rows], standard_errors)
    ):
        return bits
    return best


def clear_gain(gain: Tensor, standard_errors: float) -> bool:
    """Whether the per-row gains ``gain`` (n,) average more than ``standard_errors`` standard
    errors of their mean (a single row: more than 0)."""
    gain = gain.double()
    if len(gain) < 2:
        return float(gain.sum()) > 0
    return float(gain.mean()) > standard_errors * float(gain.std()) / math.sqrt(len(gain))


def subset_label(names, bits: int) -> str:
    """``"a+c"`` for the modalities a bitmask marks."""
    return "+".join(name for j, name in enumerate(names) if bits >> j & 1)


def fitted_choices(module: JNFModule) -> dict:
    """The choices ``fit`` made, read from the module's buffers (their one home), as labels:
    ``{"subset_routes": {"a+b+c": "a+c"}, "target_routes": {"a+b": {"c": "a"}},
    "product_subsets": ["a+b"]}``, each listing only the subsets that do not use their own
    posterior (routes) or that use the Gaussian product (products)."""
    names, n = module.names, len(module.names)
    routes, targets = module.subset_routes.tolist(), module.target_routes.tolist()  # empty when not chosen
    subset_routes, target_routes = {}, {}
    for bits, members in subsets_by_size(n):
        if len(members) < 2:
            continue
        if routes and routes[bits] != bits:
            subset_routes[subset_label(names, bits)] = subset_label(names, routes[bits])
        for t in range(n):
            if targets and not bits >> t & 1 and targets[bits][t] != bits:
                used = subset_label(names, targets[bits][t])
                target_routes.setdefault(subset_label(names, bits), {})[names[t]] = used
    products = [subset_label(names, bits) for bits in module.subset_products.nonzero().flatten().tolist()]
    return {"subset_routes": subset_routes, "target_routes": target_routes, "product_subsets": products}


@torch.no_grad()
def choose_subset_routes(module: JNFModule, batch: StageBatch, noise: Tensor) -> dict[str, str]:
    """Route each subset S of 2..M-1 modalities to the posterior, among S's and its subsets', that
    fits held-out rows best.

    ``batch`` holds validation rows with their frozen joint posterior (``joint_mean``,
    ``joint_log_var``) and ``noise[:, :D]`` draws z from it. Each posterior's loss is its mean
    −log q(z | x_T) there: the expert's for one modality, the subset posterior's for 2..M-1.
    Going up by size, S keeps its own posterior unless some S minus one modality already does
    better (whatever that one routes to): so held-out fit never gets worse as modalities are
    added. This is model selection on the stage-2 objective, the one every posterior was trained
    on; it needs 2^M passes of the subset encoder over the validation rows, so it runs for
    M <= ``MAX_ROUTED_MODALITIES``. Given ``batch.observed`` (n, M), S is judged on the rows observing
    all of S (it keeps its own posterior when there are none). ``module.subset_routes[S]`` gets
    the bitmask of the subset to use; returns ``{"a+b+c": "a+c"}`` for the subsets routed elsewhere.
    """
    n_modalities, routes = len(module.names), module.subset_routes
    if routes.numel() == 0:
        return {}
    blocks, observed = batch.blocks, batch.observed
    z = reparameterize(batch.joint_mean, batch.joint_log_var, noise[:, : module.latent_dim])
    has = torch.ones(len(z), n_modalities, dtype=torch.bool, device=z.device) if observed is None else observed
    row_losses = {}  # bitmask -> per-row −log q of its own posterior (n,)
    used = {}  # bitmask -> bitmask of the posterior it uses
    for j, name in enumerate(module.names):
        row_losses[1 << j] = -module.expert(name, blocks[name]).log_prob(z)
        used[1 << j] = 1 << j
    for bits, members in subsets_by_size(n_modalities):
        if len(members) < 2:
            continue
        mask = torch.zeros(len(z), n_modalities, device=z.device)
        mask[:, members] = 1.0
        row_losses[bits] = -module.subset(blocks, mask, batch.trunk_features).log_prob(z)
        used[bits] = pick_route(bits, members, used.__getitem__, row_losses.__getitem__, has[:, members].all(1))
        routes[bits] = used[bits]
    names = module.names
    return {subset_label(names, bits): subset_label(names, target) for bits, target in used.items() if target != bits}


def subset_route(module: JNFModule, cond: Sequence[str]) -> list[str]:
    """The modalities whose posterior subset ``cond`` uses (``choose_subset_routes``)."""
    if module.subset_routes.numel() == 0:
        return list(cond)
    used = int(module.subset_routes[module.bitmask(cond)])
    return [m for j, m in enumerate(module.names) if used >> j & 1]


def flow_posterior(
    module: JNFModule, blocks: dict[str, Tensor], cond: Sequence[str], follow_routes: bool = True
) -> FlowPosterior:
    """The flow posterior given 1..M-1 modalities ``cond``.

    One modality: its expert. More: the subset encoder and its flow, or, where
    :func:`choose_subset_routes` found a subset of ``cond`` fitting held-out rows better (and
    ``follow_routes``), that one's.
    """
    n = len(next(iter(blocks.values())))
    cond = subset_route(module, cond) if len(cond) > 1 and follow_routes else list(cond)
    if len(cond) == 1:
        name = cond[0]
        return FlowPosterior(module, lambda part: module.expert(name, blocks[name][part]), n)
    mask = torch.tensor([[float(m in cond) for m in module.names]], device=next(iter(blocks.values())).device)

    def density(part: slice):
        sub = {m: blocks[m][part] for m in cond}
        return module.subset(sub, mask.expand(len(next(iter(sub.values()))), -1))

    return FlowPosterior(module, density, n)


def routed_posterior(module: JNFModule, blocks: dict[str, Tensor], cond: Sequence[str], follow_routes: bool = True):
    """The posterior ``fit`` chose for 1..M-1 modalities ``cond`` (``subset_posterior="amortized"``):
    :func:`flow_posterior`, or the Gaussian product of the experts (:class:`ProductPosterior`) where
    :func:`choose_target_routes` found that it predicts held-out modalities better. Without
    ``follow_routes``, ``cond``'s own posterior (its subset flow or product), not its subset route's."""
    if len(cond) > 1:
        routed = subset_route(module, cond) if follow_routes else list(cond)
        if module.subset_products.numel() and bool(module.subset_products[module.bitmask(routed)]):
            return ProductPosterior(module, blocks, routed, len(next(iter(blocks.values()))))
    return flow_posterior(module, blocks, cond, follow_routes)


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
    among S and its subsets, whose own posterior mean predicts t best on held-out rows.

    ``blocks`` are validation rows. Each conditioning set C is scored by the mean of
    −log p(x_t | z̄_C) over the rows observing S and t, with z̄_C the mean of C's own posterior
    (``n_mean_samples`` draws): its expert for one modality; for more, the subset flow's mean or
    the Gaussian product of C's experts (:class:`ProductPosterior`), whichever scores better over
    every target outside C (``module.subset_products[C]``): the subset flow learns each subset
    from a fraction of stage 2's steps, while near-Gaussian experts make the product nearly exact
    (a linear-Gaussian table at 30 stage-2 epochs: MSE 0.00214 → 0.00205). Own, not routed: the
    subset routes (:func:`choose_subset_routes`, ``transform``'s posterior) compare densities of
    the joint posterior's draws, and a subset flow can lose there yet predict a target far better
    (digits6, left + blocks → profile: 0.387 through the blocks' expert, 0.160 through its own
    flow). Going up by size, S keeps its own posterior for t unless S minus one modality already
    predicts t better (through whichever set that one uses), beyond ``TARGET_ROUTE_STANDARD_ERRORS``
    of the rows' noise: so, on held-out rows, adding a modality never makes a prediction worse
    beyond their noise. This is model selection on validation rows; it needs
    2^M - 2 posterior means, so it runs for M <= ``MAX_TARGET_ROUTED_MODALITIES``.
    ``module.target_routes[S, t]`` gets the bitmask of the set whose own posterior ``predict``
    decodes (``module.target_routes_own``); returns ``{"a+b": {"c": "a"}}`` for the pairs routed
    elsewhere.
    """
    routes, names = module.target_routes, module.names
    n_modalities = len(names)
    if routes.numel() == 0:
        return {}
    n = len(next(iter(blocks.values())))
    device = next(iter(blocks.values())).device
    has = torch.ones(n, n_modalities, dtype=torch.bool, device=device) if observed is None else observed
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
        found = flow_posterior(module, sub, cond, follow_routes=False)  # S's subset flow, or its expert
        own = _target_losses(module, blocks, found, targets, n_mean_samples, generator)
        if len(members) > 1:  # S's own: the subset flow or the product
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
                used[bits, t] = pick_route(bits, members, route, loss, rows[target], TARGET_ROUTE_STANDARD_ERRORS)
            routes[bits, t] = used[bits, t]
    module.target_routes_own.fill_(True)
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
    follow_routes: bool = True,
):
    """The posterior of the rows in ``blocks`` (one observed pattern) given ``cond``, an object
    with ``mean(n_mean_samples, generator)`` (n, D) and ``sample(n_draws, generator)`` (n_draws, n, D).

    ``cond`` = every modality: the joint encoder; one: that expert through its flow; otherwise
    ``subset_posterior``: "amortized", the posterior ``fit`` chose for ``cond``
    (:func:`routed_posterior`; ``cond``'s own without ``follow_routes``); else HMC on the
    product of experts divided by the aggregate posterior ("product") or by the prior
    ("product_prior", the paper's), or on the decoders' posterior ("generative").
    """
    if len(cond) == len(module.names):
        return JointPosterior(module, blocks)
    if len(cond) == 1 or subset_posterior == "amortized":
        return routed_posterior(module, blocks, cond, follow_routes)
    return HMCPosterior(module, blocks, cond, subset_posterior, hmc, stats, rows, progress)
