"""The experts' closed-form linear path (issue 27): a wide, collinear view predicts a small one."""

import numpy as np
import pytest
import torch
from _helpers import make_views, small_jnf, validation_rows
from sklearn.linear_model import RidgeCV

from skjnf._fitting import RIDGE_ALPHAS
from skjnf._modules import Decoder, UnimodalEncoder


def spectra_like(n, seed=0):
    """A 100-channel 'spectrum' whose variance is mostly a random baseline, with 3 'composition'
    values that set band heights; returns (X, Bayes MSE of the composition from the spectrum)."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, 100)
    bands = np.stack([np.exp(-0.5 * ((grid - c) / 0.08) ** 2) for c in (0.3, 0.5, 0.7)])
    composition = rng.normal(size=(n, 3))
    baseline = 3 * rng.normal(size=(n, 1)) + rng.normal(size=(n, 1)) * grid
    spectrum = baseline + 0.2 * composition @ bands + 0.01 * rng.normal(size=(n, 100))
    noise = 0.3
    return {"spectrum": spectrum, "composition": composition + noise * rng.normal(size=(n, 3))}, noise**2


@pytest.fixture(scope="module")
def spectra_fit():
    X, _ = spectra_like(400)
    model = small_jnf(latent_dim=4, hidden_sizes=(32,), joint_epochs=60, flow_epochs=30, lr=1e-2)
    return model.fit(X), X


def test_linear_path_is_the_ridge_regression_of_the_joint_means(spectra_fit):
    """Catches a linear path fitted on other rows, to another target, or not set at all (all zero)."""
    model, X = spectra_fit
    module = model.module_
    j = module.index("spectrum")
    encoder = module.encoders[j]
    assert isinstance(encoder, UnimodalEncoder)
    # the training rows: validation_fraction 0.1 of 400, from the split fit made
    z = model.transform(X)
    x = module.encoder_input(j, torch.as_tensor(X["spectrum"], dtype=torch.float32)).double().numpy()
    train = np.ones(len(x), dtype=bool)
    train[validation_rows(model, len(x))] = False
    x, z = x[train], z[train]
    scale = ((x - x.mean(0)) ** 2).sum() / x.shape[1]
    ridge = RidgeCV(alphas=scale * RIDGE_ALPHAS).fit(x, z)
    np.testing.assert_allclose(encoder.linear_weight.numpy(), ridge.coef_, atol=1e-3 * np.abs(ridge.coef_).max())
    np.testing.assert_allclose(encoder.linear_bias.numpy(), ridge.intercept_, atol=1e-3)


def test_small_view_from_a_wide_collinear_one_is_near_the_bayes_error(spectra_fit):
    """The composition from the spectrum within 1.3x of the noise floor (the Bayes MSE, up to the
    spectrum's own tiny noise). Without the linear path the experts' MLPs, trained by gradient
    steps, did not read the bands under the baseline: MSE 1.2 (the composition alone varies by
    1.09); without the default rescale_likelihoods=True the joint latent hardly encoded the
    3-value modality beside the 100-channel one: 0.70."""
    model, _ = spectra_fit
    X, bayes = spectra_like(500, seed=1)
    predicted = model.predict({"spectrum": X["spectrum"]})["composition"]
    mse = ((predicted - X["composition"]) ** 2).mean()
    assert mse < 1.3 * (bayes + 0.02), mse


def test_subset_linear_paths_are_the_ridge_regressions_on_each_subsets_inputs():
    """Catches a subset's linear path fitted on the wrong inputs (another subset's columns) or
    read for the wrong subset: each pair's path is RidgeCV of the joint means on that pair's
    concatenated inputs (zero on the third modality's columns), and the subset encoder's mean
    starts at it."""
    X, _, _ = make_views(n=200)
    model = small_jnf(joint_epochs=5, flow_epochs=0, validation_fraction=0.0)
    with pytest.warns(UserWarning):  # 0 stage-2 epochs: the networks stay at their start
        model.fit(X)
    module = model.module_
    subset = module.subset_encoder
    z = model.transform(X)
    inputs = {
        m: module.encoder_input(j, torch.as_tensor(X[m], dtype=torch.float32)).double().numpy()
        for j, m in enumerate("abc")
    }
    offsets = dict(zip("abc", np.cumsum([0, 6, 4])))
    for pair in (["a", "b"], ["a", "c"], ["b", "c"]):
        x = np.hstack([inputs[m] for m in pair])
        scale = ((x - x.mean(0)) ** 2).sum() / x.shape[1]
        ridge = RidgeCV(alphas=scale * RIDGE_ALPHAS).fit(x, z)
        weight = subset.linear_weight[module.bitmask(pair)].numpy()
        columns = np.concatenate([np.arange(offsets[m], offsets[m] + inputs[m].shape[1]) for m in pair])
        np.testing.assert_allclose(weight[:, columns], ridge.coef_, atol=1e-3 * np.abs(ridge.coef_).max())
        assert not np.delete(weight, columns, axis=1).any()
        np.testing.assert_allclose(subset.linear_bias[module.bitmask(pair)].numpy(), ridge.intercept_, atol=1e-3)
        with torch.no_grad():  # no stage-2 training: the base mean is the linear map alone
            mask = torch.tensor([[float(m in pair) for m in "abc"]]).expand(len(x), -1)
            mean, _ = module.subset_posterior({m: torch.as_tensor(X[m], dtype=torch.float32) for m in pair}, mask)
        np.testing.assert_allclose(mean.numpy(), ridge.predict(x), atol=1e-3)


def test_latent_activity_is_the_variance_of_the_joint_means_over_the_training_rows():
    """Catches activity read from another quantity (the posterior variances, validation rows) or
    counted against another threshold: with every row used for training, ``latent_activity_`` is
    the variance of ``transform(X)`` per dimension, and ``active_dims_`` counts those above 0.01."""
    X, _, _ = make_views(n=120)
    model = small_jnf(latent_dim=4, joint_epochs=5, flow_epochs=1, validation_fraction=0.0).fit(X)
    np.testing.assert_allclose(model.latent_activity_, model.transform(X).var(0), rtol=1e-4, atol=1e-7)
    assert model.active_dims_ == int((model.latent_activity_ > 0.01).sum())
    assert 0 < model.active_dims_ <= 4


def test_a_shrunk_decoder_is_the_linear_map_plus_its_share_of_the_rest():
    """Catches a share folded into the output layer's weight but not its bias, the linear map's
    weight or bias dropped, or ``1 - share`` in place of ``share``: after ``shrink(W, b, s)``
    the decoder is exactly W z + b + s (g(z) - W z - b) for the g it was."""
    torch.manual_seed(0)
    decoder = Decoder(3, (8,), 5)
    torch.nn.init.normal_(decoder.skip.weight)
    weight, bias, z = torch.randn(5, 3), torch.randn(5), torch.randn(20, 3)
    with torch.no_grad():
        before, linear = decoder(z), z @ weight.T + bias
        decoder.shrink(weight, bias, 0.3)
        torch.testing.assert_close(decoder(z), linear + 0.3 * (before - linear))


def nonlinear_views(n, seed):
    """View a linear in a 2-d latent, view b a smooth nonlinear function of it (small noise)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    a = z @ np.random.default_rng(99).normal(size=(2, 6)) + 0.1 * rng.normal(size=(n, 6))
    b = np.stack([np.sin(2 * z[:, 0]), np.cos(2 * z[:, 1]), z[:, 0] * z[:, 1], np.sin(z.sum(1))], 1)
    return {"a": a, "b": b + 0.05 * rng.normal(size=b.shape)}


def test_a_decoder_keeps_the_nonlinear_part_the_validation_rows_need(monkeypatch):
    """Catches the share chosen the wrong way round (the worst instead of the best) or every
    decoder made linear: where a view is a nonlinear function of the latent, its decoder keeps
    most of its nonlinear part, and held-out rows reconstruct better than with a linear decoder."""
    import skjnf._fitting as fitting

    X, held_out = nonlinear_views(600, seed=0), nonlinear_views(300, seed=1)
    params = dict(hidden_sizes=(32,), joint_epochs=60, flow_epochs=1, lr=1e-2)
    model = small_jnf(**params).fit(X)
    assert model.history_["joint"]["decoder_shares"]["b"] >= 0.5, model.history_["joint"]["decoder_shares"]
    monkeypatch.setattr(fitting, "DECODER_SHARES", np.array([0.0]))
    linear = small_jnf(**params).fit(X)
    assert linear.history_["joint"]["decoder_shares"] == {"a": 0.0, "b": 0.0}

    def error(m):
        return ((m.predict(held_out)["b"] - held_out["b"]) ** 2).mean()

    assert error(model) < 0.5 * error(linear), (error(model), error(linear))


def test_a_decoder_is_shrunk_only_for_a_gain_beyond_noise(monkeypatch):
    """Catches the standard-error rule not applied (a share below 1 taken on any gain): the
    linear view's decoder is shrunk at the default rule, and no decoder is when the rule asks a
    gain beyond a billion standard errors."""
    import skjnf._fitting as fitting

    X = nonlinear_views(600, seed=0)
    params = dict(hidden_sizes=(32,), joint_epochs=60, flow_epochs=1, lr=1e-2)
    assert small_jnf(**params).fit(X).history_["joint"]["decoder_shares"]["a"] < 1.0
    monkeypatch.setattr(fitting, "SHRINK_STANDARD_ERRORS", 1e9)
    assert small_jnf(**params).fit(X).history_["joint"]["decoder_shares"] == {"a": 1.0, "b": 1.0}


@pytest.mark.parametrize(
    "n, d, targets, case",
    [
        (200, 30, 3, "plain"),
        (60, 25, 1, "collinear"),
        (80, 12, 4, "constant"),
        (9, 4, 2, "few rows"),
        (30, 70, 3, "wide"),
    ],
)
def test_ridge_loo_is_ridgecv(n, d, targets, case):
    """The linear paths' ridge equals scikit-learn's RidgeCV (leave-one-out over the same penalties):
    the penalty chosen, coefficients and intercept. Catches the intercept's 1/n left out of the
    leverages, uncentred targets, the wide case's weights s / (s + alpha) taken as 1 / (s + alpha),
    and the worst penalty picked for the best."""
    from skjnf._ridge import ridge_loo

    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d)
    if case == "collinear":
        x[:, 1] = 2 * x[:, 0]
    if case == "constant":
        x[:, -1] = 3.0
    y = x[:, :3] @ rng.normal(size=(3, targets)) + 5.0 + rng.normal(size=(n, targets)) * x[:, :3].std()
    alphas = float(((x - x.mean(0)) ** 2).sum()) / d * RIDGE_ALPHAS
    reference = RidgeCV(alphas=alphas).fit(x, y)
    coef, intercept, alpha = ridge_loo(x, y, alphas)
    assert alpha == pytest.approx(reference.alpha_)
    expected = np.reshape(reference.coef_, (targets, d))  # RidgeCV returns (d,) for one target
    np.testing.assert_allclose(coef, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(intercept, np.reshape(reference.intercept_, targets), rtol=1e-6, atol=1e-9)
