"""Training on rows with missing modalities: the masked joint encoder, stage 2 on observed rows,
the marginal likelihood of what a row observes, and the closed-form linear-Gaussian gain."""

import warnings

import numpy as np
import pytest
import torch
from _helpers import normal_module, small_jnf
from scipy.stats import multivariate_normal

import skjnf._estimator as estimator_module
from skjnf import JNFEstimator
from skjnf._batch import StageBatch
from skjnf._modules import random_subset_masks, stage2_noise_dim, stage2_terms

NAMES = ("a", "b", "c")


class LinearGaussian:
    """x = W z + noise, z ~ N(0, I_2), three modalities of widths 6, 5, 4: every marginal and
    conditional is Gaussian with a known covariance."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        dims = (6, 5, 4)
        self.W = self.rng.normal(size=(sum(dims), 2))
        self.cov = self.W @ self.W.T + 0.25 * np.eye(sum(dims))
        self.cols = dict(zip(NAMES, np.split(np.arange(sum(dims)), np.cumsum(dims)[:-1])))

    def draw(self, n):
        x = self.rng.normal(size=(n, 2)) @ self.W.T + 0.5 * self.rng.normal(size=(n, len(self.cov)))
        return {m: x[:, c] for m, c in self.cols.items()}

    def log_pdf(self, X, names=NAMES):
        cols = np.concatenate([self.cols[m] for m in names])
        x = np.hstack([X[m] for m in names])
        return multivariate_normal(np.zeros(len(cols)), self.cov[np.ix_(cols, cols)]).logpdf(x)

    def bayes_mse(self, X, target):
        t = self.cols[target]
        o = np.concatenate([self.cols[m] for m in NAMES if m != target])
        coef = self.cov[np.ix_(t, o)] @ np.linalg.inv(self.cov[np.ix_(o, o)])
        x = np.hstack([X[m] for m in NAMES])
        return np.mean((x[:, o] @ coef.T - x[:, t]) ** 2)


def _model(**params):
    return JNFEstimator(
        latent_dim=2,
        hidden_sizes=(32,),
        flow_hidden_sizes=(16,),
        n_flow_blocks=1,
        random_state=0,
        **params,
    )


def _mcar(X, fraction_complete, rng):
    """Every row but ``fraction_complete`` of them misses one or two modalities, at random."""
    X = {m: x.copy() for m, x in X.items()}
    complete = rng.random(len(X["a"])) < fraction_complete
    for i in np.flatnonzero(~complete):
        for j in rng.choice(3, size=rng.integers(1, 3), replace=False):
            X[NAMES[j]][i] = np.nan
    return X, complete


@pytest.fixture(scope="module")
def linear_gaussian_fits():
    truth = LinearGaussian()
    full, test = truth.draw(600), truth.draw(1000)
    incomplete, complete = _mcar(full, 0.08, truth.rng)
    assert complete.mean() < 0.1
    fits = {
        "full": _model().fit(full),
        "drop": _model().fit({m: x[complete] for m, x in full.items()}),
        "use": _model().fit(incomplete),
    }
    return truth, test, fits, incomplete


def test_training_on_incomplete_rows_closes_most_of_the_gap_to_complete_data(linear_gaussian_fits):
    """Fewer than 10 % of the rows complete: using the incomplete rows must close at least half
    of the gap between dropping them and having nothing missing, in held-out log-likelihood
    (against the exact one) and in cross-modal MSE (against the Bayes MSE)."""
    truth, test, fits, _ = linear_gaussian_fits
    exact = truth.log_pdf(test).mean()
    bayes = np.mean([truth.bayes_mse(test, m) for m in NAMES])
    ll_gap, mse_excess = {}, {}
    for label, est in fits.items():
        ll_gap[label] = exact - est.score(test)
        predictions = [est.predict({o: test[o] for o in NAMES if o != m})[m] for m in NAMES]
        mse_excess[label] = np.mean([np.mean((p - test[m]) ** 2) for p, m in zip(predictions, NAMES)]) - bayes
    for gap in (ll_gap, mse_excess):
        assert gap["drop"] - gap["use"] >= 0.5 * (gap["drop"] - gap["full"]), gap
    counts = fits["use"].n_training_rows_
    observed = ~np.isnan(np.stack([linear_gaussian_fits[3][m][:, 0] for m in NAMES], axis=1))
    several = observed.sum(1) >= 2
    assert counts["joint"] == 600 and counts["subset"] == several.sum()
    assert counts["experts"] == {m: (observed[:, j] & several).sum() for j, m in enumerate(NAMES)}


def test_marginal_likelihood_of_incomplete_rows_approaches_the_exact_marginal(linear_gaussian_fits):
    truth, test, fits, _ = linear_gaussian_fits
    est = fits["use"]
    for observed in (("a", "b"), ("a",)):
        X = {m: (x if m in observed else np.full_like(x, np.nan)) for m, x in test.items()}
        exact = truth.log_pdf(test, observed).mean()
        # rows share their base noise (common random numbers), so K = 1 is one draw for all rows:
        # its mean over rows is the ELBO only averaged over inference seeds (sd 0.3 nats across
        # seeds here: 200 of them put the average within 0.02 of the ELBO)
        elbo_gaps, fitted_seed = [], est._inference_seed
        for seed in range(200):
            est._inference_seed = seed
            elbo_gaps.append(exact - est.set_params(n_importance_samples=1).score(X))
        est._inference_seed = fitted_seed
        gaps = [np.mean(elbo_gaps), exact - est.set_params(n_importance_samples=1000).score(X)]
        # importance weighting tightens the bound: K = 1 is the ELBO, K = 1000 nearly the marginal
        assert gaps[1] < gaps[0], (observed, gaps)
        n_features = sum(test[m].shape[1] for m in observed)
        assert abs(gaps[1]) < 0.1 * n_features, (observed, gaps)  # the model's own misfit, under 0.1 nat a feature
    est.set_params(n_importance_samples=100)


def test_complete_rows_take_the_same_path_as_an_all_observed_mask(monkeypatch):
    """On complete data fit skips the masks (bit-identical to training without them); forcing
    the masked path with every modality observed must give the same model."""
    truth = LinearGaussian(1)
    X = truth.draw(200)
    params = dict(joint_epochs=5, flow_epochs=5)
    plain = _model(**params).fit(X)
    original = estimator_module.training_rows

    def all_observed_mask(data, layout):
        blocks, observed = original(data, layout)
        assert observed is None  # complete data: no mask by default
        return blocks, np.ones(data.observed.shape, dtype=bool)

    monkeypatch.setattr(estimator_module, "training_rows", all_observed_mask)
    masked = _model(**params).fit(X)
    for cond in (None, "a", ["a", "b"]):
        np.testing.assert_allclose(masked.transform(X, cond_mod=cond), plain.transform(X, cond_mod=cond), atol=1e-4)
    np.testing.assert_allclose(masked.score_samples(X), plain.score_samples(X), rtol=1e-5)


def test_joint_posterior_ignores_the_values_of_missing_modalities():
    module = normal_module(latent_dim=2).eval()
    generator = torch.Generator().manual_seed(0)
    blocks = {m: torch.randn(6, 2, generator=generator) for m in module.names}
    observed = torch.tensor([[True, False, True]] * 6)
    with torch.no_grad():
        module.joint_encoder.missing_features[1].normal_()
        for skip in module.joint_encoder.skips:  # the linear paths read the inputs too
            skip.weight.normal_()
        module.joint_encoder.missing_skips[1].normal_()
        before = module.joint_posterior(blocks, observed)
        after = module.joint_posterior({**blocks, "m1": 100 * blocks["m1"]}, observed)
        complete = module.joint_posterior(blocks, torch.ones(6, 3, dtype=torch.bool))
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(complete, module.joint_posterior(blocks))  # all observed: the plain encoder
    assert not torch.allclose(before[0], complete[0])  # the missing features do stand in for m1


def test_random_subsets_stay_inside_each_rows_observed_modalities():
    n, M = 4000, 5
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(n, M + 1, generator=generator)
    observed = torch.rand(n, M, generator=generator) < 0.6
    observed[:500] = True
    masks = random_subset_masks(noise, observed)
    assert bool((masks <= observed.float()).all())
    n_observed, sizes = observed.sum(1), masks.sum(1)
    usable = n_observed >= 2
    assert bool((sizes[usable] >= 2).all())
    assert bool((sizes <= n_observed.clamp(max=M - 1)).all())
    # a row observing three modalities gets subsets of sizes 2 and 3, as often
    three = n_observed == 3
    assert abs(float((sizes[three] == 3).float().mean()) - 0.5) < 0.06
    # complete rows: exactly the subsets drawn without a mask
    torch.testing.assert_close(masks[:500], random_subset_masks(noise[:500]))


def test_stage2_terms_leave_out_what_a_row_does_not_observe():
    module = normal_module(latent_dim=2).eval()
    generator = torch.Generator().manual_seed(1)
    blocks = {m: torch.randn(8, 2, generator=generator) for m in module.names}
    noise = torch.randn(8, stage2_noise_dim(module), generator=generator)
    observed = torch.ones(8, 3, dtype=torch.bool)
    observed[:4, 1] = False  # rows 0-3 miss m1
    observed[6:, 1:] = False  # rows 6-7 observe m0 only
    with torch.no_grad():
        experts, subset = stage2_terms(module, StageBatch(blocks, observed), noise)
        plain, plain_subset = stage2_terms(module, StageBatch(blocks), noise)
        placeholders = {**blocks, "m1": torch.where(observed[:, 1:2], blocks["m1"], 5.0)}  # missing cells only
        shifted, shifted_subset = stage2_terms(module, StageBatch(placeholders, observed), noise)
    assert bool((experts["m1"][~observed[:, 1]] == 0).all())
    # a row observing one modality leaves its expert alone (the target would be the encoder's own
    # Gaussian) and has no subset term
    assert bool((experts["m0"][6:] == 0).all()) and bool((experts["m0"][:6] != 0).all())
    assert bool((subset[6:] == 0).all()) and bool((subset[:6] != 0).all())
    # where a row observes everything it is the complete-data loss
    torch.testing.assert_close(experts["m0"][4:6], plain["m0"][4:6])
    torch.testing.assert_close(subset[4:6], plain_subset[4:6])
    for name in module.names:  # what stands in a missing block changes nothing
        torch.testing.assert_close(shifted[name], experts[name])
    torch.testing.assert_close(shifted_subset, subset)


def test_scores_of_incomplete_rows_do_not_depend_on_their_batch_mates():
    truth = LinearGaussian(2)
    X, _ = _mcar(truth.draw(300), 0.3, truth.rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pair is observed together: no warning
        est = small_jnf(joint_epochs=3, flow_epochs=3).fit(X)
    scores = est.score_samples(X)
    assert np.isfinite(scores).all()
    alone = est.score_samples({m: x[7:9] for m, x in X.items()})
    np.testing.assert_allclose(alone, scores[7:9], rtol=1e-5)
    # conditional: a row observing none of the targets scores log 1 = 0
    has_a = ~np.isnan(X["a"][:, 0])
    conditional = est.score_samples({m: x[has_a] for m, x in X.items()}, cond_mod="a")
    no_target = (np.isnan(X["b"][:, 0]) & np.isnan(X["c"][:, 0]))[has_a]
    assert no_target.any() and np.all(conditional[no_target] == 0.0)
    assert np.isfinite(conditional).all() and np.all(conditional[~no_target] != 0.0)


def test_decoder_shares_are_judged_on_the_validation_rows_observing_each_modality(monkeypatch):
    """Catches the shrinking of a decoder judged on every validation row, the zeros that stand
    for a missing modality included: each log-likelihood it compares is taken on exactly the
    validation rows observing that modality."""
    import skjnf._fitting as fitting
    from skjnf._likelihoods import Normal

    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 2))
    X = {m: z @ rng.normal(size=(2, d)) + 0.1 * rng.normal(size=(300, d)) for m, d in zip("abc", (6, 4, 3))}
    X["b"][rng.random(300) < 0.4] = np.nan
    seen, original_shrink, original_log_prob = {}, fitting.shrink_decoders, Normal.log_prob

    def shrink(module, train, valid, seed):
        observed, likelihoods = valid.observed.sum(0).tolist(), list(module.likelihoods)

        def log_prob(self, x, a):
            j = next(i for i, likelihood in enumerate(likelihoods) if likelihood is self)
            seen.setdefault(j, set()).add((len(x), observed[j]))
            return original_log_prob(self, x, a)

        monkeypatch.setattr(Normal, "log_prob", log_prob)
        try:
            return original_shrink(module, train, valid, seed)
        finally:
            monkeypatch.setattr(Normal, "log_prob", original_log_prob)

    monkeypatch.setattr(fitting, "shrink_decoders", shrink)
    small_jnf(hidden_sizes=(16,), joint_epochs=3, flow_epochs=1, validation_fraction=0.3).fit(X)
    assert len(seen) == 3
    for pairs in seen.values():
        assert all(rows == observing for rows, observing in pairs), pairs
    assert any(rows < 90 for pairs in seen.values() for rows, _ in pairs)  # b's missing rows left out
