"""Flow properties (docs/algorithm.md §7, items 1-3): log-dets, invertibility, autoregression."""

import itertools
import warnings

import pytest
import torch
from torch.func import jacrev, vmap

from skjnf._flows import (
    LOG_SCALE_BOUND,
    MADE,
    MAF,
    AffineCoupling,
    IdentityFlow,
    MAFBlock,
    RealNVP,
    _randomize_,
    bounded_log_scale,
    make_flow,
)

HIDDEN = (16, 16)
WIDE = (32, 32)  # enough units per degree that no dependency of a D = 12 MADE dies with ReLU
GRID = list(itertools.product(("maf", "realnvp"), (1, 2, 5), (1, 2, 3)))


def _random_flow(name, latent_dim, n_blocks, dtype=torch.float64, scale=1.0, seed=0):
    """A flow with random weights (the identity init would make every test vacuous)."""
    flow = make_flow(name, latent_dim, n_blocks, HIDDEN).to(dtype)
    return _randomize_(flow, scale=scale, generator=torch.Generator().manual_seed(seed))


def _points(latent_dim, dtype=torch.float64, seed=1, n=16, large=8.0):
    """``n`` standard normal points, a quarter of them scaled by ``large``."""
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z[: n // 4] *= large
    return z.to(dtype)


def _largest_bound_effect(flow, z):
    """max |raw - A tanh(raw / A)| over every block's log-scales while ``flow(z)`` runs."""
    raw_log_scales = []
    if isinstance(flow, MAF):
        modules = [block.made for block in flow.blocks]
        grab = lambda output: output[1]  # noqa: E731
    else:
        modules = [layer.net for layer in flow.layers]
        grab = lambda output: output.chunk(2, dim=-1)[1]  # noqa: E731
    handles = [m.register_forward_hook(lambda m, i, o: raw_log_scales.append(grab(o))) for m in modules]
    try:
        flow(z)
    finally:
        for handle in handles:
            handle.remove()
    return max((raw - bounded_log_scale(raw)).abs().max().item() for raw in raw_log_scales)


def _output_layers(flow):
    """The layers zeroed by the identity init."""
    if isinstance(flow, MAF):
        return [block.made.output for block in flow.blocks]
    return [layer.net[-1] for layer in flow.layers]


def _jacobian(function, z):
    return vmap(jacrev(function))(z)


# --- 1. log-det = autograd -----------------------------------------------------------------


@pytest.mark.parametrize("name, latent_dim, n_blocks", GRID)
def test_log_det_matches_autograd_jacobian(name, latent_dim, n_blocks):
    flow = _random_flow(name, latent_dim, n_blocks)
    z = _points(latent_dim)
    u, log_det = flow(z)
    assert log_det.shape == (16,)

    jacobian = _jacobian(lambda x: flow(x)[0], z)
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert torch.all(sign != 0)
    torch.testing.assert_close(log_det, log_abs_det, rtol=0, atol=1e-8)

    z_back, inverse_log_det = flow.inverse(u)
    torch.testing.assert_close(inverse_log_det, -log_det, rtol=0, atol=1e-8)

    # the flow is not trivial and the tanh bound visibly changes some log-scales
    assert log_det.abs().max() > 1e-3
    if latent_dim >= 2:
        assert _largest_bound_effect(flow, z) > 0.1


@pytest.mark.parametrize("name", ["maf", "realnvp"])
def test_inverse_is_differentiable_and_its_jacobian_inverts_the_forward_one(name):
    flow = _random_flow(name, 3, 2)
    u = _points(3, large=3.0)
    z, log_det = flow.inverse(u)
    inverse_jacobian = _jacobian(lambda x: flow.inverse(x)[0], u)
    forward_jacobian = _jacobian(lambda x: flow(x)[0], z)
    torch.testing.assert_close(inverse_jacobian, torch.linalg.inv(forward_jacobian), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(inverse_jacobian)[1], rtol=0, atol=1e-8)


def test_bounded_log_scale_is_a_smooth_tanh():
    raw = torch.tensor([-50.0, -3.0, 0.0, 0.5, 3.0, 50.0], dtype=torch.float64, requires_grad=True)
    bounded = bounded_log_scale(raw)
    torch.testing.assert_close(bounded, LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND))
    (gradient,) = torch.autograd.grad(bounded.sum(), raw)
    assert torch.all(gradient[1:-1] > 0.4)  # no dead gradient inside or at the bound


