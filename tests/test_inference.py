"""Inference for every conditioning set: flow expert means, HMC subsets, missing-modality patterns."""

import copy
import warnings

import numpy as np
import pytest
import torch
from _helpers import small_jnf
from sklearn.base import clone

import skjnf._posteriors as posteriors
from skjnf._distributions import FlowDistribution
from skjnf._flows import _randomize_
from skjnf._hmc import hmc_sample
from skjnf._modules import frozen_inference


def test_one_modality_mean_is_the_monte_carlo_mean_not_the_flow_image(views):
    """§7.7: with a non-linear flow, E_q[z] differs from f⁻¹(μ); the estimator returns the former."""
    X, _, _ = views
    jnf = small_jnf(joint_epochs=1, flow_epochs=1, n_flow_blocks=2, n_posterior_samples=4096).fit(X)
    flow = jnf.module_.flows[0]
    _randomize_(flow, scale=1.0, generator=torch.Generator().manual_seed(3))
    head = jnf.module_.encoders[0].head
    with torch.no_grad():  # base N(0.5, 1) for every row: wide enough to feel the flow's curvature
        for layer, bias in ((head.mean, 0.5), (head.log_var, 0.0)):
            layer.weight.zero_()
            layer.bias.fill_(bias)
    x = {"a": X["a"][:4]}
    with torch.no_grad():  # an aggregate posterior wide enough that no draw counts as a far tail
        jnf.module_.aggregate_scale_tril.copy_(100.0 * torch.eye(2))
        expert = jnf.module_.expert("a", torch.tensor(x["a"], dtype=torch.float32))
        mean, log_var, image = expert.loc, expert.log_var, expert.base_mean_image()
        g = torch.Generator().manual_seed(0)
        u = mean + torch.exp(0.5 * log_var) * torch.randn(100_000, *mean.shape, generator=g)
        draws, _ = flow.inverse(u.reshape(-1, 2))
        draws = draws.reshape(100_000, 4, 2)
    truth, se = draws.mean(0).numpy(), (draws.std(0) / np.sqrt(100_000)).numpy()
    assert (np.abs(image.numpy() - truth) / se).max() > 10  # the test is not vacuous
    estimate = jnf.transform(x, cond_mod="a")
    se_estimate = draws.std(0).numpy() / np.sqrt(4096)
    assert (np.abs(estimate - truth) / se_estimate).max() < 5


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_a_gaussian_experts_posterior_mean_is_its_mean_from_few_draws(fitted, k):
    """The draws of a posterior mean are antithetic: with independent ones every row's mean moves
    by the same ε̄ ~ N(0, σ² / k), here 0.5 σ at k = 8 (and odd k keep the base mean as a draw)."""
    from skjnf._flows import IdentityFlow

    module = fitted.module_
    center = module.aggregate_mean.expand(5, -1)  # draws symmetric about the support's centre
    log_var = torch.full_like(center, -4.0)
    density = FlowDistribution(center, log_var, IdentityFlow())
    posterior = posteriors.FlowPosterior(module, density.rows, 5)
    with frozen_inference(module):
        z = posterior.mean(k, torch.Generator().manual_seed(k))
        spread = posterior.sample(64, torch.Generator().manual_seed(k)).std(0)
    assert float(spread.min()) > 0.05  # draws do spread: exactness is not a collapsed posterior
    np.testing.assert_allclose(z.numpy(), center.numpy(), atol=1e-5)


def test_rows_are_grouped_by_pattern_with_the_same_result_as_separate_calls(fitted, views):
    X, _, _ = views
    X = {m: x[:60].copy() for m, x in X.items()}
    X["a"][10:30] = np.nan  # rows 10..29 see b, c (HMC)
    X["b"][30:45] = np.nan
    X["c"][30:45] = np.nan  # rows 30..44 see a only (flow expert)
    together = fitted.transform(X)
    for rows in (slice(0, 10), slice(10, 30), slice(30, 45), slice(45, 60)):
        part = fitted.transform({m: x[rows] for m, x in X.items()})
        np.testing.assert_allclose(together[rows], part, rtol=0, atol=1e-5)  # BLAS: batch-size rounding
    np.testing.assert_array_equal(together[10:30], fitted.transform({m: X[m][10:30] for m in ("b", "c")}))


