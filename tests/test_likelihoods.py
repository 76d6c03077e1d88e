"""Every decoder likelihood against scipy.stats: densities, means, draws, data checks, starts."""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, softmax

from skjnf._likelihoods import LIKELIHOODS, Categorical, _standard_gamma, make_likelihood

N_ROWS, WIDTH, N_CLASSES = 7, 3, 4


def _data(kind, rng, n=N_ROWS):
    """Valid training rows for each likelihood configuration."""
    if kind in ("normal", "normal_learned", "laplace"):
        return rng.normal(size=(n, WIDTH)) * [1.0, 3.0, 0.5] + [0.0, 50.0, -2.0]
    if kind == "bernoulli":
        return rng.integers(2, size=(n, WIDTH)).astype(float)
    if kind == "categorical_onehot":
        return np.eye(N_CLASSES)[rng.integers(N_CLASSES, size=n)]
    if kind == "categorical_codes":
        codes = rng.integers(N_CLASSES, size=(n, 1))
        codes[0] = N_CLASSES - 1  # every category code appears, so K is read from data
        return codes.astype(float)
    if kind == "poisson":
        return rng.poisson([0.5, 3.0, 20.0], size=(n, WIDTH)).astype(float)
    if kind == "negative_binomial":
        return rng.negative_binomial([0.7, 5.0, 2.0], [0.3, 0.5, 0.05], size=(n, WIDTH)).astype(float)
    raise AssertionError(kind)


_BUILD = {  # configuration -> (registry name, scale)
    "normal": ("normal", 0.7),
    "normal_learned": ("normal", "learn"),
    "laplace": ("laplace", "learn"),
    "bernoulli": ("bernoulli", 1.0),
    "categorical_onehot": ("categorical", 1.0),
    "categorical_codes": ("categorical", 1.0),
    "poisson": ("poisson", 1.0),
    "negative_binomial": ("negative_binomial", 1.0),
}
KINDS = list(_BUILD)


def _build(kind, seed=0):
    rng = np.random.default_rng(seed)
    block = torch.tensor(_data(kind, rng, n=200))
    name, scale = _BUILD[kind]
    likelihood = make_likelihood(name, block.shape[1], scale, block).double()
    with torch.no_grad():  # move learned parameters off their start, so the test sees them used
        for parameter in likelihood.parameters():
            parameter.add_(torch.tensor(rng.uniform(-0.5, 0.5, size=parameter.shape)))
    return likelihood.requires_grad_(False)


def _natural(likelihood, rng, *lead):
    return torch.tensor(rng.normal(size=(*lead, likelihood.n_outputs)))


