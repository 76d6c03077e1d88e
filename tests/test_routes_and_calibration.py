"""The newer code's mechanics against reference computations (issue 23): the Gaussian product's
linearisation cache, the target routes' rows and losses, the product flag of a routed subset,
the masked stage losses, the flow proposal's density, the scale calibration and its rows, the
input ranges of incomplete rows, call seeds, and the HMC targets. Each test names the one-line
bug it is there to catch."""

import copy

import numpy as np
import torch
from _helpers import make_views, normal_module, own_posteriors_misplaced, small_jnf, validation_rows

import skjnf._fitting as fitting
import skjnf._posteriors as posteriors
import skjnf._routing as routing
from skjnf._distributions import std_normal_log_prob
from skjnf._flows import _randomize_
from skjnf._gaussian_product import GaussianProduct, linearized_expert
from skjnf._likelihoods import SCALE_FLOOR_FRACTION, make_likelihood
from skjnf._modules import stage1_loss, stage2_row_counts

PAIRS = (["a", "b"], ["a", "c"], ["b", "c"])


def _blocks(X, names=("a", "b", "c")):
    return {m: torch.as_tensor(X[m], dtype=torch.float32) for m in names}


def _randomized(module, seed=0):
    """The module with random flows (the zero init makes each flow the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for flow in module.flows:
        _randomize_(flow, generator=generator)
    return module.eval()


def test_product_posterior_linearises_each_expert_of_the_product(fitted, views):
    """Catches a linearisation cache keyed by the row chunk only (every expert of a product then
    being the first one cached): the product equals the one built from each expert's own
    linearisation, and differs from the first expert's squared."""
    X, _, _ = views
    module = copy.deepcopy(fitted.module_)
    _randomized(module)
    blocks = _blocks(X)
    with torch.no_grad():
        got = routing.ProductPosterior(module, blocks, ["a", "b"], len(X["a"])).mean(1, None)
        experts = [
            linearized_expert(module.expert(m, blocks[m]), module.aggregate_scale_tril, module.aggregate_mean)
            for m in ("a", "b")
        ]
        expected = GaussianProduct(experts, module.aggregate_scale_tril, module.aggregate_mean).mean()
        squared = GaussianProduct([experts[0]] * 2, module.aggregate_scale_tril, module.aggregate_mean).mean()
    torch.testing.assert_close(got, expected.to(got.dtype))
    assert (got - squared.to(got.dtype)).abs().max() > 1e-2


def test_target_routes_judge_each_target_on_the_rows_observing_it(fitted, views, monkeypatch):
    """Catches target routes that also score rows missing the target (its zero placeholder), or
    that leave out the one-standard-error rule: each pair's route for target t is chosen on
    exactly the rows observing the pair and t, with ``TARGET_ROUTE_STANDARD_ERRORS``."""
    X, _, _ = views
    module = copy.deepcopy(fitted.module_).eval()
    rng = np.random.default_rng(0)
    observed = np.ones((len(X["a"]), 3), dtype=bool)
    observed[rng.random(len(observed)) < 0.3, 2] = False  # c missing
    observed[rng.random(len(observed)) < 0.3, 0] = False  # a missing (c observed or not)
    observed[~observed.any(1), 1] = True
    blocks = {m: x * torch.from_numpy(observed[:, j : j + 1]) for j, (m, x) in enumerate(_blocks(X).items())}
    seen = {}
    pick = routing.pick_route

    rules = set()

    def spy(bits, members, used, row_loss, rows, *args):
        seen[bits] = rows.clone()
        rules.add(args)
        return pick(bits, members, used, row_loss, rows, *args)

    monkeypatch.setattr(routing, "pick_route", spy)
    routing.choose_target_routes(module, blocks, torch.from_numpy(observed), 4, 0)
    for pair in PAIRS:
        target = next(m for m in "abc" if m not in pair)
        expected = observed[:, [module.index(m) for m in [*pair, target]]].all(1)
        np.testing.assert_array_equal(seen[module.bitmask(pair)].numpy(), expected)
    assert rules == {(routing.TARGET_ROUTE_STANDARD_ERRORS,)}


def test_where_the_product_is_a_subsets_posterior_its_routes_compare_the_products_losses(fitted, views, monkeypatch):
    """Catches target routes that keep comparing the subset flow's losses after the product became
    S's posterior. The product is made an oracle (the joint posterior mean from every modality,
    target included) and the subset flow is misplaced: each pair then keeps its own (product)
    posterior for its target, where the flow's losses would send it to a single expert."""
    X, _, _ = views
    est = copy.deepcopy(fitted)
    module = est.module_.eval()
    blocks = _blocks(X)
    module.subset_routes.copy_(torch.arange(8))
    own_posteriors_misplaced(module, flow=True, product=False, monkeypatch=monkeypatch)
    with torch.no_grad():
        oracle = module.joint_posterior(blocks)[0]
    monkeypatch.setattr(routing.ProductPosterior, "mean", lambda self, *args: oracle)
    routing.choose_target_routes(module, blocks, None, 4, 0)
    for pair in PAIRS:
        bits = module.bitmask(pair)
        target = module.index(next(m for m in "abc" if m not in pair))
        assert bool(module.subset_products[bits])
        assert int(module.target_routes[bits, target]) == bits