def test_missing_modalities_are_imputed_from_the_observed_ones(fitted, views):
    X, _, _ = views
    X = {m: x[:50].copy() for m, x in X.items()}
    truth = X["a"].copy()
    X["a"][:20] = np.nan
    imputed = fitted.predict(X)["a"][:20]
    np.testing.assert_array_equal(imputed, fitted.predict({m: X[m][:20] for m in ("b", "c")})["a"])
    assert np.mean((imputed - truth[:20]) ** 2) < 0.3 * np.mean((truth[:20] - truth.mean(0)) ** 2)


def test_more_modalities_never_widen_the_posterior(fitted, views):
    """Posterior spread shrinks along {a} ⊂ {a, b} ⊂ {a, b, c} (product of experts throughout)."""
    X, _, _ = views
    X = {m: x[:40] for m, x in X.items()}
    widths, fitted = [], copy.copy(fitted).set_params(subset_posterior="product")
    for cond in (["a"], ["a", "b"]):
        draws = fitted.sample_latent(X, n_samples=64, cond_mod=cond, random_state=0)
        widths.append(draws.var(axis=0).sum(axis=1).mean())
    module = fitted.module_
    with frozen_inference(module):  # all three experts: the API would use the joint encoder instead
        experts = [module.expert(m, torch.tensor(X[m], dtype=torch.float32)) for m in "abc"]
        draws = hmc_sample(experts, 64, 20, 5, "auto", torch.Generator().manual_seed(0)).draws
    widths.append(draws.var(dim=0).sum(dim=1).mean().item())
    assert widths[0] >= widths[1] >= widths[2], widths
    joint = fitted.sample_latent(X, n_samples=64, random_state=0)
    assert widths[0] >= joint.var(axis=0).sum(axis=1).mean()


def test_hmc_diagnostics_are_returned_and_inference_leaves_the_estimator_unchanged(views):
    X, _, _ = views
    jnf = small_jnf(joint_epochs=5, flow_epochs=5, subset_posterior="product").fit(X)
    state = {k: v for k, v in vars(jnf).items() if k != "module_"}
    _, one = jnf.sample_latent(X, n_samples=2, cond_mod="a", return_diagnostics=True)
    assert one["acceptance"] is None and one["step_size"] is None  # no HMC for one modality
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # short runs may miss the acceptance target
        jnf.transform(X, cond_mod=["a", "b"])
        Z, two = jnf.sample_latent(X, n_samples=2, cond_mod=["a", "b"], return_diagnostics=True)
    assert Z.shape == (2, len(X["a"]), 2)
    assert 0 < two["acceptance"] <= 1 and two["step_size"] > 0 and two["n_divergent"] >= 0
    assert isinstance(two["escaped_rows"], list)
    # transform and sample_latent write nothing on the estimator (sklearn's check_dict_unchanged)
    assert vars(jnf).keys() - {"module_"} == state.keys()
    assert all(vars(jnf)[k] is v for k, v in state.items())


def test_latent_sample_is_one_posterior_draw(fitted, views):
    X, _, _ = views
    sampler = clone(fitted).set_params(latent="sample")
    sampler.__setstate__(fitted.__getstate__())
    sampler.latent = "sample"
    for cond in (None, "b", ["a", "c"]):
        draw = sampler.transform(X, cond_mod=cond)
        np.testing.assert_array_equal(draw, fitted.sample_latent(X, 1, cond_mod=cond)[0])
        assert not np.allclose(draw, fitted.transform(X, cond_mod=cond))


def test_joint_draws_match_the_joint_posterior(fitted, views):
    X, _, _ = views
    X = {m: x[:5] for m, x in X.items()}
    draws = fitted.sample_latent(X, n_samples=4000, random_state=1)
    with torch.no_grad():
        mean, log_var = fitted.module_.joint_posterior({m: torch.tensor(x, dtype=torch.float32) for m, x in X.items()})
    std = np.exp(0.5 * log_var.numpy())
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean.numpy()), 5 * std / np.sqrt(4000))
    np.testing.assert_allclose(draws.std(0), std, rtol=0.1)


