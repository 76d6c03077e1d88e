"""HMC on the product of experts: closed-form posteriors, adaptation, NaN safety (§7 items 4-6)."""

from functools import cache

import pytest
import torch
from torch import nn

from skjnf._distributions import FlowDistribution
from skjnf._hmc import _initial_positions, hmc_sample, product_of_experts_log_prob

N_CHAINS, N_STEPS, N_LEAPFROG = 4000, 200, 10
FIXED_STEP = 0.2


class IdentityFlow(nn.Module):
    """Gaussian experts: f = identity, log-det 0."""

    def forward(self, z):
        return z, z.new_zeros(z.shape[:-1])

    def inverse(self, u):
        return u, u.new_zeros(u.shape[:-1])


class BrokenOutsideBall(IdentityFlow):
    """Identity inside ||z|| <= 2; outside, the target becomes NaN or -Inf (and so does its gradient)."""

    def __init__(self, bad_value: float) -> None:
        super().__init__()
        self.bad_value = bad_value

    def forward(self, z):
        outside = z.norm(dim=-1, keepdim=True) > 2.0
        return torch.where(outside, torch.full_like(z, self.bad_value), z), z.new_zeros(z.shape[:-1])


def gaussian_experts(means, variances, flow=None):
    """Experts (mean, log_var, flow) from tensors of shape (s, n, D)."""
    flow = IdentityFlow() if flow is None else flow
    return [FlowDistribution(mean, variance.log(), flow) for mean, variance in zip(means, variances)]


def exact_posterior(means, variances, prior_exponent=None):
    """Mean m and precision λ of the Gaussian product of experts over the prior to the power s - 1."""
    exponent = len(means) - 1 if prior_exponent is None else prior_exponent
    precision = (1.0 / variances).sum(0) - exponent
    return (means / variances).sum(0) / precision, precision


@cache
def closed_form_case(n_experts: int):
    """Means and variances (s, 3 rows, D=3) with σ² in [0.3, 0.8].

    For s = 3, row 0 has σ² = 0.5 and μ = 1 for every expert: m = 1.5, whereas the reference's
    prior exponent 1 gives 1.2.
    """
    generator = torch.Generator().manual_seed(n_experts)
    means = 2.0 * torch.rand(n_experts, 3, 3, generator=generator) - 1.0
    variances = 0.3 + 0.5 * torch.rand(n_experts, 3, 3, generator=generator)
    if n_experts == 3:
        means[:, 0], variances[:, 0] = 1.0, 0.5
    return means, variances


@cache
def closed_form_run(n_experts: int, step_size):
    means, variances = closed_form_case(n_experts)
    return hmc_sample(
        gaussian_experts(means, variances), N_CHAINS, N_STEPS, N_LEAPFROG, step_size, torch.Generator().manual_seed(0)
    )


def assert_matches_gaussian(result, mean, precision, n_chains):
    standard_error = (1.0 / (precision * n_chains)).sqrt()
    draws = result.draws
    assert torch.all((draws.mean(0) - mean).abs() < 5 * standard_error), (draws.mean(0) - mean) / standard_error
    assert torch.all((result.mean - mean).abs() < 5 * standard_error), (result.mean - mean) / standard_error
    variance_ratio = draws.var(0) * precision
    assert torch.all((variance_ratio - 1).abs() < 0.12), variance_ratio
    for row in range(draws.shape[1]):
        correlation = torch.corrcoef(draws[:, row].T)
        off_diagonal = correlation - torch.diag(torch.diagonal(correlation))
        assert off_diagonal.abs().max() < 5 / n_chains**0.5, correlation


@pytest.mark.parametrize("step_size", ["auto", FIXED_STEP])
@pytest.mark.parametrize("n_experts", [2, 3])
def test_hmc_matches_closed_form_product_of_experts(n_experts, step_size):
    means, variances = closed_form_case(n_experts)
    mean, precision = exact_posterior(means, variances)
    result = closed_form_run(n_experts, step_size)
    assert result.draws.shape == (N_CHAINS, 3, 3) and result.mean.shape == (3, 3)
    assert_matches_gaussian(result, mean, precision, N_CHAINS)
    assert result.n_divergent == 0
    assert not result.escaped.any()


def test_reference_prior_exponent_would_fail_the_three_expert_case():
    means, variances = closed_form_case(3)
    mean, precision = exact_posterior(means, variances)
    reference_mean, _ = exact_posterior(means, variances, prior_exponent=1)
    assert torch.allclose(mean[0], torch.full((3,), 1.5)) and torch.allclose(reference_mean[0], torch.full((3,), 1.2))
    standard_error = (1.0 / (precision[0] * N_CHAINS)).sqrt()
    assert torch.all((mean[0] - reference_mean[0]).abs() > 20 * standard_error)


@pytest.mark.parametrize("n_experts", [2, 3])
def test_adapted_step_reaches_target_acceptance(n_experts):
    result = closed_form_run(n_experts, "auto")
    assert abs(result.acceptance - 0.75) < 0.1
    assert torch.all((result.acceptance_per_row - 0.75).abs() < 0.1), result.acceptance_per_row
    assert torch.all(result.step_size > 0.05) and torch.all(result.step_size < 2.0)


def test_fixed_step_is_kept():
    result = closed_form_run(2, FIXED_STEP)
    assert torch.all(result.step_size == FIXED_STEP)