def test_a_subset_routed_to_one_expert_uses_that_experts_flow_whatever_its_own_product_flag(fitted, views):
    """Catches routed_posterior reading the product flag of S instead of the subset S is routed
    to: a+b routed to expert a, with a+b's own flag set, is expert a's flow posterior."""
    X, _, _ = views
    module = copy.deepcopy(fitted.module_)
    bits = module.bitmask(["a", "b"])
    module.subset_routes[bits] = module.bitmask(["a"])
    module.subset_products[bits] = True
    blocks = _blocks(X)
    found = routing.routed_posterior(module, blocks, ["a", "b"])
    assert isinstance(found, routing.FlowPosterior)
    with torch.no_grad():
        means = [
            f.mean(4, torch.Generator().manual_seed(0)) for f in (found, routing.flow_posterior(module, blocks, ["a"]))
        ]
    torch.testing.assert_close(means[0], means[1], rtol=0, atol=0)


def test_a_target_route_leaves_the_sets_own_posterior_only_for_a_gain_beyond_one_standard_error():
    """Catches the one-standard-error rule of the target routes read with the standard deviation
    (not divided by √n), with its sign turned, or not applied: over 100 rows whose per-row gain of
    the smaller set has standard deviation 1 (standard error 0.1), a mean gain of 0.05 keeps the
    set's own posterior and one of 0.3 takes the smaller set; without the rule both take it."""
    noise = torch.randn(100, generator=torch.Generator().manual_seed(0))
    noise = (noise - noise.mean()) / noise.std()  # mean 0, standard deviation 1
    rows = torch.ones(100, dtype=torch.bool)
    own, smaller = 0b11, 0b01
    for gain, with_rule in ((0.05, own), (0.3, smaller)):
        losses = {own: torch.full((100,), 2.0), smaller: 2.0 - gain - noise, 0b10: torch.full((100,), 9.0)}
        rule = routing.TARGET_ROUTE_STANDARD_ERRORS
        assert routing.pick_route(own, [0, 1], lambda c: c, losses.__getitem__, rows, rule) == with_rule, gain
        assert routing.pick_route(own, [0, 1], lambda c: c, losses.__getitem__, rows) == smaller


def _experts_misplaced(module, shifts):
    """Shift each expert's base mean by its ``shifts`` entry: a single view's posterior then never
    predicts best, and the less shifted of two predicts better."""
    with torch.no_grad():
        for encoder, shift in zip(module.encoders, shifts):
            next(p for k, p in encoder.named_parameters() if k.endswith("head.mean.bias")).add_(shift)


def test_a_target_route_scores_and_predicts_through_the_sets_own_posterior(fitted, views, monkeypatch):
    """Catches target routes that score, or predictions that decode, the posterior a set's subset
    route names instead of the set's own (its subset flow): every pair is routed to its first
    expert and every expert is misplaced (that one most), so a pair's own flow predicts its target
    far better than either view alone (scoring the routed posterior instead routes the pair to its
    other view), and ``predict`` from the pair must decode that flow's mean."""
    X, _, _ = views
    est = copy.deepcopy(fitted)
    module = est.module_.eval()
    blocks = _blocks(X)
    own_posteriors_misplaced(module, flow=False, product=True, monkeypatch=monkeypatch)
    module.subset_routes.copy_(torch.arange(8))
    for pair in PAIRS:
        module.subset_routes[module.bitmask(pair)] = module.bitmask(pair[:1])
    _experts_misplaced(module, (20.0, 10.0, 5.0))
    routing.choose_target_routes(module, blocks, None, 4, 0)
    assert bool(module.target_routes_own)
    for pair in PAIRS:
        target = next(m for m in "abc" if m not in pair)
        assert int(module.target_routes[module.bitmask(pair), module.index(target)]) == module.bitmask(pair)
        predicted = est.predict({m: X[m] for m in pair})[target]
        routed = est.predict({pair[0]: X[pair[0]]})[target]  # what the subset route would decode
        own_error, routed_error = ((predicted - X[target]) ** 2).mean(), ((routed - X[target]) ** 2).mean()
        assert own_error < 0.1 * routed_error, (pair, own_error, routed_error)


