"""Stage 2's experts as one batched network: layers that several experts have in the same shape
run as one batched matrix product over weights stacked from each expert's own parameters.

Each expert keeps its own modules (its state dict, its best-epoch copy, old pickles all
unchanged); only the evaluation is batched. The flows of M experts and of the subset posterior
all read the same draw z, and the default encoders differ only in their first layer. Stacking G
weight matrices costs one copy per layer and step: less than the G - 1 passes it saves for the
flows, and for the encoders on an accelerator, where each launch costs (on the CPU the caller
runs the encoders one by one, ``_modules.stack_encoders``). Custom networks (``networks=``, flow
factories) are evaluated one by one, as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._distributions import softclamp
from ._flows import _REVERSE, AffineCoupling, ComposedFlow, MAFBlock, _MaskedLinear, bounded_log_scale

__all__ = ["flows_at", "expert_bases"]


def _stacked_linear(layers: Sequence[nn.Linear], h: Tensor) -> Tensor:
    """Layer g applied to ``h[g]`` for every g: ``h`` (G, n, in), or (n, in) shared by all layers."""
    weight = torch.stack([layer.weight for layer in layers])
    if isinstance(layers[0], _MaskedLinear):  # the masks of same-shape MADEs are equal
        weight = weight * layers[0].mask
    if h.dim() == 2:
        h = h.expand(len(layers), *h.shape)
    if layers[0].bias is None:
        return torch.bmm(h, weight.transpose(1, 2))
    bias = torch.stack([layer.bias for layer in layers])
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _stacked_sequential(nets: Sequence[nn.Sequential], h: Tensor) -> Tensor:
    """Same-structure stacks of Linear / ReLU (nested Sequentials flattened), all layers at once."""
    layer_lists = [[m for m in net.modules() if isinstance(m, (nn.Linear, nn.ReLU))] for net in nets]
    for layers in zip(*layer_lists):
        h = F.relu(h) if isinstance(layers[0], nn.ReLU) else _stacked_linear(layers, h)
    return h


def _stacked_step(steps: Sequence, z: Tensor) -> tuple[Tensor, Tensor]:
    """One transform of G flows at ``z`` (G, n, D) or shared (n, D): ``(u, log|det du/dz|)``."""
    first = steps[0]
    if first is _REVERSE:
        return first(z)
    if isinstance(first, MAFBlock):
        made = [step.made for step in steps]
        h = z
        for layers in zip(*(m.hidden for m in made)):
            h = F.relu(_stacked_linear(layers, h))
        shift, raw = _stacked_linear([m.output for m in made], h).chunk(2, dim=-1)
        log_scale = bounded_log_scale(raw)
        return (z - shift) * torch.exp(-log_scale), -log_scale.sum(-1)
    # AffineCoupling: the masks of same-shape couplings at the same position are equal
    shift, raw = _stacked_sequential([step.net for step in steps], z * first.mask).chunk(2, dim=-1)
    log_scale = bounded_log_scale(raw) * ~first.mask
    return torch.where(first.mask, z, (z - shift) * torch.exp(-log_scale)), -log_scale.sum(-1)


#: Each flow's signature, computed once: it depends only on the flow's structure and shapes (1.3 %
#: of a digits6 fit went into recomputing it at every step).
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _flow_signature(flow: nn.Module) -> tuple | None:
    """Flows with equal signatures can be stacked; None for a flow that runs on its own (a custom
    flow, or the identity of ``n_flow_blocks=0``, which costs nothing)."""
    if flow not in _SIGNATURES:
        _SIGNATURES[flow] = _signature(flow)
    return _SIGNATURES[flow]


def _signature(flow: nn.Module) -> tuple | None:
    if not isinstance(flow, ComposedFlow) or type(flow).forward is not ComposedFlow.forward:
        return None
    steps = flow.transforms()
    if not all(step is _REVERSE or type(step) in (MAFBlock, AffineCoupling) for step in steps):
        return None
    shapes = tuple((name, tuple(t.shape)) for name, t in [*flow.named_parameters(), *flow.named_buffers()])
    return (type(flow), tuple("reverse" if s is _REVERSE else type(s).__name__ for s in steps), shapes)


def flows_at(flows: Sequence[nn.Module], z: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``[flow(z) for flow in flows]``, each ``(u (n, D), log|det du/dz|)`` — flows of the same
    structure evaluated as one batched pass, the others one by one."""
    groups: dict = {}
    for g, flow in enumerate(flows):
        signature = _flow_signature(flow)
        groups.setdefault(signature if signature is not None else ("alone", g), []).append(g)
    out: list = [None] * len(flows)
    for signature, members in groups.items():
        if len(members) == 1 or signature[0] == "alone":
            for g in members:
                out[g] = flows[g](z)
        else:
            u, log_det = z, z.new_zeros(len(members), *z.shape[:-1])
            for steps in zip(*(flows[g].transforms() for g in members)):
                u, step_log_det = _stacked_step(steps, u)
                log_det = log_det + step_log_det
            u = u.expand(len(members), *z.shape)  # a flow of reversals only leaves u shared
            for i, g in enumerate(members):
                out[g] = (u[i], log_det[i])
    return out


def expert_bases(
    encoders: Sequence[nn.Module], inputs: Sequence[Tensor], default: Sequence[bool]
) -> list[tuple[Tensor, Tensor]]:
    """``[encoder(x) for encoder, x in zip(encoders, inputs)]``: the base Gaussians (mean, log-var).

    The encoders marked ``default`` (``UnimodalEncoder``: an MLP body, a Gaussian head and a linear
    path) run their first layer (width d_j -> h) one by one, then every later layer and the heads
    as one batched pass; the others run on their own.
    """
    stacked = [
        j
        for j, encoder in enumerate(encoders)
        if default[j] and any(isinstance(m, nn.Linear) for m in encoder.body.modules())
    ]
    if len(stacked) < 2:
        return [encoder(x) for encoder, x in zip(encoders, inputs)]
    out: list = [None] * len(encoders)
    for j, (encoder, x) in enumerate(zip(encoders, inputs)):
        if j not in stacked:
            out[j] = encoder(x)
    layer_lists = [[m for m in encoders[j].body.modules() if isinstance(m, (nn.Linear, nn.ReLU))] for j in stacked]
    flat = [inputs[j].flatten(1) for j in stacked]
    h = torch.stack([F.relu(layers[0](x)) for layers, x in zip(layer_lists, flat)])
    for layers in list(zip(*layer_lists))[2:]:  # after the first Linear and its ReLU
        h = F.relu(h) if isinstance(layers[0], nn.ReLU) else _stacked_linear(layers, h)
    heads = [encoders[j].head for j in stacked]
    mean = _stacked_linear([head.mean for head in heads], h)
    log_var = softclamp(_stacked_linear([head.log_var for head in heads], h))
    for i, j in enumerate(stacked):
        linear = F.linear(flat[i], encoders[j].linear_weight, encoders[j].linear_bias)
        out[j] = (mean[i] + linear, log_var[i])
    return out
