"""Stage 2 batched (stacked same-shape layers) equals stage 2 network by network: losses and gradients."""

import pytest
import torch
from torch import nn

import skjnf._modules as modules
from skjnf._batch import StageBatch
from skjnf._flows import MAF, _randomize_
from skjnf._likelihoods import Normal
from skjnf._modules import JNFModule, stage2_noise_dim, stage2_terms
from skjnf._stacked import expert_bases, flows_at

WIDTHS = (3, 5, 2, 4)


class _Encoder(nn.Module):  # a custom expert encoder: runs on its own beside the stacked ones
    def __init__(self, in_shape, latent_dim):
        super().__init__()
        self.net = nn.Linear(in_shape[0], 2 * latent_dim)

    def forward(self, x):
        return self.net(x).chunk(2, dim=-1)


def _module(flows, networks=None, seed=0):
    torch.manual_seed(seed)
    likelihoods = [Normal(torch.full((d,), 0.5), learn=False) for d in WIDTHS]
    names = ["a", "b", "c", "d"]
    module = JNFModule(names, [(d,) for d in WIDTHS], likelihoods, 3, (6, 7), flows, 2, (5, 4), networks=networks)
    generator = torch.Generator().manual_seed(seed)
    for flow in [*module.flows, module.subset_flow]:
        _randomize_(flow, scale=0.5, generator=generator)  # non-trivial, and different per expert
    with torch.no_grad():
        for encoder in module.encoders:  # non-zero linear paths (fit sets them before stage 2)
            if hasattr(encoder, "linear_weight"):
                encoder.linear_weight.normal_(0, 0.3, generator=generator)
                encoder.linear_bias.normal_(0, 0.3, generator=generator)
    return module.double()


def _terms_and_grads(module, blocks, noise, observed, batched):
    module.zero_grad()
    experts, subset = stage2_terms(module, StageBatch(blocks, observed), noise, batched=batched)
    losses = [*experts.values(), subset]
    sum(loss.sum() for loss in losses).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return [loss.detach() for loss in losses], grads


@pytest.mark.parametrize(
    "flows, networks",
    [
        (["maf"] * 4, None),
        (["realnvp"] * 4, None),
        (["maf", "realnvp", "maf", lambda latent_dim: MAF(latent_dim, 1, (8,))], {"b": {"encoder": _Encoder}}),
    ],
    ids=["maf", "realnvp", "mixed-and-custom"],
)
@pytest.mark.parametrize("incomplete", [False, True])
def test_batched_stage2_equals_the_sequential_one(flows, networks, incomplete, monkeypatch):
    """Catches a stacked layer reading another expert's weights, a mask left out, a bias dropped,
    a reversal skipped, or a custom network forced into the stack."""
    monkeypatch.setattr(modules, "STACK_ENCODERS_ON_CPU", True)  # the accelerators' path, here
    module = _module(flows, networks)
    g = torch.Generator().manual_seed(1)
    n = 9
    blocks = {name: torch.randn(n, d, generator=g, dtype=torch.float64) for name, d in zip("abcd", WIDTHS)}
    noise = torch.randn(n, stage2_noise_dim(module), generator=g, dtype=torch.float64)
    observed = torch.rand(n, 4, generator=g) < 0.7 if incomplete else None
    batched = _terms_and_grads(module, blocks, noise, observed, batched=True)
    sequential = _terms_and_grads(module, blocks, noise, observed, batched=False)
    for a, b in zip(batched[0], sequential[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert batched[1].keys() == sequential[1].keys()
    stage2 = [name for name, _ in module.named_parameters() if name.startswith(("encoders", "flows", "subset"))]
    assert set(stage2) <= batched[1].keys()  # every expert parameter gets its gradient
    for name in batched[1]:
        torch.testing.assert_close(batched[1][name], sequential[1][name], rtol=1e-10, atol=1e-10)


def test_stacked_parts_are_each_experts_own_network():
    """Each output of the stacked pass is its own expert's: swapping two experts' weights swaps them."""
    module = _module(["maf"] * 4)
    z = torch.randn(6, 3, dtype=torch.float64)
    flows = list(module.flows)
    out = flows_at(flows, z)
    for flow, (u, log_det) in zip(flows, out):
        expected = flow(z)
        torch.testing.assert_close(u, expected[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_det, expected[1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[0][0], out[1][0])  # the experts' flows differ
    inputs = [torch.randn(6, d, dtype=torch.float64) for d in WIDTHS]
    bases = expert_bases(module.encoders, inputs, [True] * 4)
    for encoder, x, (mean, log_var) in zip(module.encoders, inputs, bases):
        torch.testing.assert_close(mean, encoder(x)[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_var, encoder(x)[1], rtol=1e-12, atol=1e-12)