def test_a_model_pickled_before_own_target_posteriors_predicts_through_its_subset_routes(fitted, views):
    """Catches old pickles' target routes (chosen among the routed posteriors) read as naming a
    set's own posterior: without ``target_routes_own``, ``predict`` from a pair routed to its
    first expert decodes that expert's posterior, as the model did when it was fitted."""
    X, _, _ = views
    est = copy.deepcopy(fitted)
    module = est.module_
    module.target_routes_own.fill_(False)
    bits = module.bitmask(["a", "b"])
    module.subset_routes[bits] = module.bitmask(["a"])
    module.target_routes[bits] = bits  # keep the pair for every target
    from_a = est.predict({"a": X["a"]})["c"]
    gap = np.abs(est.predict({"a": X["a"], "b": X["b"]})["c"] - from_a).max()  # other noise: other pattern
    module.target_routes_own.fill_(True)
    own_gap = np.abs(est.predict({"a": X["a"], "b": X["b"]})["c"] - from_a).max()
    assert gap < 1e-2 < own_gap


def test_stage1_loss_of_incomplete_rows_ignores_the_placeholders_of_missing_modalities():
    """Catches stage 1 reading zero placeholders as data (the joint encoder not given the observed
    mask): the loss of a row missing c is the same whatever values stand in c's block, and a
    complete row's loss does change with them."""
    module = normal_module()
    generator = torch.Generator().manual_seed(0)
    blocks = {m: torch.randn(6, 2, generator=generator) for m in module.names}
    observed = torch.ones(6, 3, dtype=torch.bool)
    observed[:3, 2] = False
    noise = torch.randn(6, module.latent_dim, generator=generator)
    losses = []
    for placeholder in (0.0, 7.0):
        shifted = dict(blocks, m2=torch.where(observed[:, 2:], blocks["m2"], placeholder))
        shifted_all = dict(blocks, m2=blocks["m2"] + placeholder)
        with torch.no_grad():
            losses.append(stage1_loss(module, shifted, noise, [1.0] * 3, 1.0, observed))
            losses.append(stage1_loss(module, shifted_all, noise, [1.0] * 3, 1.0, observed))
    torch.testing.assert_close(losses[0][:3], losses[2][:3], rtol=0, atol=0)
    assert (losses[1][3:] - losses[3][3:]).abs().min() > 1e-3


def test_stage2_losses_are_averaged_over_the_rows_each_part_learns_from():
    """Catches expert losses averaged over every row observing j, single-view rows too: an expert
    counts the rows observing it and another modality; the subset part, rows observing two."""
    observed = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    assert stage2_row_counts(observed, 5, 4).tolist() == [2.0, 3.0, 2.0, 3.0]
    assert stage2_row_counts(None, 5, 4).tolist() == [5.0] * 4


def test_flow_proposal_density_is_the_experts_density_at_its_draws():
    """Catches the flow proposal's log-density with the inverse log-determinant's sign flipped (the
    marginal likelihood of incomplete rows importance-weights with it): at each draw it equals
    log q_j(z | x_j) computed by the forward pass."""
    module = _randomized(normal_module())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, generator=generator)
    found = routing.flow_posterior(module, {"m1": x}, ["m1"])
    noise = torch.randn(7, 1, module.latent_dim, generator=generator)
    with torch.no_grad():
        z, log_q = found.propose(slice(0, 5), noise)
        expected = module.expert("m1", x).log_prob(z)
    assert (expected - gaussian_part(found, noise)).abs().max() > 0.1  # the flow is not volume-preserving
    torch.testing.assert_close(log_q, expected, rtol=1e-5, atol=1e-4)


def gaussian_part(found, noise):
    """log N(u; μ, σ²) of the base draws alone (what the density would be without the log-det)."""
    from skjnf._distributions import gaussian_log_prob, reparameterize

    base = found.density(slice(0, 5))
    mean, log_var = base.loc, base.log_var
    return gaussian_log_prob(reparameterize(mean, log_var, noise), mean, log_var)


def test_calibrated_scale_is_floored_at_a_fraction_of_the_scale_it_replaces():
    """Catches a calibration without its floor: decoders that reproduce the data exactly would set
    the scale to 0 (an infinite likelihood); it stops at SCALE_FLOOR_FRACTION of the old scale."""
    likelihood = make_likelihood("normal", 3, 0.8, None)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    assert np.isclose(likelihood.calibrate(x, x[None].clone()), SCALE_FLOOR_FRACTION * 0.8, rtol=1e-6)
    assert np.isclose(float(likelihood.scale.max()), SCALE_FLOOR_FRACTION * 0.8, rtol=1e-6)
    residual = 0.3 * torch.ones(10, 3)
    assert np.isclose(likelihood.calibrate(x, (x - residual)[None]), 0.3, rtol=1e-6)  # above the floor: the MLE