def _scipy_log_prob(kind, likelihood, x, a):
    """Per-row log p(x | a) from scipy.stats, summed over features."""
    x, a = x.numpy(), a.detach().numpy()
    if kind.startswith("normal"):
        return stats.norm(a, likelihood.scale.detach().numpy()).logpdf(x).sum(-1)
    if kind == "laplace":
        return stats.laplace(a, likelihood.scale.detach().numpy()).logpdf(x).sum(-1)
    if kind == "bernoulli":
        return stats.bernoulli(expit(a)).logpmf(x).sum(-1)
    if kind.startswith("categorical"):
        onehot = np.eye(N_CLASSES)[x[:, 0].astype(int)] if kind.endswith("codes") else x
        return stats.multinomial(1, softmax(a, -1)).logpmf(onehot)
    if kind == "poisson":
        return stats.poisson(np.exp(a)).logpmf(x).sum(-1)
    r = likelihood.total_count.detach().numpy()
    return stats.nbinom(r, r / (r + np.exp(a))).logpmf(x).sum(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_matches_scipy(kind):
    likelihood, rng = _build(kind), np.random.default_rng(1)
    x = torch.tensor(_data(kind, rng))
    a = _natural(likelihood, rng, N_ROWS) * 2
    expected = _scipy_log_prob(kind, likelihood, x, a)
    np.testing.assert_allclose(likelihood.log_prob(x, a).numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_leading_sample_dimensions_broadcast(kind):
    likelihood, rng = _build(kind), np.random.default_rng(2)
    x = torch.tensor(_data(kind, rng))
    a = _natural(likelihood, rng, 5, N_ROWS)
    log_p = likelihood.log_prob(x, a)
    assert log_p.shape == (5, N_ROWS)
    for k in range(5):
        torch.testing.assert_close(log_p[k], likelihood.log_prob(x, a[k]))
    for method in ("mean", "predict", "sample"):
        args = (torch.Generator().manual_seed(0),) if method == "sample" else ()
        assert getattr(likelihood, method)(a, *args).shape == (5, N_ROWS, likelihood.width)


def test_n_outputs_and_widths():
    assert _build("categorical_onehot").n_outputs == N_CLASSES
    codes = _build("categorical_codes")
    assert (codes.width, codes.n_outputs) == (1, N_CLASSES)
    for kind in ("normal", "laplace", "bernoulli", "poisson", "negative_binomial"):
        assert _build(kind).n_outputs == WIDTH
    block = torch.tensor([[0.0], [2.0]])
    assert make_likelihood("categorical", 1, 1.0, block).n_outputs == 3
    assert make_likelihood("categorical", 1, 1.0, block, n_categories=6).n_outputs == 6
    assert make_likelihood("categorical", 1, 1.0, None, n_categories=6).n_outputs == 6
    with pytest.raises(ValueError, match="n_categories"):
        make_likelihood("categorical", 1, 1.0, None)
    with pytest.raises(ValueError, match="shape"):
        make_likelihood("poisson", 3, 1.0, torch.zeros(5, 2))


def test_means_predictions_and_probabilities():
    rng = np.random.default_rng(3)
    for kind in ("normal", "laplace"):
        a = _natural(_build(kind), rng, N_ROWS)
        torch.testing.assert_close(_build(kind).mean(a), a)
        torch.testing.assert_close(_build(kind).predict(a), a)
    bernoulli = _build("bernoulli")
    a = _natural(bernoulli, rng, N_ROWS)
    np.testing.assert_allclose(bernoulli.probabilities(a).numpy(), expit(a.numpy()))
    torch.testing.assert_close(bernoulli.predict(a), bernoulli.mean(a))
    for kind in ("poisson", "negative_binomial"):
        torch.testing.assert_close(_build(kind).mean(a), torch.exp(a))
    with pytest.raises(NotImplementedError, match="Poisson"):
        _build("poisson").probabilities(a)

    onehot, codes = _build("categorical_onehot"), _build("categorical_codes")
    a = _natural(onehot, rng, N_ROWS)
    p = softmax(a.numpy(), -1)
    for likelihood in (onehot, codes):
        np.testing.assert_allclose(likelihood.probabilities(a).numpy(), p)
    np.testing.assert_allclose(onehot.mean(a).numpy(), p)
    np.testing.assert_allclose(onehot.predict(a).numpy(), np.eye(N_CLASSES)[p.argmax(-1)])
    np.testing.assert_allclose(codes.mean(a).numpy(), (p * np.arange(N_CLASSES)).sum(-1, keepdims=True))
    np.testing.assert_allclose(codes.predict(a).numpy(), p.argmax(-1)[:, None])


@pytest.mark.parametrize("kind", KINDS)
def test_draws_average_to_the_mean_and_are_reproducible(kind):
    likelihood, rng = _build(kind), np.random.default_rng(4)
    a = _natural(likelihood, rng, 1).expand(20000, -1)
    draws = likelihood.sample(a, torch.Generator().manual_seed(0))
    assert draws.shape == (20000, likelihood.width)
    likelihood.check_data("draws", draws)  # draws lie in the support
    error = (draws.mean(0) - likelihood.mean(a[0])).abs()
    standard_error = draws.std(0) / np.sqrt(len(draws))
    assert bool((error <= 5 * standard_error + 1e-12).all()), (error, standard_error)
    again = likelihood.sample(a, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, draws, rtol=0, atol=0)
    other = likelihood.sample(a, torch.Generator().manual_seed(1))
    assert not torch.equal(other, draws)


def test_negative_binomial_draws_are_overdispersed():
    likelihood = make_likelihood("negative_binomial", 2, 1.0, torch.zeros(2, 2)).double()
    with torch.no_grad():
        likelihood.rho.copy_(torch.tensor([0.5, 20.0]))  # r ~ 0.97 and ~ 20
    r, mu = likelihood.total_count.detach(), torch.tensor([4.0, 4.0], dtype=torch.float64)
    draws = likelihood.sample(torch.log(mu).expand(40000, 2), torch.Generator().manual_seed(0))
    np.testing.assert_allclose(draws.var(0).numpy(), (mu + mu**2 / r).numpy(), rtol=0.08)


@pytest.mark.parametrize("shape", [0.01, 0.3, 1.0, 2.5, 40.0])
def test_generator_gamma_matches_its_moments(shape):
    draws = _standard_gamma(torch.full((40000,), shape, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert bool((draws >= 0).all())
    assert abs(draws.mean().item() - shape) < 5 * np.sqrt(shape / len(draws))
    quantiles = np.quantile(draws.numpy(), [0.25, 0.5, 0.75])
    expected = stats.gamma(shape).ppf([0.25, 0.5, 0.75])
    np.testing.assert_allclose(quantiles, expected, rtol=0.06, atol=1e-12)


@pytest.mark.parametrize(
    "name, rows, message",
    [
        ("bernoulli", [[0.0, 0.5]], "only 0 and 1"),
        ("poisson", [[1.0, -1.0]], "non-negative integer"),
        ("poisson", [[1.5, 1.0]], "non-negative integer"),
        ("negative_binomial", [[2.5, 1.0]], "non-negative integer"),
        ("negative_binomial", [[float("inf"), 1.0]], "non-negative integer"),
        ("categorical", [[1.0, 1.0, 0.0]], "one-hot"),
        ("categorical", [[0.0, 0.0, 0.0]], "one-hot"),
        ("categorical", [[2.0, -1.0, 0.0]], "one-hot"),
        ("categorical", [[0.5, 0.5, 0.0]], "one-hot"),
        ("categorical", [[1.0], [-1.0]], "integer category codes"),
        ("categorical", [[1.5]], "integer category codes"),
    ],
)
def test_check_data_names_the_modality(name, rows, message):
    with pytest.raises(ValueError, match=f"'counts'.*{message}"):
        LIKELIHOODS[name].check_data("counts", torch.tensor(rows))


@pytest.mark.parametrize("kind", KINDS)
def test_check_data_accepts_valid_data(kind):
    name = _BUILD[kind][0]
    LIKELIHOODS[name].check_data("m", torch.tensor(_data(kind, np.random.default_rng(5))))


def test_unseen_category_codes_are_an_error():
    codes = _build("categorical_codes")
    with pytest.raises(ValueError, match="0..3"):
        codes.log_prob(torch.tensor([[4.0]]), torch.zeros(1, N_CLASSES, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_natural_parameter_round_trips_through_the_mean(kind):
    likelihood = _build(kind)
    block = torch.tensor(_data(kind, np.random.default_rng(6), n=50))
    a = likelihood.natural_parameter_from_data(block)
    assert a.shape == (likelihood.n_outputs,)
    if isinstance(likelihood, Categorical):
        frequencies = np.bincount(likelihood.encoder_input(block).argmax(1).numpy(), minlength=N_CLASSES) / 50
        frequencies = np.maximum(frequencies, 1e-3) / np.maximum(frequencies, 1e-3).sum()
        np.testing.assert_allclose(likelihood.probabilities(a).numpy(), frequencies, rtol=1e-6)
        if kind.endswith("onehot"):
            torch.testing.assert_close(likelihood.mean(likelihood.natural_parameter(block.mean(0))), block.mean(0))
        else:
            with pytest.raises(ValueError, match="class probabilities"):
                likelihood.natural_parameter(block.mean(0))
    else:
        expected = block.mean(0).clamp(1e-3, 1 - 1e-3) if kind == "bernoulli" else block.mean(0)
        torch.testing.assert_close(likelihood.mean(a), expected)


def test_data_dependent_starts():
    block = torch.tensor(_data("normal", np.random.default_rng(7), n=300), dtype=torch.float32)
    learned = make_likelihood("normal", WIDTH, "learn", block)
    torch.testing.assert_close(learned.scale, block.std(0, unbiased=False))
    fixed = make_likelihood("laplace", WIDTH, 0.3, block)
    torch.testing.assert_close(fixed.scale, torch.full((WIDTH,), 0.3))
    assert list(fixed.parameters()) == []

    counts = torch.tensor(_data("negative_binomial", np.random.default_rng(8), n=5000), dtype=torch.float32)
    mean, var = counts.mean(0), counts.var(0, unbiased=False)
    nb = make_likelihood("negative_binomial", WIDTH, "learn", counts)
    torch.testing.assert_close(nb.total_count, (mean**2 / (var - mean)).clamp(1e-2, 1e4), rtol=1e-4, atol=0)
    np.testing.assert_allclose(nb.total_count.detach().numpy(), [0.7, 5.0, 2.0], rtol=0.15)  # the true r
    poisson_like = make_likelihood("negative_binomial", 1, 1.0, torch.tensor([[1.0], [1.0], [1.0]]))
    assert poisson_like.total_count.item() == pytest.approx(1e4)


def test_negative_binomial_is_stable_and_tends_to_poisson():
    nb = make_likelihood("negative_binomial", 1, 1.0, torch.tensor([[1.0], [1.0]])).double()  # r = 1e4
    x = torch.tensor([[0.0], [3.0], [40.0]], dtype=torch.float64)
    a = torch.log(torch.tensor([[0.5], [3.0], [35.0]], dtype=torch.float64))
    poisson = LIKELIHOODS["poisson"](1).double()
    torch.testing.assert_close(nb.log_prob(x, a), poisson.log_prob(x, a), rtol=1e-2, atol=1e-2)
    nb32 = make_likelihood("negative_binomial", 1, 1.0, torch.tensor([[0.0], [9.0]]))  # small r
    a = torch.tensor([[-60.0], [0.0], [60.0]], requires_grad=True)
    log_p = nb32.log_prob(torch.tensor([[0.0], [5.0], [1e6]]), a)
    log_p.sum().backward()
    assert bool(torch.isfinite(log_p).all()) and bool(torch.isfinite(a.grad).all())
    assert bool(torch.isfinite(nb32.rho.grad).all())


@pytest.mark.parametrize("name, draw", [("normal", "normal"), ("laplace", "laplace")])
def test_calibrated_scale_is_the_maximum_likelihood_scale(name, draw):
    """Residuals of known scale 0.3: the calibrated scale recovers it, and it maximises the log-likelihood."""
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(size=(4, 500, 3)), dtype=torch.float32)  # (draws, rows, features)
    noise = getattr(rng, draw)(scale=0.3, size=(4, 500, 3))
    x = a[0] + torch.tensor(noise[0], dtype=torch.float32)
    lik = make_likelihood(name, 3, "auto", x)
    value = lik.calibrate(x, a[:1].expand(4, -1, -1))
    assert abs(value - 0.3) < 0.02
    np.testing.assert_allclose(lik.scale.numpy(), value)
    total = lik.log_prob(x, a[0]).sum()
    for factor in (0.9, 1.1):  # the maximum: any other scale gives a lower likelihood
        other = make_likelihood(name, 3, factor * value, x)
        assert other.log_prob(x, a[0]).sum() < total


def test_calibrating_the_auto_scale_raises_the_held_out_likelihood(views, monkeypatch):
    """fit sets each "auto" scale to its maximum-likelihood value on the validation rows: held-out
    rows score higher than with the wide scale stage 1 trained with, and nothing else changes."""
    from _helpers import small_jnf

    import skjnf._fitting as fitting

    views_all, _, _ = views
    X = {m: x[:180] for m, x in views_all.items()}
    held_out = {m: x[180:] for m, x in views_all.items()}
    params = dict(joint_epochs=30, flow_epochs=2, hidden_sizes=(32,), lr=1e-2)
    calibrated = small_jnf(**params).fit(X)
    with monkeypatch.context() as patch:
        patch.setattr(fitting, "calibrate_auto_scales", lambda *args: {})
        wide = small_jnf(**params).fit(X)
    scales = calibrated.history_["joint"]["calibrated_scales"]
    for j, m in enumerate(calibrated.modality_names_):
        assert float(calibrated.module_.likelihoods[j].scale[0]) == pytest.approx(scales[m])
        assert scales[m] < float(wide.module_.likelihoods[j].scale[0])
    assert calibrated.score(held_out) > wide.score(held_out) + 1.0
    np.testing.assert_array_equal(calibrated.transform(held_out), wide.transform(held_out))
    np.testing.assert_array_equal(calibrated.predict(held_out)["a"], wide.predict(held_out)["a"])


def test_calibration_on_a_row_subset_matches_all_rows(views, monkeypatch):
    """Beyond MAX_SELECTION_ROWS rows a random subset is read (memory); its scales agree with all rows'."""
    from _helpers import small_jnf

    import skjnf._fitting as fitting

    X, _, _ = views
    params = dict(joint_epochs=20, flow_epochs=1, hidden_sizes=(32,), lr=1e-2, validation_fraction=0.5)
    full = small_jnf(**params).fit(X).history_["joint"]["calibrated_scales"]
    monkeypatch.setattr(fitting, "MAX_SELECTION_ROWS", 60)
    subset = small_jnf(**params).fit(X).history_["joint"]["calibrated_scales"]
    assert subset != full  # the subset path ran
    for m in full:
        assert subset[m] == pytest.approx(full[m], rel=0.15)
