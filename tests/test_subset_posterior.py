"""The posterior given a subset of modalities: aggregate divisor, amortised subset encoder, tails."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from _helpers import normal_module, own_posteriors_misplaced, small_jnf

import skjnf._training as training
from skjnf._distributions import FlowDistribution, std_normal_log_prob
from skjnf._flows import IdentityFlow
from skjnf._hmc import product_of_experts_log_prob
from skjnf._posteriors import _supported_mean, support_radius


def test_aggregate_divisor_equal_to_the_prior_gives_the_papers_product():
    module = normal_module()  # before stage 2 the aggregate fit is N(0, I)
    z = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(module.aggregate_log_prob(z), std_normal_log_prob(z))
    experts = [FlowDistribution(torch.randn(4, 3), torch.randn(4, 3).clamp(-1, 1), IdentityFlow()) for _ in range(3)]
    torch.testing.assert_close(
        product_of_experts_log_prob(z, experts, module.aggregate_log_prob), product_of_experts_log_prob(z, experts)
    )


def test_aggregate_posterior_is_the_moment_fit_of_the_mixture_of_joint_posteriors():
    """Rows' posterior means ~ N(m, C), each with variance v: E_X q(z | X) has mean m, covariance C + diag(v)."""
    g = torch.Generator().manual_seed(1)
    m, A = torch.tensor([1.0, -2.0, 0.5]), torch.randn(3, 3, generator=g, dtype=torch.float64)
    C, v = A @ A.T + torch.eye(3, dtype=torch.float64), torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    means = m + torch.randn(200_000, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(C).T
    module = normal_module().double()
    module.set_aggregate_posterior(means, torch.log(v).expand(len(means), 3))
    L = module.aggregate_scale_tril
    torch.testing.assert_close(module.aggregate_mean, m.double(), atol=0.02, rtol=0)
    torch.testing.assert_close(L @ L.T, C + torch.diag(v), atol=0.05, rtol=0.02)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(module.aggregate_mean, scale_tril=L).log_prob(z)
    torch.testing.assert_close(module.aggregate_log_prob(z), exact)


def test_support_radius_is_the_chi_square_tail_quantile():
    from scipy.stats import chi2

    for d in (1, 2, 10, 50):
        exact = chi2.ppf(1 - 1e-6, d)
        assert exact <= support_radius(d) <= 1.16 * exact  # never cuts inside the quantile


def test_posterior_mean_leaves_out_draws_beyond_the_aggregate_support():
    module = normal_module(latent_dim=2)
    draws = torch.zeros(4, 2, 2)
    draws[:, 0] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [500.0, 800.0]])  # one flow tail
    draws[:, 1] = 300.0  # every draw of row 1 is out: its fallback is used
    fallback = torch.tensor([[9.0, 9.0], [-3.0, 2.0]])
    mean = _supported_mean(module, draws, lambda rows: fallback[rows])
    torch.testing.assert_close(mean, torch.tensor([[0.0, 1.0 / 3.0], [-3.0, 2.0]]))
    # the fallback (an extra inverse flow pass) runs only when some row needs it, on those rows
    asked = []
    _supported_mean(module, draws, lambda rows: asked.append(rows.tolist()) or fallback[rows])
    assert asked == [[1]]
    inside = torch.zeros(3, 2, 2)
    torch.testing.assert_close(_supported_mean(module, inside, lambda rows: 1 / 0), torch.zeros(2, 2))


def test_stage2_weight_decay_reaches_the_experts_only(views, monkeypatch):
    X, _, _ = views
    calls, original = [], training.fused_adam

    def spy(params, lr, weight_decay=0.0):
        params = list(params)
        calls.append((weight_decay, params))
        return original(params, lr, weight_decay)

    monkeypatch.setattr(training, "fused_adam", spy)
    jnf = small_jnf(joint_epochs=1, flow_epochs=1, expert_weight_decay=0.3).fit(X)
    assert [wd for wd, _ in calls] == [0.0, 0.3]
    optimizer = original(calls[1][1], 1e-3, 0.3)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    module = jnf.module_
    subset = [*module.subset_encoder.parameters(), *module.subset_flow.parameters()]
    experts = [*module.encoders.parameters(), *module.flows.parameters()]
    assert {decay[id(p)] for p in subset} == {0.0}
    assert {decay[id(p)] for p in experts} == {0.3}