def test_scales_are_calibrated_on_the_validation_rows(views, monkeypatch):
    """Catches the "auto" scales calibrated on the training rows, where the decoders' errors are
    smallest (an over-confident held-out likelihood): calibration reads the validation rows."""
    X, _, _ = views
    seen = []
    calibrate = fitting.calibrate_auto_scales

    def spy(module, spec, data, seed):
        seen.append(data.blocks["a"].clone())
        return calibrate(module, spec, data, seed)

    monkeypatch.setattr(fitting, "calibrate_auto_scales", spy)
    model = small_jnf(joint_epochs=1, flow_epochs=1, validation_fraction=0.25, random_state=3).fit(X)
    valid = validation_rows(model, len(X["a"]))
    np.testing.assert_array_equal(seen[0].numpy(), X["a"][valid].astype(np.float32))


def test_input_ranges_of_incomplete_rows_come_from_the_rows_observing_the_modality():
    """Catches clip bounds taken over every row, unobserved rows' zero placeholders included: a
    modality whose values are all above 4 keeps a lower bound above 4."""
    X, _, _ = make_views(n=80)
    X = {m: x.copy() for m, x in X.items()}
    X["c"] = X["c"] + 10.0 - X["c"].min()
    X["c"][::4] = np.nan  # a quarter of the rows miss c
    est = small_jnf(joint_epochs=1, flow_epochs=1).fit(X)
    low = est.module_.input_ranges[2].low.numpy()
    np.testing.assert_allclose(low, np.nanmin(X["c"], axis=0), rtol=1e-6)
    assert low.min() >= 10.0 - 1e-5


def test_sample_latent_and_sample_follow_their_random_state(fitted, views):
    """Catches the call's random_state ignored (the fitted inference seed always used): other seeds
    give other draws, the same seed the same draws, None the fitted seed's."""
    X, _, _ = views
    rows = {m: x[:20] for m, x in X.items()}
    one = fitted.sample_latent(rows, n_samples=2, cond_mod="a", random_state=1)
    assert not np.allclose(one, fitted.sample_latent(rows, n_samples=2, cond_mod="a", random_state=2))
    np.testing.assert_array_equal(one, fitted.sample_latent(rows, n_samples=2, cond_mod="a", random_state=1))
    draws = fitted.sample(n_samples=2, X=rows, cond_mod="a", random_state=1, add_noise=True)["b"]
    assert not np.allclose(draws, fitted.sample(n_samples=2, X=rows, cond_mod="a", random_state=2, add_noise=True)["b"])


def _hmc_target(method, module, blocks, cond):
    experts = [module.expert(m, blocks[m]) for m in cond]
    return posteriors._subset_log_target(module, blocks, cond, experts, method), experts


def test_product_target_divides_by_the_aggregate_posterior():
    """Catches subset_posterior="product" dividing by the prior (silently "product_prior"): its HMC
    target is Σ_j log q_j(z | x_j) − (s − 1)·log r(z), r the aggregate posterior's Gaussian fit."""
    module = _randomized(normal_module())
    generator = torch.Generator().manual_seed(2)
    mean, log_var = torch.randn(50, 3, generator=generator) + 1.0, torch.full((50, 3), 1.5)
    module.set_aggregate_posterior(mean, log_var)  # far from N(0, I)
    blocks = {m: torch.randn(4, 2, generator=generator) for m in module.names}
    cond = ["m0", "m1", "m2"]
    z = torch.randn(6, 4, 3, generator=generator)
    with torch.no_grad():
        log_target, experts = _hmc_target("product", module, blocks, cond)
        got = log_target(z, slice(0, 4))
        expected = sum(expert.log_prob(z) for expert in experts) - 2 * module.aggregate_log_prob(z)
        prior = sum(expert.log_prob(z) for expert in experts) - 2 * std_normal_log_prob(z)
    torch.testing.assert_close(got, expected)
    assert (got - prior).std() > 0.1  # the two divisors differ beyond a constant


def test_generative_target_is_the_prior_times_the_likelihoods():
    """Catches subset_posterior="generative" without the prior p(z): its HMC target is
    log p(z) + Σ_{j∈S} log p(x_j | z)."""
    module = normal_module()
    generator = torch.Generator().manual_seed(3)
    blocks = {m: torch.randn(4, 2, generator=generator) for m in module.names}
    z = 3.0 * torch.randn(6, 4, 3, generator=generator)
    with torch.no_grad():
        log_target, _ = _hmc_target("generative", module, blocks, ["m0", "m2"])
        expected = std_normal_log_prob(z) + sum(module.log_likelihood(m, blocks[m], z) for m in ("m0", "m2"))
        got = log_target(z, slice(0, 4))
    torch.testing.assert_close(got, expected)
