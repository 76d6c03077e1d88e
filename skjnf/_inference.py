"""Posterior inference for any conditioning set, and importance-weighted likelihoods."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._distributions import reparameterize
from ._hmc import hmc_sample
from ._modules import JNFModule, joint_log_weights

__all__ = [
    "HMCSettings",
    "frozen_inference",
    "joint_posterior",
    "pattern_groups",
    "pattern_generator",
    "posterior_latents",
    "joint_log_likelihood",
    "conditional_log_likelihood",
    "decode_in_chunks",
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


def _row_chunks(n_rows: int, per_row: int, device: torch.device, budgets=MAX_BATCH_ELEMENTS) -> Iterator[slice]:
    budget = budgets.get(device.type, budgets["cuda"])
    step = max(1, budget // max(per_row, 1))
    for start in range(0, n_rows, step):
        yield slice(start, start + step)


def joint_posterior(module: JNFModule, blocks: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(mean, log-variance) of q(z | X) for every row, in row chunks: memory bounded in n."""
    n = len(next(iter(blocks.values())))
    device = next(iter(blocks.values())).device
    parts = [
        module.joint_posterior({name: x[part] for name, x in blocks.items()})
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


def _expert_draws(module: JNFModule, name: str, x: Tensor, noise: Tensor) -> Tensor:
    """f_j⁻¹(μ_j + σ_j·ε) for noise of shape (P, n, D) or (P, 1, D); returns (P, n, D)."""
    mean, log_var = module.expert_posterior(name, x)
    u = reparameterize(mean, log_var, noise)
    u = u.expand(noise.shape[0], *mean.shape)
    z, _ = module.flows[module.index(name)].inverse(u.reshape(-1, u.shape[-1]))
    return z.reshape(u.shape)


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
) -> Tensor:
    """Posterior mean (``n_draws=None``, shape (n, D)) or draws (n_draws, n, D) given ``cond``.

    ``cond`` = every modality: the joint encoder; one: that expert through its flow; otherwise
    HMC on the product of experts. ``blocks`` holds the rows of one observed pattern.
    """
    n, D = len(rows), module.latent_dim
    device = next(iter(blocks.values())).device
    if len(cond) == len(module.names):
        mean, log_var = joint_posterior(module, blocks)
        if n_draws is None:
            return mean
        noise = torch.randn(n_draws, n, D, generator=generator, device=device)
        return reparameterize(mean, log_var, noise)
    if len(cond) == 1:
        name = cond[0]
        if n_draws is None:  # common random numbers: a row's mean never depends on its batch mates
            noise = torch.randn(n_mean_samples, 1, D, generator=generator, device=device)
            chunks = [
                _expert_draws(module, name, blocks[name][part], noise).mean(0)
                for part in _row_chunks(n, n_mean_samples, device)
            ]
            return torch.cat(chunks)
        noise = torch.randn(n_draws, n, D, generator=generator, device=device)
        chunks = [
            _expert_draws(module, name, blocks[name][part], noise[:, part])
            for part in _row_chunks(n, n_draws, device)
        ]
        return torch.cat(chunks, dim=1)
    experts = []
    for name in cond:
        mean, log_var = module.expert_posterior(name, blocks[name])
        experts.append((mean, log_var, module.flows[module.index(name)]))
    n_chains = hmc.n_chains if n_draws is None else n_draws
    result = hmc_sample(
        experts, n_chains, hmc.n_steps, hmc.n_leapfrog, hmc.step_size, generator,
        progress=_progress_bar(f"HMC on {n} rows given {cond}") if progress else None,
    )
    stats.add(result, rows)
    return result.mean if n_draws is None else result.draws


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


def joint_log_likelihood(module: JNFModule, blocks: dict[str, Tensor], n_samples: int, generator) -> Tensor:
    """Importance-weighted log p̂(X) per row (float64), noise (K, D) shared by all rows."""
    mean, log_var = joint_posterior(module, blocks)
    n, device = mean.shape[0], mean.device
    noise = torch.randn(n_samples, module.latent_dim, generator=generator, device=device)
    out = torch.empty(n, dtype=torch.float64, device=device)
    k_step = min(n_samples, DECODE_BATCH_ELEMENTS.get(device.type, DECODE_BATCH_ELEMENTS["cuda"]))
    for part in _row_chunks(n, k_step, device, DECODE_BATCH_ELEMENTS):
        sub = {name: x[part] for name, x in blocks.items()}
        acc = torch.full((mean[part].shape[0],), -math.inf, dtype=torch.float64, device=device)
        for k in range(0, n_samples, k_step):
            log_w = joint_log_weights(module, sub, mean[part], log_var[part], noise[k : k + k_step])
            acc = torch.logaddexp(acc, torch.logsumexp(log_w.double(), dim=0))
        out[part] = acc - math.log(n_samples)
    return out


def conditional_log_likelihood(
    module: JNFModule, blocks: dict[str, Tensor], targets: Sequence[str], draws: Tensor
) -> Tensor:
    """log p̂(x_T | x_S) = logsumexp_k Σ_{m∈T} log p(x_m | z_k) − log K, z_k posterior draws (K, n, D)."""
    n_samples, n = draws.shape[:2]
    out = torch.empty(n, dtype=torch.float64, device=draws.device)
    for part in _row_chunks(n, n_samples, draws.device, DECODE_BATCH_ELEMENTS):
        log_p = sum(module.log_likelihood(name, blocks[name][part], draws[:, part]).double() for name in targets)
        out[part] = torch.logsumexp(log_p, dim=0) - math.log(n_samples)
    return out


def decode_in_chunks(decode, latent: Tensor) -> Tensor:
    """``decode`` (a (m, D) -> (m, ...) map) over latents of any leading shape, in row chunks."""
    flat = latent.reshape(-1, latent.shape[-1])
    parts = [decode(flat[part]) for part in _row_chunks(len(flat), 1, latent.device, DECODE_BATCH_ELEMENTS)]
    out = torch.cat(parts) if parts else decode(flat)
    return out.reshape(*latent.shape[:-1], *out.shape[1:])