def test_amortized_subset_posterior_is_proper_where_the_aggregate_is_wide(fitted, views):
    """A wide aggregate posterior (variances above 1) made the paper's product improper; the subset
    encoder's posterior stays inside the aggregate's support, with no HMC and no warning."""
    X, _, _ = views
    L = fitted.module_.aggregate_scale_tril
    assert torch.linalg.eigvalsh(L @ L.T).max() > 1.5  # the test is not vacuous
    radius = support_radius(fitted.latent_dim)
    for cond in (["a", "b"], ["a", "c"], ["b", "c"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            z = fitted.transform(X, cond_mod=cond)
            draws, diagnostics = fitted.sample_latent(
                X, n_samples=4, cond_mod=cond, random_state=0, return_diagnostics=True
            )
        white = fitted.module_.aggregate_whitened(torch.from_numpy(np.concatenate([z[None], draws])))
        assert (white**2).sum(-1).max() < radius
        assert diagnostics["acceptance"] is None  # no HMC ran


def test_amortized_pair_predicts_at_least_as_well_as_its_best_single_modality(fitted, views):
    X, _, _ = views
    fitted = copy.copy(fitted).set_params(n_posterior_samples=256)  # Monte Carlo noise well under 10 %

    def error(cond, target):
        return float(np.mean((fitted.predict(X, cond_mod=cond)[target] - X[target]) ** 2))

    for cond, target in ((["a", "b"], "c"), (["a", "c"], "b"), (["b", "c"], "a")):
        # the product of experts gave 7-40x here on the digits (benchmarks/subset_inference.py); the
        # amortised posterior stays near the best single view. On these training rows, fit seeds
        # 0-2 give at most 1.17 (0.78-1.17; before the joint encoder's linear paths 0.74-1.34): the
        # routes that keep a pair from doing worse are chosen on 24 validation rows
        assert error(cond, target) <= 1.25 * min(error(m, target) for m in cond)


def test_subset_posterior_is_validated():
    with pytest.raises(ValueError, match="subset_posterior"):
        small_jnf(subset_posterior="poe").fit({"a": np.zeros((20, 2)), "b": np.ones((20, 2))})


def test_subsets_are_routed_to_a_subset_only_where_it_fits_held_out_rows_better(fitted, views):
    X, _, _ = views
    module, routed = fitted.module_, fitted.subset_routes_
    assert module.subset_routes.shape == (8,)  # 2^3 bitmasks
    assert module.subset_routes[[0, 1, 2, 4, 7]].tolist() == [0, 1, 2, 4, 7]  # sizes 0, 1 and M: themselves
    for subset, used in routed.items():
        bits = sum(1 << module.index(m) for m in subset.split("+"))
        used_bits = sum(1 << module.index(m) for m in used.split("+"))
        assert int(module.subset_routes[bits]) == used_bits and used_bits & ~bits == 0  # a proper subset
    # a routed subset's posterior is that of the subset it uses (same draws given the same seed)
    saved = module.subset_routes.clone()
    try:
        module.subset_routes[3] = 1  # {a, b} -> expert a
        routed_mean = fitted.transform({"a": X["a"], "b": X["b"]}, cond_mod=["a", "b"])
        module.subset_routes[3] = 3
        amortized_mean = fitted.transform({"a": X["a"], "b": X["b"]}, cond_mod=["a", "b"])
    finally:
        module.subset_routes.copy_(saved)
    expert_draws = fitted.sample_latent({"a": X["a"]}, n_samples=64, cond_mod="a", random_state=0).mean(0)
    assert np.abs(routed_mean - expert_draws).mean() < np.abs(amortized_mean - expert_draws).mean()


def test_routing_makes_held_out_fit_monotone_in_the_subsets():
    """With a subset posterior that fits worse than each of its experts, every subset is routed
    to its best expert; with one that fits better, nothing is routed."""
    from skjnf._batch import StageBatch
    from skjnf._routing import choose_subset_routes

    module = normal_module(latent_dim=2, n_modalities=4)
    g = torch.Generator().manual_seed(0)
    blocks = {f"m{j}": torch.randn(50, 2, generator=g) for j in range(4)}
    blocks = StageBatch(blocks, joint_mean=torch.zeros(50, 2), joint_log_var=torch.full((50, 2), -2.0))
    noise = torch.randn(50, 2, generator=g)
    with torch.no_grad():
        for j, encoder in enumerate(module.encoders):  # expert j: N(0, e^{j/4 - 1}), m0 the best
            encoder.head.mean.weight.zero_(), encoder.head.mean.bias.zero_()
            encoder.head.log_var.weight.zero_(), encoder.head.log_var.bias.fill_(j / 4 - 1.0)
        head = module.subset_encoder.head
        head.mean.weight.zero_(), head.log_var.weight.zero_(), head.log_var.bias.fill_(3.0)  # far too wide
        head.mean.bias.zero_()
        routed = choose_subset_routes(module.eval(), blocks, noise)
    # every subset of 2..3 modalities uses its lowest-numbered member's expert
    for bits in range(16):
        if 2 <= bin(bits).count("1") <= 3:
            assert int(module.subset_routes[bits]) == bits & -bits
    assert routed["m1+m2+m3"] == "m1"
    with torch.no_grad():
        head.log_var.bias.fill_(-2.0)  # now exactly the joint posterior: the subset posterior wins
        assert choose_subset_routes(module, blocks, noise) == {}


def _clipped_copy(X, modality, value, rows=slice(0, 5)):
    out = {m: x.copy() for m, x in X.items()}
    out[modality][rows] = value
    return out


@pytest.mark.parametrize(("cond", "margin"), [(["a"], 0.05), (["a", "b"], 3.0)])
def test_cross_modal_encoders_clip_each_feature_a_margin_beyond_its_range_in_fit(fitted, views, cond, margin):
    """Catches the clip dropped (rows far out move the latent), the bound at the range itself
    (a row within the margin is clipped) and each encoder given the other's margin (the experts'
    EXPERT_INPUT_MARGIN, the subset encoder's SUBSET_INPUT_MARGIN, as measured in _modules)."""
    X, _, _ = views
    est = copy.deepcopy(fitted)
    est.module_.subset_routes.copy_(torch.arange(8))  # pairs through the subset encoder, not an expert
    est.module_.subset_products.zero_()  # nor the product of the experts
    low, high = X["a"].min(0), X["a"].max(0)
    far = _clipped_copy(X, "a", 1e3)  # five rows far beyond what fit saw, in every feature of a
    at_bound = _clipped_copy(X, "a", high + margin * (high - low))
    inside = _clipped_copy(X, "a", high + 0.9 * margin * (high - low))
    np.testing.assert_allclose(est.transform(far, cond_mod=cond), est.transform(at_bound, cond_mod=cond), rtol=1e-5)
    assert not np.allclose(est.transform(inside, cond_mod=cond)[:5], est.transform(at_bound, cond_mod=cond)[:5])


def test_joint_encoder_and_likelihood_read_values_as_they_are(fitted, views):
    X, _, _ = views
    far, at_edge = _clipped_copy(X, "a", 1e3), _clipped_copy(X, "a", X["a"].max(0) + 2 * np.ptp(X["a"], 0))
    assert not np.allclose(fitted.transform(far)[:5], fitted.transform(at_edge)[:5])
    np.testing.assert_array_equal(fitted.transform(far)[5:], fitted.transform(at_edge)[5:])
    assert (fitted.score_samples(far)[:5] < fitted.score_samples(at_edge)[:5] - 1e3).all()


def test_inputs_inside_the_range_are_not_clipped(fitted, views):
    X, _, _ = views
    module = fitted.module_
    saved = [(r.low.clone(), r.high.clone()) for r in module.input_ranges]
    try:
        for r in module.input_ranges:
            r.low.fill_(-np.inf), r.high.fill_(np.inf)
        unbounded = fitted.transform(X, cond_mod=["a", "b"])
    finally:
        for r, (low, high) in zip(module.input_ranges, saved):
            r.low.copy_(low), r.high.copy_(high)
    np.testing.assert_array_equal(fitted.transform(X, cond_mod=["a", "b"]), unbounded)
    np.testing.assert_allclose(module.input_ranges[0].high.numpy(), X["a"].max(0), rtol=1e-6)  # every fit row


def test_each_target_is_predicted_from_the_subset_that_predicted_it_best_on_held_out_rows(fitted, views, monkeypatch):
    from skjnf._routing import choose_target_routes

    X, _, _ = views
    est = copy.deepcopy(fitted)
    module = est.module_
    assert tuple(module.target_routes.shape) == (8, 3)  # subset bitmask x target
    blocks = {m: torch.as_tensor(X[m], dtype=torch.float32) for m in module.names}
    module.subset_routes.copy_(torch.arange(8))  # every pair through its own posterior ...
    own_posteriors_misplaced(module, flow=True, product=True, monkeypatch=monkeypatch)  # ... each misplacing every row
    routed = choose_target_routes(module.eval(), blocks, None, 8, 0)
    for pair, target in ((["a", "b"], "c"), (["a", "c"], "b"), (["b", "c"], "a")):
        used = routed["+".join(pair)][target]
        assert used in pair  # one of the pair's own experts, never the misplaced subset posterior
        prediction = est.predict(X, cond_mod=pair)[target]
        np.testing.assert_array_equal(prediction, est.predict(X, cond_mod=used)[target])
        # transform keeps the subset's own posterior: decoding it is far worse than what predict gives
        decoded = est.inverse_transform(est.transform(X, cond_mod=pair))[target]
        assert np.mean((decoded - X[target]) ** 2) > 10 * np.mean((prediction - X[target]) ** 2)
    # without routes, predict is decoding transform's latent
    module.target_routes.copy_(torch.arange(8)[:, None].repeat(1, 3))
    np.testing.assert_array_equal(
        est.predict(X, cond_mod=["a", "b"])["c"], est.inverse_transform(est.transform(X, cond_mod=["a", "b"]))["c"]
    )


def test_routes_are_chosen_on_at_most_max_selection_rows(views, monkeypatch):
    """Both route choices read the same random subset of the validation rows beyond the cap (their
    cost grows as 2^M times the rows), and every validation row below it."""
    import skjnf._fitting as fitting

    X, _, _ = views
    seen = []
    for name in ("choose_subset_routes", "choose_target_routes"):
        choose = getattr(fitting, name)

        def spy(module, rows, *args, choose=choose):  # a StageBatch, or its blocks
            seen.append((rows if isinstance(rows, dict) else rows.blocks)["a"].clone())
            return choose(module, rows, *args)

        monkeypatch.setattr(fitting, name, spy)
    params = dict(joint_epochs=1, flow_epochs=1, validation_fraction=0.5)
    small_jnf(**params).fit(X)
    n_valid = len(seen[0])
    assert n_valid == int(np.ceil(0.5 * len(X["a"]))) and torch.equal(seen[0], seen[1])
    monkeypatch.setattr(fitting, "MAX_SELECTION_ROWS", 40)
    seen.clear()
    small_jnf(**params).fit(X)
    assert len(seen[0]) == 40 and torch.equal(seen[0], seen[1])


def test_the_choices_of_fit_are_fitted_attributes_read_from_the_module(fitted, views, monkeypatch):
    """Catches the choices of fit kept in two places that drift apart: ``subset_routes_``,
    ``target_routes_`` and ``product_subsets_`` are what the choosers returned, follow the
    module's buffers (also after pickling), and do not exist before fit."""
    from skjnf._routing import choose_target_routes

    X, _, _ = views
    est = copy.deepcopy(fitted)
    module = est.module_
    blocks = {m: torch.as_tensor(X[m], dtype=torch.float32) for m in module.names}
    module.subset_routes.copy_(torch.arange(8))
    own_posteriors_misplaced(module, flow=True, product=True, monkeypatch=monkeypatch)
    routed = choose_target_routes(module.eval(), blocks, None, 8, 0)
    assert est.target_routes_ == routed and len(routed) == 3
    assert est.subset_routes_ == {} and est.product_subsets_ == []
    module.subset_routes[module.bitmask(["a", "b"])] = module.bitmask(["a"])
    module.subset_products[module.bitmask(["b", "c"])] = True
    assert est.subset_routes_ == {"a+b": "a"} and est.product_subsets_ == ["b+c"]
    loaded = pickle.loads(pickle.dumps(est))
    assert loaded.subset_routes_ == {"a+b": "a"} and loaded.target_routes_ == routed
    assert not hasattr(small_jnf(), "subset_routes_")
    assert all(row["dur"] > 0 for stage in ("joint", "flows") for row in fitted.history_[stage]["epochs"])