def test_mass_adaptation_and_chunking_on_anisotropic_posterior():
    # Posterior variances 0.01, 0.11 and 1 (a 100-fold range); one row per chunk, so the rows
    # are simulated one after another with the generator's stream: statistics and row order
    # must be unaffected (exact equality with unchunked runs is not promised).
    generator = torch.Generator().manual_seed(5)
    variances = torch.tensor([0.02, 0.2, 1.0]).expand(2, 2, 3).clone()
    means = torch.randn(2, 2, 3, generator=generator)
    mean, precision = exact_posterior(means, variances)
    result = hmc_sample(
        gaussian_experts(means, variances),
        N_CHAINS,
        100,
        5,
        "auto",
        generator,
        adapt_mass=True,
        max_chain_rows=N_CHAINS,
    )
    assert_matches_gaussian(result, mean, precision, N_CHAINS)
    assert 0.6 < result.acceptance < 0.97


def test_log_prob_is_the_gaussian_posterior_up_to_a_constant():
    means, variances = closed_form_case(3)
    mean, precision = exact_posterior(means, variances)
    z = torch.randn(7, 3, 3, generator=torch.Generator().manual_seed(1))
    log_target = product_of_experts_log_prob(z, gaussian_experts(means, variances))
    log_gaussian = -0.5 * ((z - mean) ** 2 * precision).sum(-1)
    difference = log_target - log_gaussian
    assert difference.shape == (7, 3)
    assert torch.allclose(difference, difference[:1].expand_as(difference), atol=1e-4)


def all_finite(result):
    tensors = [result.mean, result.draws, result.step_size, result.acceptance_per_row]
    return all(bool(torch.isfinite(t).all()) for t in tensors) and result.acceptance == result.acceptance


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_target_never_reaches_the_state(bad_value):
    means = torch.full((2, 4, 3), 1.2)
    experts = gaussian_experts(means, torch.full((2, 4, 3), 0.5), BrokenOutsideBall(bad_value))
    result = hmc_sample(experts, 400, 40, 5, "auto", torch.Generator().manual_seed(3))
    assert all_finite(result)
    assert torch.all(result.draws.norm(dim=-1) <= 2.0)  # only the finite region is ever visited
    assert result.acceptance > 0.3
    assert result.n_divergent > 0  # post-burn-in trajectories leaving the ball are counted


@pytest.mark.parametrize("flow", [IdentityFlow(), BrokenOutsideBall(float("nan"))])
def test_forced_divergence_keeps_the_last_finite_state(flow):
    means = torch.full((2, 3, 3), 1.2)
    experts = gaussian_experts(means, torch.full((2, 3, 3), 0.5), flow)
    n_chains, n_steps = 300, 6
    # The sampler draws its starts first: replay them, with the restart at 0 where the target is NaN.
    start = _initial_positions(experts, n_chains, torch.Generator().manual_seed(4))
    if isinstance(flow, BrokenOutsideBall):
        start = torch.where(start.norm(dim=-1, keepdim=True) > 2.0, 0.0, start)
    result = hmc_sample(experts, n_chains, n_steps, 5, 50.0, torch.Generator().manual_seed(4))
    assert all_finite(result)
    assert result.acceptance == 0.0
    assert result.n_divergent == n_chains * 3 * (n_steps - n_steps // 2)  # kept iterations only
    assert torch.equal(result.draws, start)
    assert torch.allclose(result.mean, start.mean(0), atol=1e-6)


def test_improper_target_flags_escaped_rows():
    # σ² = 4 for both experts: precision 2 * 0.25 - 1 < 0 in row 1 only.
    variances = torch.full((2, 2, 3), 0.5)
    variances[:, 1] = 4.0
    experts = gaussian_experts(torch.zeros(2, 2, 3), variances)
    result = hmc_sample(experts, 50, 40, 5, "auto", torch.Generator().manual_seed(6))
    assert result.escaped.tolist() == [False, True]
    assert torch.isfinite(result.draws).all()


def small_run(seed, **kwargs):
    means, variances = closed_form_case(2)
    experts = gaussian_experts(means, variances)
    return hmc_sample(experts, 50, 20, 3, "auto", torch.Generator().manual_seed(seed), **kwargs)


def test_same_seed_same_output_and_global_rng_untouched():
    global_state = torch.get_rng_state()
    first, second, other = small_run(0), small_run(0), small_run(1)
    for name in ("mean", "draws", "step_size", "acceptance_per_row", "escaped"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.acceptance == second.acceptance and first.n_divergent == second.n_divergent
    assert not torch.equal(first.draws, other.draws)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_chunking_reports_progress_and_keeps_shapes():
    calls = []
    result = small_run(0, max_chain_rows=50, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 3), (1, 3), (2, 3)]
    assert result.draws.shape == (50, 3, 3) and result.step_size.shape == (3,)
    assert torch.equal(small_run(0, max_chain_rows=50).draws, result.draws)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_chains": 0}, "n_chains"),
        ({"n_steps": 1.5}, "n_steps"),
        ({"n_leapfrog": -1}, "n_leapfrog"),
        ({"step_size": "fast"}, "step_size"),
        ({"step_size": -0.1}, "step_size"),
        ({"step_size": float("nan")}, "step_size"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, message):
    means, variances = closed_form_case(2)
    arguments = {"n_chains": 2, "n_steps": 2, "n_leapfrog": 1, "step_size": "auto"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        hmc_sample(gaussian_experts(means, variances), generator=torch.Generator(), **arguments)


def test_mismatched_expert_shapes_are_rejected():
    experts = [
        FlowDistribution(torch.zeros(3, 2), torch.zeros(3, 2), IdentityFlow()),
        FlowDistribution(torch.zeros(4, 2), torch.zeros(4, 2), IdentityFlow()),
    ]
    with pytest.raises(ValueError, match="Expert 1"):
        hmc_sample(experts, 2, 2, 1)