# --- 2. invertibility -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tolerance, scale, large", [(torch.float64, 1e-8, 1.0, 8.0), (torch.float32, 1e-4, 0.7, 2.0)]
)
@pytest.mark.parametrize("name, latent_dim, n_blocks", GRID)
def test_invertibility(name, latent_dim, n_blocks, dtype, tolerance, scale, large):
    # A float32 round trip loses ~1e-7 of the largest intermediate value: milder weights and
    # points keep intermediates below ~100 (scale 1 reaches 1e3-1e5 for realnvp with D=5, K=3).
    flow = _random_flow(name, latent_dim, n_blocks, dtype=dtype, scale=scale)
    with torch.no_grad():
        z = _points(latent_dim, dtype=dtype, large=large)
        assert (flow.inverse(flow(z)[0])[0] - z).abs().max() < tolerance
        u = _points(latent_dim, dtype=dtype, seed=2, large=large)
        assert (flow(flow.inverse(u)[0])[0] - u).abs().max() < tolerance


# --- 3. MADE autoregressive property -------------------------------------------------------


def _made_jacobians(made, latent_dim):
    z = torch.randn(64, latent_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    jac_shift = _jacobian(lambda x: made(x)[0], z)
    jac_log_scale = _jacobian(lambda x: made(x)[1], z)
    return jac_shift, jac_log_scale


@pytest.mark.parametrize("latent_dim, hidden", [(1, WIDE), (2, WIDE), (5, WIDE), (12, WIDE), (12, (8, 8))])
def test_made_is_autoregressive(latent_dim, hidden):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = MADE(latent_dim, hidden)
    narrow = min(hidden) < latent_dim - 1
    assert any(issubclass(w.category, UserWarning) for w in caught) == narrow

    _randomize_(made.double(), generator=torch.Generator().manual_seed(4))
    strictly_lower = torch.ones(latent_dim, latent_dim).tril(-1).bool()
    for jacobian in _made_jacobians(made, latent_dim):
        # out_d may read in_k only for k < d: exactly zero elsewhere, at every point
        assert torch.all(jacobian[:, ~strictly_lower] == 0)
        reached = (jacobian != 0).any(dim=0)
        if latent_dim >= 2:
            assert reached[strictly_lower].any()
        if not narrow:
            # every allowed dependency is realised somewhere (masks are not over-restrictive)
            assert torch.all(reached[strictly_lower])


@pytest.mark.parametrize("latent_dim, hidden", [(1, (8,)), (2, (8, 8)), (5, ()), (5, (16, 16)), (12, (8, 8))])
def test_made_conditional_matches_forward(latent_dim, hidden):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = _randomize_(MADE(latent_dim, hidden).double(), generator=torch.Generator().manual_seed(8))
    z = torch.randn(2, 9, latent_dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    shift, raw = made(z)
    for d in range(latent_dim):
        shift_d, raw_d = made.conditional(z[..., :d])
        torch.testing.assert_close(shift_d, shift[..., d], rtol=0, atol=1e-12)
        torch.testing.assert_close(raw_d, raw[..., d], rtol=0, atol=1e-12)


@pytest.mark.parametrize("latent_dim, hidden", [(1, (8,)), (2, (8, 8)), (5, ()), (5, (16, 16)), (12, (8, 8))])
def test_maf_block_inverse_without_gradients_equals_the_differentiable_one(latent_dim, hidden):
    """Catches a unit of MADE.autoregress computed from inputs not yet final, a degree group
    skipped or written to the wrong units, or an output read from the wrong prefix: the cached
    inference inverse (no gradients) gives the same z and log-det as the differentiable one,
    narrow widths (empty degree groups) and no hidden layer included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = MAFBlock(latent_dim, hidden, identity_init=False).double()
    _randomize_(block, generator=torch.Generator().manual_seed(10))
    u = torch.randn(3, 7, latent_dim, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    z, log_det = block.inverse(u)
    with torch.no_grad():
        z_cached, log_det_cached = block.inverse(u)
    torch.testing.assert_close(z_cached, z.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det_cached, log_det.detach(), rtol=0, atol=1e-12)


def test_made_warning_names_the_widths():
    with pytest.warns(UserWarning, match=r"\[8\].*latent_dim - 1 = 11"):
        MADE(12, (32, 8))


def test_maf_block_jacobian_is_lower_triangular():
    block = _randomize_(MAFBlock(5, HIDDEN).double(), generator=torch.Generator().manual_seed(5))
    z = _points(5)
    jacobian = _jacobian(lambda x: block(x)[0], z)
    upper = torch.ones(5, 5).triu(1).bool()
    assert torch.all(jacobian[:, upper] == 0)
    assert (jacobian[:, ~upper] != 0).any()
    _, raw = block.made(z)
    torch.testing.assert_close(
        torch.diagonal(jacobian, dim1=-2, dim2=-1), torch.exp(-bounded_log_scale(raw)), rtol=0, atol=1e-12
    )


def test_coupling_layer_keeps_masked_coordinates_and_is_triangular():
    layer = AffineCoupling(torch.arange(5) % 2 == 1, HIDDEN).double()
    _randomize_(layer, generator=torch.Generator().manual_seed(7))
    z = _points(5)
    u, _ = layer(z)
    kept = layer.mask
    assert torch.equal(u[:, kept], z[:, kept])
    assert torch.all(u[:, ~kept] != z[:, ~kept])
    jacobian = _jacobian(lambda x: layer(x)[0], z)
    changed = torch.nonzero(~kept).flatten()
    # a transformed coordinate reads the kept ones and itself, never another transformed one
    block = jacobian[:, changed][:, :, changed]
    assert torch.all(block * (1 - torch.eye(len(changed), dtype=block.dtype)) == 0)
    assert torch.all(jacobian[:, changed][:, :, kept] != 0)


@pytest.mark.parametrize("name", ["maf", "realnvp"])
@pytest.mark.parametrize("latent_dim", [2, 5])
def test_one_block_transforms_every_coordinate(name, latent_dim):
    flow = _random_flow(name, latent_dim, 1)
    z = _points(latent_dim)
    jacobian = _jacobian(lambda x: flow(x)[0], z)
    identity = torch.eye(latent_dim, dtype=z.dtype)
    # every output row differs from the identity's row somewhere
    assert torch.all((jacobian - identity).abs().amax(dim=(0, 2)) > 1e-6)


@pytest.mark.parametrize("name, latent_dim, n_blocks", [("maf", 3, 2), ("realnvp", 3, 2), ("maf", 1, 3)])
def test_log_scale_is_soft_bounded(name, latent_dim, n_blocks):
    flow = make_flow(name, latent_dim, n_blocks, HIDDEN).double()
    with torch.no_grad():
        for layer in _output_layers(flow):
            layer.bias[latent_dim:] = 1e3  # raw log-scales far beyond the bound
    z = _points(latent_dim)
    u, log_det = flow(z)
    transformed = latent_dim * n_blocks  # RealNVP transforms each coordinate once per block
    expected = torch.full_like(log_det, -LOG_SCALE_BOUND * transformed)
    torch.testing.assert_close(log_det, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(flow.inverse(u)[0], z, rtol=0, atol=1e-8)


# --- initialisation, shapes, factory -------------------------------------------------------


@pytest.mark.parametrize("name, latent_dim, n_blocks", GRID)
def test_identity_init_is_exactly_the_identity(name, latent_dim, n_blocks):
    flow = make_flow(name, latent_dim, n_blocks, HIDDEN)
    z = _points(latent_dim, dtype=torch.float32)
    u, log_det = flow(z)
    assert torch.equal(u, z)
    assert torch.equal(log_det, torch.zeros(16))
    z_back, inverse_log_det = flow.inverse(z)
    assert torch.equal(z_back, z)
    assert torch.equal(inverse_log_det, torch.zeros(16))


@pytest.mark.parametrize("name", ["maf", "realnvp"])
def test_identity_init_still_receives_gradients(name):
    flow = make_flow(name, 3, 2, HIDDEN)
    u, log_det = flow(_points(3, dtype=torch.float32))
    (u.pow(2).sum() + log_det.sum()).backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in _output_layers(flow))


@pytest.mark.parametrize("name", ["maf", "realnvp"])
def test_leading_shape(name):
    flow = _random_flow(name, 4, 2)
    z = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    u, log_det = flow(z)
    assert u.shape == (3, 7, 4) and log_det.shape == (3, 7)
    flat_u, flat_log_det = flow(z.reshape(-1, 4))
    torch.testing.assert_close(u.reshape(-1, 4), flat_u, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det.reshape(-1), flat_log_det, rtol=0, atol=1e-12)
    z_back, inverse_log_det = flow.inverse(u)
    assert z_back.shape == (3, 7, 4) and inverse_log_det.shape == (3, 7)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", ["maf", "realnvp"])
def test_one_dimensional_latent_is_a_constant_affine_map(name):
    flow = _random_flow(name, 1, 2)
    z = torch.linspace(-5, 5, 11, dtype=torch.float64)[:, None]
    u, log_det = flow(z)
    slope = torch.diff(u[:, 0]) / torch.diff(z[:, 0])
    torch.testing.assert_close(slope, slope[:1].expand_as(slope), rtol=1e-10, atol=0)
    torch.testing.assert_close(log_det, log_det[:1].expand_as(log_det), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det[0], torch.log(slope[0].abs()), rtol=0, atol=1e-10)


def test_flows_follow_input_dtype():
    for flow in (_random_flow("maf", 3, 2, torch.float32), _random_flow("realnvp", 3, 2, torch.float32)):
        u, log_det = flow(torch.randn(4, 3))
        assert u.dtype == log_det.dtype == torch.float32
    u, log_det = IdentityFlow()(torch.randn(4, 3, dtype=torch.float64))
    assert log_det.dtype == torch.float64 and log_det.shape == (4,)


def test_make_flow_families_and_errors():
    assert isinstance(make_flow("maf", 3, 2, HIDDEN), MAF)
    assert isinstance(make_flow("realnvp", 3, 2, HIDDEN), RealNVP)
    assert isinstance(make_flow("maf", 3, 0, HIDDEN), IdentityFlow)
    assert isinstance(make_flow("realnvp", 3, 0, HIDDEN), IdentityFlow)
    with pytest.raises(ValueError, match=r"'glow'.*'maf', 'realnvp'"):
        make_flow("glow", 3, 2, HIDDEN)
    with pytest.raises(ValueError, match="blocks"):
        make_flow("maf", 3, -1, HIDDEN)
    with pytest.raises(ValueError, match="latent_dim"):
        make_flow("maf", 0, 2, HIDDEN)
    with pytest.raises(ValueError, match="hidden sizes"):
        make_flow("realnvp", 3, 2, (16, 0))


def test_identity_flow():
    z = torch.randn(2, 5, 3)
    for direction in (IdentityFlow().forward, IdentityFlow().inverse):
        out, log_det = direction(z)
        assert torch.equal(out, z) and torch.equal(log_det, torch.zeros(2, 5))


def test_flow_distribution_draws_and_density_are_the_pushforward_of_its_base():
    """Catches a FlowDistribution drawing with the variance as scale, or its density missing the
    flow's log-determinant: through an affine flow z = (u - b) / s its draws have mean (μ - b) / s
    and standard deviation σ / s, and log q(z) = log N(u; μ, σ²) + Σ log s."""
    from skjnf._distributions import FlowDistribution, gaussian_log_prob

    class Affine(torch.nn.Module):  # u = s z + b
        s, b = torch.tensor([2.0, 1.5], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)

        def forward(self, z):
            return self.s * z + self.b, torch.log(self.s).sum().expand(z.shape[:-1])

        def inverse(self, u):
            return (u - self.b) / self.s, -torch.log(self.s).sum().expand(u.shape[:-1])

    loc = torch.tensor([[0.0, 3.0], [1.0, -2.0]], dtype=torch.float64)
    log_var = torch.log(torch.tensor([[4.0, 1.0], [0.25, 9.0]], dtype=torch.float64))
    flow = Affine()
    q = FlowDistribution(loc, log_var, flow)
    draws = q.sample(200_000, torch.Generator().manual_seed(0))
    sd = torch.exp(0.5 * log_var) / flow.s
    se = sd / len(draws) ** 0.5  # of the mean; the standard deviation's is se / sqrt(2)
    assert ((draws.mean(0) - (loc - flow.b) / flow.s).abs() < 5 * se).all()
    assert ((draws.std(0) - sd).abs() < 5 * se).all()
    z = draws[:5]
    expected = gaussian_log_prob(flow.s * z + flow.b, loc, log_var) + torch.log(flow.s).sum()
    torch.testing.assert_close(q.log_prob(z), expected)
    torch.testing.assert_close(q.rsample_and_log_prob(torch.randn(3, 1, 2, dtype=torch.float64))[1].shape, (3, 2))
    torch.testing.assert_close(q.rows(slice(1, 2)).loc, loc[1:2])
