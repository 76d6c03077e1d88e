"""Importance-weighted log-likelihoods: what ``score`` and ``score_samples`` estimate."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._distributions import std_normal_log_prob
from ._modules import JNFModule
from ._posteriors import DECODE_BATCH_ELEMENTS, JointPosterior, device_chunks
from ._routing import flow_posterior

__all__ = ["joint_log_likelihood", "observed_log_likelihood", "conditional_log_likelihood"]


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
    for part in device_chunks(n, k_step, device, DECODE_BATCH_ELEMENTS):
        acc = None
        for k in range(0, n_samples, k_step):
            z, log_w = draw(part, slice(k, k + k_step))
            for t, name in enumerate(names):
                term = module.log_likelihood(name, blocks[name][part], z)
                log_w = log_w + (term if observed is None else torch.where(observed[part, t], term, 0.0))
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
