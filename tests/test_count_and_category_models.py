"""Categorical, Poisson and negative-binomial modalities inside the estimator."""

import numpy as np
import pytest
from _helpers import small_jnf
from scipy.special import logsumexp
from scipy.stats import nbinom, norm, poisson

N_TRAIN, N_TEST = 400, 200


def _latent_model(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=N_TRAIN + N_TEST)
    w, b = rng.uniform(0.6, 1.0, size=4) * rng.choice([-1, 1], size=4), np.log(rng.uniform(2, 6, size=4))
    v = rng.normal(size=3)
    return rng, z, w, b, v


def _exact_log_likelihood(log_p_given_z):
    """log ∫ p(x | z) N(z; 0, 1) dz by Gauss–Hermite quadrature (1-D latent)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    return logsumexp(log_p_given_z(nodes) + np.log(weights / np.sqrt(2 * np.pi)), axis=-1)


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_counts_reach_the_generating_model_likelihood(family):
    rng, z, w, b, v = _latent_model()
    rate = np.exp(np.outer(z, w) + b)
    r = 5.0
    counts = rng.poisson(rate) if family == "poisson" else rng.negative_binomial(r, r / (r + rate))
    y = np.outer(z, v) + 0.3 * rng.normal(size=(len(z), 3))
    X = {"counts": counts.astype(float), "y": y}
    train = {m: x[:N_TRAIN] for m, x in X.items()}
    test = {m: x[N_TRAIN:] for m, x in X.items()}

    def log_p_given_z(nodes):
        rates = np.exp(nodes[None, :, None] * w + b)  # (1, q, 4)
        c = test["counts"][:, None, :]
        lp = poisson.logpmf(c, rates).sum(-1) if family == "poisson" else nbinom.logpmf(c, r, r / (r + rates)).sum(-1)
        return lp + norm.logpdf(test["y"][:, None, :], nodes[None, :, None] * v, 0.3).sum(-1)

    truth = _exact_log_likelihood(log_p_given_z).mean()
    jnf = small_jnf(
        latent_dim=1,
        likelihood={"counts": family},
        hidden_sizes=(32,),
        lr=1e-2,
        batch_size=64,
        joint_epochs=60,
        flow_epochs=1,
        n_importance_samples=200,
    ).fit(train)
    ours = jnf.score(test)
    independent = (
        poisson.logpmf(test["counts"], train["counts"].mean(0)).sum(1).mean()
        + norm.logpdf(test["y"], train["y"].mean(0), train["y"].std(0)).sum(1).mean()
    )
    assert truth - 1.0 < ours < truth + 0.5, (ours, truth)
    assert ours > independent + 3.0  # far better than ignoring the shared latent


@pytest.mark.parametrize("layout", ["one_hot", "codes"])
def test_categorical_modality_is_predicted_from_the_others(layout):
    rng, z, w, b, v = _latent_model(seed=1)
    category = np.digitize(z, [-0.6, 0.6])  # three ordered categories of the latent
    y = np.outer(z, v) + 0.2 * rng.normal(size=(len(z), 3))
    block = np.eye(3)[category] if layout == "one_hot" else category[:, None].astype(float)
    X = {"cat": block, "y": y}
    train = {m: x[:N_TRAIN] for m, x in X.items()}
    jnf = small_jnf(
        latent_dim=1,
        likelihood={"cat": "categorical"},
        hidden_sizes=(32,),
        lr=1e-2,
        batch_size=64,
        joint_epochs=60,
        flow_epochs=20,
    ).fit(train)
    test_y = {"y": y[N_TRAIN:]}
    predicted = jnf.predict(test_y)["cat"]
    truth = category[N_TRAIN:]
    labels = predicted.argmax(1) if layout == "one_hot" else predicted[:, 0]
    if layout == "one_hot":
        assert set(np.unique(predicted)) <= {0.0, 1.0} and np.all(predicted.sum(1) == 1)
    assert (labels == truth).mean() > 0.75  # chance is at most 0.45 here
    probabilities = jnf.predict_probabilities(test_y)["cat"]
    assert probabilities.shape == (N_TEST, 3)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(1), labels)


def test_bad_count_and_category_data_is_rejected():
    X = {"counts": np.array([[1.0, 2.5], [0.0, 1.0]]), "y": np.ones((2, 1))}
    with pytest.raises(ValueError, match="Modality 'counts'.*integer"):
        small_jnf(likelihood={"counts": "poisson"}).fit(X)
    X = {"cat": np.array([[1.0, 1.0], [0.0, 1.0]]), "y": np.ones((2, 1))}
    with pytest.raises(ValueError, match="Modality 'cat'"):
        small_jnf(likelihood={"cat": "categorical"}).fit(X)
