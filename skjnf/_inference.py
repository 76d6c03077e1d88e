"""What a fitted module answers: latents, predictions, decoded outputs and log-likelihoods.

:class:`Inference` is built on demand by each public call of the estimator from the fitted
module and the call's settings (nothing of it is pickled). Its tensors stay on the module's
device; the estimator turns them into numpy arrays once, at the end of the call. The posterior
objects live in :mod:`~skjnf._posteriors`, the choice of posterior per conditioning set in
:mod:`~skjnf._routing`, the importance estimators in :mod:`~skjnf._scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ._modules import JNFModule
from ._posteriors import DECODE_BATCH_ELEMENTS, HMCSettings, HMCStats, device_chunks
from ._routing import posterior, target_conditioning
from ._scoring import conditional_log_likelihood, joint_log_likelihood, observed_log_likelihood

__all__ = ["Inference", "InferenceSettings", "pattern_groups", "pattern_generator", "decode_in_chunks"]


@dataclass(frozen=True)
class InferenceSettings:
    """The estimator's inference parameters, as one call uses them."""

    n_posterior_samples: int  # draws averaged into a posterior mean
    n_importance_samples: int  # draws per row of score_samples
    subset_posterior: str
    hmc: HMCSettings
    seed: int  # the call's: fit's inference seed, or from the call's random_state
    progress: bool = False


@dataclass
class Inference:
    """Inference with a fitted (frozen) :class:`~skjnf._modules.JNFModule`; one per call.

    ``conditioning`` arguments are (n, M) boolean masks over ``module.names``: the modalities
    each row is conditioned on (already checked by the estimator). HMC diagnostics of the call
    accumulate in ``stats``.
    """

    module: JNFModule
    settings: InferenceSettings
    stats: HMCStats = field(default_factory=HMCStats)

    @property
    def device(self) -> torch.device:
        return self.module.aggregate_mean.device

    @torch.no_grad()
    def latents(self, data, conditioning: np.ndarray, n_draws: int | None = None, follow_routes: bool = True) -> Tensor:
        """Posterior means (n, D), or ``n_draws`` draws (n_draws, n, D), of every row of ``data``
        (``ModalityData``): one batched posterior per conditioning pattern (:func:`~skjnf._routing.posterior`;
        without ``follow_routes``, each pattern's own, not its subset route's), with noise of its
        own (:func:`pattern_generator`)."""
        module, settings, device = self.module, self.settings, self.device
        shape = (data.n_samples, module.latent_dim) if n_draws is None else (n_draws, data.n_samples, module.latent_dim)
        out = torch.empty(shape, device=device)
        for pattern, rows, cond, blocks in self._by_pattern(data, conditioning):
            found = posterior(
                module,
                blocks,
                cond,
                subset_posterior=settings.subset_posterior,
                hmc=settings.hmc,
                stats=self.stats,
                rows=rows,
                progress=settings.progress,
                follow_routes=follow_routes,
            )
            generator = pattern_generator(settings.seed, pattern, device)
            if n_draws is None:
                z = found.mean(settings.n_posterior_samples, generator)
            else:
                z = found.sample(n_draws, generator)
            out[..., torch.from_numpy(rows).to(device), :] = z
        return out

    @torch.no_grad()
    def predictions(self, data, conditioning: np.ndarray, output: str, names) -> dict[str, Tensor]:
        """Each modality of ``names``'s ``output`` decoded at the posterior mean that predicts it:
        given the row's conditioning set S or, with the amortised subset posterior, given the
        subset of S whose own posterior predicted it best on the validation rows in ``fit``
        (``target_routes_``)."""
        latents, out = {}, {}
        routed = self.settings.subset_posterior == "amortized"
        follow_routes = not (routed and bool(self.module.target_routes_own))
        for name in names:
            mask = target_conditioning(self.module, conditioning, name) if routed else conditioning
            key = mask.tobytes()
            if key not in latents:
                latents[key] = self.latents(data, mask, follow_routes=follow_routes)
            out[name] = self.decode(latents[key], output, [name])[name]
        return out

    @torch.no_grad()
    def decode(self, z: Tensor, output: str, names, seed: int | None = None) -> dict[str, Tensor]:
        """Each modality of ``names``'s ``output`` at latents ``z`` (..., D): "mean", "predict",
        "probabilities" or "sample" (noise from ``seed``, else the call's)."""
        seed = self.settings.seed if seed is None else seed
        generator = torch.Generator(device=self.device).manual_seed(seed)
        z = z.to(self.device, torch.float32)

        def read(decoded):
            return decoded.sample(generator) if output == "sample" else getattr(decoded, output)()

        return {name: decode_in_chunks(lambda x, name=name: read(self.module.decode(name, x)), z) for name in names}

    @torch.no_grad()
    def log_likelihood(self, data, conditioning: np.ndarray | None = None) -> Tensor:
        """Per row (float64): log p̂(x_O) of what it observes (``conditioning`` None), or
        log p̂(x_T | x_S) with S the modalities ``conditioning`` (M,) marks and T the others, each
        intersected with what the row observes (a row observing no target scores 0)."""
        module, settings = self.module, self.settings
        if conditioning is None:
            return self._marginal_log_likelihood(data)
        targets = [m for m, c in zip(module.names, conditioning) if not c]
        draws = self.latents(data, data.observed & conditioning[None, :], settings.n_importance_samples)
        blocks = {m: data.blocks[m].to(self.device) for m in targets}
        observed = None
        if not data.observed[:, ~conditioning].all():
            observed = torch.from_numpy(data.observed[:, ~conditioning]).to(self.device)
        return conditional_log_likelihood(module, blocks, targets, draws, observed)

    def _marginal_log_likelihood(self, data) -> Tensor:
        """log p̂(x_O) of every row by pattern: the joint posterior proposes for complete rows
        (noise from the call's seed), the flow posterior given O for the others (noise of their
        pattern's own)."""
        module, settings, device = self.module, self.settings, self.device
        out = torch.empty(data.n_samples, dtype=torch.float64, device=device)
        for pattern, rows, cond, blocks in self._by_pattern(data, data.observed):
            if len(cond) == len(module.names):
                generator = torch.Generator(device=device).manual_seed(settings.seed)
                log_p = joint_log_likelihood(module, blocks, settings.n_importance_samples, generator)
            else:
                generator = pattern_generator(settings.seed, pattern, device)
                log_p = observed_log_likelihood(module, blocks, cond, settings.n_importance_samples, generator)
            out[torch.from_numpy(rows).to(device)] = log_p
        return out

    def _by_pattern(self, data, masks: np.ndarray):
        """For each pattern of ``masks`` (n, M): (pattern, its rows, the modalities it marks, their
        blocks for those rows on the module's device)."""
        for pattern, rows in pattern_groups(masks):
            cond = [m for m, on in zip(self.module.names, pattern) if on]
            index = torch.from_numpy(rows)
            yield pattern, rows, cond, {m: data.blocks[m][index].to(self.device) for m in cond}


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


def decode_in_chunks(decode, latent: Tensor) -> Tensor:
    """``decode`` (a (m, D) -> (m, ...) map) over latents of any leading shape, in row chunks."""
    flat = latent.reshape(-1, latent.shape[-1])
    parts = [decode(flat[part]) for part in device_chunks(len(flat), 1, latent.device, DECODE_BATCH_ELEMENTS)]
    out = torch.cat(parts) if parts else decode(flat)
    return out.reshape(*latent.shape[:-1], *out.shape[1:])
