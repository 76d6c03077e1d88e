"""Test data and small estimators shared by the test modules (imported as ``_helpers``)."""

import numpy as np


def make_views(n=240, latent_dim=2, seed=0, n_classes=3, noise=0.1):
    """Three linear-Gaussian views of a clustered latent; returns (X dict, labels, latent)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(n_classes, size=n)
    centers = 2.0 * rng.normal(size=(n_classes, latent_dim))
    z = centers[labels] + 0.5 * rng.normal(size=(n, latent_dim))
    widths = {"a": 6, "b": 4, "c": 3}
    maps = {m: rng.normal(size=(latent_dim, d)) for m, d in widths.items()}
    X = {m: z @ W + noise * rng.normal(size=(n, W.shape[1])) for m, W in maps.items()}
    return X, labels, z


def small_jnf(**params):
    """A JNFEstimator small enough for unit tests."""
    from skjnf import JNFEstimator

    defaults = dict(
        latent_dim=2,
        hidden_sizes=(16,),
        flow_hidden_sizes=(16,),
        n_flow_blocks=1,
        joint_epochs=10,
        flow_epochs=10,
        batch_size=32,
        n_posterior_samples=8,
        n_mcmc_steps=10,
        n_leapfrog=3,
        n_importance_samples=16,
        random_state=0,
    )
    defaults.update(params)
    return JNFEstimator(**defaults)


def validation_rows(model, n):
    """The rows ``model.fit`` held out for validation (its split, from its ``random_state``)."""
    from skjnf._estimator import _seeds
    from skjnf._fitting import split_rows

    split_seed = _seeds(model.random_state, 5)[1]
    return split_rows(n, model.validation_fraction, split_seed)[1]


def normal_module(latent_dim=3, n_modalities=3):
    """A JNFModule of ``n_modalities`` two-feature normal modalities named m0, m1, ... (unit tests)."""
    from skjnf._likelihoods import make_likelihood
    from skjnf._modules import JNFModule

    names = [f"m{j}" for j in range(n_modalities)]
    likelihoods = [make_likelihood("normal", 2, 1.0, None) for _ in names]
    return JNFModule(names, [(2,)] * n_modalities, likelihoods, latent_dim, (8,), ["maf"] * n_modalities, 1, (8,))


def own_posteriors_misplaced(module, flow: bool, product: bool, monkeypatch):
    """Shift the subset flow's and/or the product's latents by 20: such a posterior never predicts best."""
    import torch

    from skjnf._posteriors import ProductPosterior

    if product:
        mean = ProductPosterior.mean
        monkeypatch.setattr(ProductPosterior, "mean", lambda self, *args: mean(self, *args) + 20.0)
    if flow:
        with torch.no_grad():
            module.subset_encoder.head.mean.bias.add_(20.0)
