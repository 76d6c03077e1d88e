"""score_samples against the exact marginal likelihood of a linear-Gaussian model (§7.8)."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from skjnf import JNFEstimator
from skjnf._distributions import inverse_softclamp

SCALE = 0.5
DIMS = {"a": 3, "b": 2}


def _model(**params):
    """A linear JNF (hidden_sizes=()) fitted for 1 epoch, then given known weights."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 2)))
    W = q * np.array([1.0, 0.7])  # orthogonal columns: the exact posterior is diagonal
    b = rng.normal(size=5)
    z = rng.normal(size=(200, 2))
    data = z @ W.T + b + SCALE * rng.normal(size=(200, 5))
    X = {"a": data[:, :3], "b": data[:, 3:]}
    defaults = dict(
        latent_dim=2,
        hidden_sizes=(),
        n_flow_blocks=0,
        likelihood_scale=SCALE,
        joint_epochs=1,
        flow_epochs=1,
        random_state=0,
    )
    jnf = JNFEstimator(**{**defaults, **params}).fit(X)
    G = np.linalg.inv(np.eye(2) + W.T @ W / SCALE**2)
    return jnf, X, data, W, b, G


def _set_joint_posterior(jnf, W, b, G, shift=0.0, var_factor=1.0):
    module = jnf.module_
    with torch.no_grad():
        for j, cols in enumerate([slice(0, 3), slice(3, 5)]):
            module.decoders[j].out.weight.copy_(torch.tensor(W[cols], dtype=torch.float32))
            module.decoders[j].out.bias.copy_(torch.tensor(b[cols], dtype=torch.float32))
        head = module.joint_encoder.head
        A = G @ W.T / SCALE**2
        head.mean.weight.copy_(torch.tensor(A, dtype=torch.float32))
        head.mean.bias.copy_(torch.tensor(-A @ b + shift, dtype=torch.float32))
        head.log_var.weight.zero_()
        log_var = torch.tensor(np.log(np.diag(G) * var_factor), dtype=torch.float32)
        head.log_var.bias.copy_(inverse_softclamp(log_var))


def _exact(data, W, b):
    return multivariate_normal(b, W @ W.T + SCALE**2 * np.eye(5)).logpdf(data)


def test_exact_posterior_gives_exact_likelihood_with_one_sample():
    jnf, X, data, W, b, G = _model(n_importance_samples=1)
    _set_joint_posterior(jnf, W, b, G)
    np.testing.assert_allclose(jnf.score_samples(X), _exact(data, W, b), atol=1e-4)


def test_importance_weighting_converges_from_below():
    jnf, X, data, W, b, G = _model()
    _set_joint_posterior(jnf, W, b, G, shift=0.5, var_factor=2.0)
    truth = _exact(data, W, b)
    errors = []
    for k in (1, 10, 100, 1000):
        # rows share their noise (common random numbers), so replicate over inference seeds
        diffs = []
        for seed in range(20):
            jnf._inference_seed = seed
            diffs.append(jnf.set_params(n_importance_samples=k).score_samples(X) - truth)
        diffs = np.array(diffs)
        errors.append(np.abs(diffs).mean())
        per_seed = diffs.mean(axis=1)
        assert per_seed.mean() <= 3 * per_seed.std() / np.sqrt(len(per_seed)) + 1e-6, k  # E[log p̂] ≤ log p
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05


@pytest.mark.parametrize("change", [{"rescale_likelihoods": True}, {"beta": 3.0}])
def test_rescaling_and_beta_never_enter_the_likelihood(change):
    jnf, X, data, W, b, G = _model()
    other, *_ = _model(**change)
    other.module_.load_state_dict(jnf.module_.state_dict())
    np.testing.assert_array_equal(other.score_samples(X), jnf.score_samples(X))


def test_a_row_alone_scores_as_in_a_batch():
    jnf, X, *_ = _model(n_importance_samples=50)
    batch = jnf.score_samples(X)
    for i in (0, 17, 199):
        alone = jnf.score_samples({m: x[i : i + 1] for m, x in X.items()})
        assert alone[0] == pytest.approx(batch[i], rel=1e-6)  # float32 BLAS: batch-size rounding only


def test_conditional_likelihood_converges_to_the_exact_conditional():
    jnf, X, data, W, b, G = _model(n_importance_samples=4000)
    _set_joint_posterior(jnf, W, b, G)
    Wa, ba = W[:3], b[:3]
    Ga = np.linalg.inv(np.eye(2) + Wa.T @ Wa / SCALE**2)
    with torch.no_grad():  # expert a: a Gaussian N(m_a, diag(Ga)) (identity flow, n_flow_blocks=0)
        encoder = jnf.module_.encoders[0]
        A = Ga @ Wa.T / SCALE**2
        encoder.set_linear_path(torch.tensor(A, dtype=torch.float32), torch.tensor(-A @ ba, dtype=torch.float32))
        head = encoder.head
        head.log_var.weight.zero_()
        head.log_var.bias.copy_(inverse_softclamp(torch.tensor(np.log(np.diag(Ga)), dtype=torch.float32)))
    # the Monte Carlo estimate converges to log E_{z ~ expert}[p(x_b | z)], in closed form
    # log N(x_b; W_b m_a + b_b, W_b diag(Ga) W_bᵀ + s² I)
    m_a = (data[:, :3] - ba) @ A.T
    cov = W[3:] @ np.diag(np.diag(Ga)) @ W[3:].T + SCALE**2 * np.eye(2)
    truth = np.array([multivariate_normal(W[3:] @ m + b[3:], cov).logpdf(x) for m, x in zip(m_a, data[:, 3:])])
    estimate = jnf.score_samples(X, cond_mod="a")
    assert np.abs(estimate - truth).mean() < 0.05