def test_cross_modal_generation_varies_around_the_prediction(fitted, views):
    X, _, _ = views
    x_b = {"b": X["b"][:10]}
    generated = fitted.sample(200, X=x_b, random_state=0)
    assert generated["a"].shape == (200, 10, 6)
    predicted = fitted.predict(x_b)["a"]
    spread = generated["a"].std(0).mean()
    assert spread > 0
    assert np.abs(generated["a"].mean(0) - predicted).mean() < 2 * spread
    noisy = fitted.sample(200, X=x_b, random_state=0, add_noise=True)
    assert noisy["a"].std(0).mean() > spread  # likelihood noise adds to the latent spread


@pytest.mark.parametrize("method", ["product"])
@pytest.mark.parametrize("cond", [["a", "b"], ["b", "c"]])
def test_hmc_subset_mean_is_between_the_experts(fitted, views, cond, method):
    """The product of two experts sits where both agree: closer to each than they are to each other."""
    X, _, _ = views
    X = {m: x[:30] for m, x in X.items()}
    fitted = copy.copy(fitted).set_params(subset_posterior=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        both = fitted.transform(X, cond_mod=cond)
    single = [fitted.transform(X, cond_mod=m) for m in cond]
    gap = np.linalg.norm(single[0] - single[1], axis=1).mean()
    assert all(np.linalg.norm(both - s, axis=1).mean() < gap for s in single)
    joint = fitted.transform(X)
    assert np.linalg.norm(both - joint, axis=1).mean() < np.linalg.norm(single[0] - joint, axis=1).mean() + 0.1


def test_joint_inference_in_row_chunks_equals_one_pass(fitted, views, monkeypatch):
    """Rows are encoded in chunks (memory bounded in n): results equal one full-batch pass."""
    X, _, _ = views
    whole, predicted = fitted.transform(X), fitted.predict({"a": X["a"]})
    log_p, log_p_given_a = fitted.score_samples(X), fitted.score_samples(X, cond_mod="a")
    monkeypatch.setitem(posteriors.MAX_BATCH_ELEMENTS, "cpu", 4 * posteriors.JOINT_ROW_COST)  # chunks of 4 rows
    monkeypatch.setitem(posteriors.DECODE_BATCH_ELEMENTS, "cpu", 5)  # importance samples split too (K = 16)
    np.testing.assert_allclose(fitted.transform(X), whole, atol=1e-5)
    np.testing.assert_allclose(fitted.score_samples(X), log_p, rtol=1e-6, atol=1e-4)
    # draws through the sequential MAF inverse: float32 rounding grows to ~1e-5 (relative)
    np.testing.assert_allclose(fitted.score_samples(X, cond_mod="a"), log_p_given_a, rtol=1e-4, atol=1e-4)
    for name, block in fitted.predict({"a": X["a"]}).items():
        np.testing.assert_allclose(block, predicted[name], atol=1e-5)
    with torch.no_grad():
        mean, _ = fitted.module_.joint_posterior({m: torch.tensor(x, dtype=torch.float32) for m, x in X.items()})
    np.testing.assert_allclose(whole, mean.numpy(), atol=1e-5)


@pytest.mark.parametrize("method", ["transform", "predict", "sample_latent", "score_samples"])
def test_hmc_warnings_point_at_the_users_call(fitted, views, method):
    """The warning names this file, not skjnf's internals nor scikit-learn's set_output wrapper."""
    X, _, _ = views
    est = copy.copy(fitted).set_params(subset_posterior="product_prior", step_size=10.0, n_mcmc_steps=2)
    call = {
        "transform": lambda: est.transform(X, cond_mod=["a", "b"]),
        "predict": lambda: est.predict(X, cond_mod=["a", "b"]),
        "sample_latent": lambda: est.sample_latent(X, cond_mod=["a", "b"]),
        "score_samples": lambda: est.score_samples(X, cond_mod=["a", "b"]),
    }[method]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    hmc = [w for w in caught if "HMC" in str(w.message)]
    assert hmc and all(w.filename == __file__ for w in hmc), [(w.filename, w.lineno) for w in hmc]
