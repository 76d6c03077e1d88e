"""The Gaussian product of linearised experts: closed forms, and where fit chooses it."""

import copy
import pickle

import numpy as np
import torch
from _helpers import own_posteriors_misplaced

from skjnf._distributions import FlowDistribution
from skjnf._flows import MAF, _randomize_
from skjnf._gaussian_product import GaussianProduct, flow_jacobian, linearized_expert


class AffineFlow(torch.nn.Module):
    """u = A z + b: the pushforward of a Gaussian base through f⁻¹ is exactly Gaussian."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = A, b

    def forward(self, z):
        return z @ self.A.T + self.b, torch.linalg.slogdet(self.A)[1].expand(len(z))

    def inverse(self, u):
        return torch.linalg.solve(self.A, (u - self.b).T).T, -torch.linalg.slogdet(self.A)[1].expand(len(u))


def _random_gaussian_expert(generator, dim=3, n=4):
    """An affine flow and a base (μ, log σ²) of n rows, narrow enough that no eigenvalue is raised."""
    A = torch.randn(dim, dim, generator=generator, dtype=torch.float64) + 2 * torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=generator, dtype=torch.float64)
    mean = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    log_var = torch.empty(n, dim, dtype=torch.float64).uniform_(-5, -3, generator=generator)
    return AffineFlow(A, b), (mean, log_var)


def _exact_moments(flow, base):
    """Mean (n, D) and covariance (n, D, D) of z = A⁻¹(u − b), u ~ N(μ, diag σ²)."""
    A_inv = torch.linalg.inv(flow.A)
    mean = (base[0] - flow.b) @ A_inv.T
    return mean, A_inv @ torch.diag_embed(base[1].exp()) @ A_inv.T


def test_flow_jacobian_is_autograds_row_by_row():
    flow = _randomize_(MAF(3, 2, (8,)).double(), generator=torch.Generator().manual_seed(0))
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.stack([torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], row) for row in z])
    torch.testing.assert_close(flow_jacobian(flow, z), expected)


def test_linearised_affine_expert_is_its_exact_gaussian_in_whitened_coordinates():
    g = torch.Generator().manual_seed(0)
    flow, base = _random_gaussian_expert(g)
    tril = torch.linalg.cholesky(torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=torch.float64))
    centre = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)
    mean, covariance = _exact_moments(flow, base)
    y, precision = linearized_expert(FlowDistribution(*base, flow), tril, centre)
    torch.testing.assert_close(y, torch.linalg.solve(tril, (mean - centre).T).T)
    torch.testing.assert_close(precision, tril.T @ torch.linalg.inv(covariance) @ tril)


def test_no_direction_of_a_linearised_expert_is_wider_than_the_aggregate():
    identity = AffineFlow(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    base = (torch.zeros(1, 2, dtype=torch.float64), torch.log(torch.tensor([[4.0, 0.25]], dtype=torch.float64)))
    eye, zero = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    _, precision = linearized_expert(FlowDistribution(*base, identity), eye, zero)
    torch.testing.assert_close(precision[0], torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)))


def test_product_of_gaussian_experts_is_the_closed_form_divided_by_the_aggregate():
    """Π_j N(m_j, S_j) / N(m₀, S₀)^{s−1}: precision Σ S_j⁻¹ − (s−1) S₀⁻¹, information likewise.
    With exact experts p(z | x_j) and the prior as aggregate this is p(z | x_S) of a linear-Gaussian model."""
    g = torch.Generator().manual_seed(2)
    tril = torch.linalg.cholesky(torch.tensor([[3.0, 0.5, 0.1], [0.5, 2.0, 0.0], [0.1, 0.0, 1.5]], dtype=torch.float64))
    centre = torch.tensor([0.3, 0.0, -0.4], dtype=torch.float64)
    experts = [_random_gaussian_expert(g) for _ in range(3)]
    product = GaussianProduct(
        [linearized_expert(FlowDistribution(*b, f), tril, centre) for f, b in experts], tril, centre
    )
    moments = [_exact_moments(f, b) for f, b in experts]
    aggregate_precision = torch.linalg.inv(tril @ tril.T)
    precision = sum(torch.linalg.inv(S) for _, S in moments) - 2 * aggregate_precision
    information = sum(torch.linalg.solve(S, m[..., None]) for m, S in moments)
    information = information - 2 * (aggregate_precision @ centre)[:, None]
    mean = torch.linalg.solve(precision, information)[..., 0]
    torch.testing.assert_close(product.mean(), mean)
    noise = torch.randn(50, 4, 3, generator=g, dtype=torch.float64)
    offset = product.sample(noise) - mean  # C⁻ᵀ ε with Λ = C Cᵀ: its Λ-norm is |ε|, draw by draw
    torch.testing.assert_close(torch.einsum("kni,nij,knj->kn", offset, precision, offset), (noise**2).sum(-1))


def test_fit_uses_the_product_where_it_predicts_held_out_rows_better_than_the_subset_flow(fitted, views, monkeypatch):
    from skjnf._posteriors import ProductPosterior
    from skjnf._routing import choose_target_routes

    X, _, _ = views
    est = copy.deepcopy(fitted)
    module = est.module_.eval()
    blocks = {m: torch.as_tensor(X[m], dtype=torch.float32) for m in module.names}
    module.subset_routes.copy_(torch.arange(8))
    own_posteriors_misplaced(module, flow=True, product=False, monkeypatch=monkeypatch)
    choose_target_routes(module, blocks, None, 8, 0)
    pairs = (["a", "b"], ["a", "c"], ["b", "c"])
    assert all(module.subset_products[module.bitmask(pair)] for pair in pairs)
    for pair in pairs:
        with torch.no_grad():
            expected = ProductPosterior(module, blocks, pair, len(X["a"])).mean(8, None).numpy()
        np.testing.assert_allclose(est.transform(X, cond_mod=pair), expected, rtol=1e-5, atol=1e-6)
    loaded = pickle.loads(pickle.dumps(est))  # the choice is part of the saved model
    np.testing.assert_array_equal(loaded.transform(X, cond_mod=pairs[0]), est.transform(X, cond_mod=pairs[0]))
    monkeypatch.undo()
    est = copy.deepcopy(fitted)
    module = est.module_.eval()
    module.subset_routes.copy_(torch.arange(8))
    own_posteriors_misplaced(module, flow=False, product=True, monkeypatch=monkeypatch)
    choose_target_routes(module, blocks, None, 8, 0)
    assert not module.subset_products.any()
