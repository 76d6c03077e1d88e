"""The JNF networks: joint encoder, decoders, unimodal experts with flows, and the stage losses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._distributions import (
    expert_log_prob,
    gaussian_log_prob,
    reparameterize,
    softclamp,
    std_normal_log_prob,
)
from ._flows import make_flow
from ._likelihoods import Likelihood

__all__ = [
    "mlp", "GaussianHead", "JointEncoder", "Decoder", "JNFModule",
    "stage1_loss", "stage2_loss", "JOINT_MEAN", "JOINT_LOG_VAR",
]


def mlp(in_features: int, widths: Sequence[int]) -> nn.Sequential:
    """Linear → ReLU for each width; ``widths=()`` is the identity."""
    layers, width_in = [], in_features
    for width in widths:
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        width_in = width
    return nn.Sequential(*layers)


def _out_width(in_features: int, widths: Sequence[int]) -> int:
    return widths[-1] if len(widths) else in_features


class GaussianHead(nn.Module):
    """Features → (mean, softclamped log-variance) of a diagonal Gaussian over the latent."""

    def __init__(self, in_features: int, latent_dim: int):
        super().__init__()
        self.mean = nn.Linear(in_features, latent_dim)
        self.log_var = nn.Linear(in_features, latent_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean(h), softclamp(self.log_var(h))


class UnimodalEncoder(nn.Module):
    """e_j: x_j → (mean, log-variance) of the base Gaussian of expert j."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], latent_dim: int):
        super().__init__()
        self.body = _flat(in_features, hidden_sizes)
        self.head = GaussianHead(_out_width(in_features, hidden_sizes), latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(x))


class JointEncoder(nn.Module):
    """q(z | X): one trunk per modality, concatenated, then a joint MLP and Gaussian heads."""

    def __init__(self, trunks: Sequence[nn.Module], trunk_widths: Sequence[int], hidden_sizes: Sequence[int], latent_dim: int):
        super().__init__()
        self.trunks = nn.ModuleList(trunks)
        joint_in = sum(trunk_widths)
        self.body = mlp(joint_in, hidden_sizes)
        self.head = GaussianHead(_out_width(joint_in, hidden_sizes), latent_dim)

    def forward(self, blocks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        h = torch.cat([trunk(x) for trunk, x in zip(self.trunks, blocks)], dim=-1)
        return self.head(self.body(h))


class Decoder(nn.Module):
    """g_m: z (…, D) → natural parameters (…, d_m); linear output, no activation.

    ``widths`` run from the latent outwards (the default model passes ``hidden_sizes`` reversed).
    """

    def __init__(self, latent_dim: int, widths: Sequence[int], out_features: int):
        super().__init__()
        self.body = mlp(latent_dim, widths)
        self.out = nn.Linear(_out_width(latent_dim, widths), out_features)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.body(z))


class SoftclampedEncoder(nn.Module):
    """Wraps a user encoder so its log-variance gets the same smooth bounds as ours."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_var = self.encoder(x)
        return mean, softclamp(log_var)


#: The parts of a modality a user may replace, and the keyword arguments their factory gets.
NETWORK_PARTS = {
    "encoder": "in_shape, latent_dim -> module: x (n, *in_shape) -> (mean, log_var), each (n, latent_dim)",
    "decoder": "latent_dim, out_shape -> module: z (..., latent_dim) -> natural parameters (..., *out_shape)",
    "trunk": "in_shape -> module: x (n, *in_shape) -> features (n, width) for the joint encoder",
}


def build_part(spec, default, label: str, **kwargs) -> nn.Module:
    """A module from a user factory (callable, or (callable, kwargs)) or, if None, ``default()``."""
    if spec is None:
        return default()
    factory, extra = spec if isinstance(spec, tuple) else (spec, {})
    try:
        return factory(**extra, **kwargs)
    except Exception as error:  # a user factory: say which part, and what it was given
        raise ValueError(f"{label}: its factory failed when called with {sorted(kwargs)} ({error!r}).") from error


def _flat(in_features: int, widths: Sequence[int]) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), mlp(in_features, widths))


class JNFModule(nn.Module):
    """All of JNF's networks; modalities are addressed by position in ``names``.

    ``decoder_hidden_sizes`` (from the latent outwards) default to ``hidden_sizes`` reversed.
    ``shapes`` are the per-row shapes of the blocks (``(d,)`` for tabular data); blocks travel
    flat, (n, prod(shape)), and are reshaped for user networks. ``networks`` maps modality names
    to ``{part: factory}`` (see ``NETWORK_PARTS``); ``flows`` gives each modality's flow, a name
    of ``_flows.FLOW_NAMES`` or a factory called with ``latent_dim``.
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[tuple[int, ...]],
        likelihoods: Sequence[Likelihood],
        latent_dim: int,
        hidden_sizes: Sequence[int],
        flows: Sequence,
        n_flow_blocks: int,
        flow_hidden_sizes: Sequence[int],
        networks: dict | None = None,
        decoder_biases: Sequence[Tensor] | None = None,
        decoder_hidden_sizes: Sequence[int] | None = None,
    ):
        super().__init__()
        self.names, self.latent_dim = tuple(names), latent_dim
        if decoder_hidden_sizes is None:
            decoder_hidden_sizes = tuple(reversed(tuple(hidden_sizes)))
        self.likelihoods = nn.ModuleList(likelihoods)
        networks = networks or {}
        # encoders read each modality as its likelihood presents it (categorical codes one-hot)
        self.in_shapes = [
            shape if len(shape) > 1 else tuple(lik.encoder_input(torch.zeros(1, shape[0])).shape[1:])
            for lik, shape in zip(likelihoods, shapes)
        ]
        parts = [networks.get(name, {}) for name in names]
        trunks = [
            build_part(p.get("trunk"), lambda s=s: _flat(math.prod(s), hidden_sizes), f"Modality {n!r}: the trunk", in_shape=s)
            for n, p, s in zip(names, parts, self.in_shapes)
        ]
        with torch.no_grad():  # trunk widths, from a probe
            widths = [trunk(torch.zeros(2, *s)).shape[-1] for trunk, s in zip(trunks, self.in_shapes)]
        self.joint_encoder = JointEncoder(trunks, widths, hidden_sizes, latent_dim)
        out_shapes = [shape if lik.n_outputs == math.prod(shape) else (lik.n_outputs,) for lik, shape in zip(likelihoods, shapes)]
        self.decoders = nn.ModuleList(
            build_part(p.get("decoder"), lambda lik=lik: Decoder(latent_dim, decoder_hidden_sizes, lik.n_outputs),
                       f"Modality {n!r}: the decoder", latent_dim=latent_dim, out_shape=out)
            for n, p, lik, out in zip(names, parts, likelihoods, out_shapes)
        )
        if decoder_biases is not None:
            # Decoders start at the data mean: raw features far from 0 (e.g. around 50) need no
            # thousands of Adam steps just to reach their level.
            with torch.no_grad():
                for decoder, bias in zip(self.decoders, decoder_biases):
                    if isinstance(decoder, Decoder):
                        decoder.out.bias.copy_(bias)
        self.encoders = nn.ModuleList(
            SoftclampedEncoder(build_part(p["encoder"], None, f"Modality {n!r}: the encoder", in_shape=s, latent_dim=latent_dim))
            if p.get("encoder") is not None
            else UnimodalEncoder(math.prod(s), hidden_sizes, latent_dim)
            for n, p, s in zip(names, parts, self.in_shapes)
        )
        self.flows = nn.ModuleList(
            make_flow(flow, latent_dim, n_flow_blocks, flow_hidden_sizes)
            if isinstance(flow, str)
            else build_part(flow, None, f"Modality {n!r}: the flow", latent_dim=latent_dim)
            for n, flow in zip(names, flows)
        )

    # -- the parts each stage trains ------------------------------------------------------
    def joint_parts(self) -> list[nn.Module]:
        """Stage 1: joint encoder, decoders and their (learned) scales."""
        return [self.joint_encoder, self.decoders, self.likelihoods]

    def expert_parts(self) -> list[nn.Module]:
        """Stage 2: unimodal encoders and flows."""
        return [self.encoders, self.flows]

    # -- the paper's objects ----------------------------------------------------------------
    def index(self, name: str) -> int:
        return self.names.index(name)

    def encoder_input(self, j: int, x: Tensor) -> Tensor:
        """A flat block (n, d) as modality j's encoders read it: (n, *in_shape)."""
        x = self.likelihoods[j].encoder_input(x)
        return x.reshape(x.shape[0], *self.in_shapes[j])

    def natural_parameters(self, j: int, z: Tensor) -> Tensor:
        """Decoder j's output at z (…, D), flattened to (…, n_outputs)."""
        return self.decoders[j](z).reshape(*z.shape[:-1], -1)

    def joint_posterior(self, blocks: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z | X); needs every modality."""
        return self.joint_encoder([self.encoder_input(j, blocks[name]) for j, name in enumerate(self.names)])

    def expert_posterior(self, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of expert ``name``'s base Gaussian."""
        j = self.index(name)
        return self.encoders[j](self.encoder_input(j, x))

    def expert_log_prob(self, name: str, z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
        return expert_log_prob(z, mean, log_var, self.flows[self.index(name)])

    def log_likelihood(self, name: str, x: Tensor, z: Tensor) -> Tensor:
        """log p(x_m | z), summed over features; z may carry leading sample dimensions."""
        j = self.index(name)
        return self.likelihoods[j].log_prob(x, self.natural_parameters(j, z))

    def decoder_mean(self, name: str, z: Tensor) -> Tensor:
        j = self.index(name)
        return self.likelihoods[j].mean(self.natural_parameters(j, z))

    def decoder_predict(self, name: str, z: Tensor) -> Tensor:
        """The point prediction of modality ``name`` (categorical: the most probable category)."""
        j = self.index(name)
        return self.likelihoods[j].predict(self.natural_parameters(j, z))

    def decoder_probabilities(self, name: str, z: Tensor) -> Tensor:
        j = self.index(name)
        return self.likelihoods[j].probabilities(self.natural_parameters(j, z))

    def decoder_sample(self, name: str, z: Tensor, generator) -> Tensor:
        j = self.index(name)
        return self.likelihoods[j].sample(self.natural_parameters(j, z), generator)


def stage1_loss(
    module: JNFModule, blocks: dict[str, Tensor], noise: Tensor, rescale: Sequence[float], beta: float
) -> Tensor:
    """Per-row Σ_m r_m·(−log p(x_m | z)) + β·KL(q(z | X) ‖ N(0, I)), z reparameterised from ``noise``."""
    mean, log_var = module.joint_posterior(blocks)
    z = reparameterize(mean, log_var, noise)
    reconstruction = sum(
        -r * module.log_likelihood(name, blocks[name], z) for name, r in zip(module.names, rescale)
    )
    kl = 0.5 * (mean**2 + torch.exp(log_var) - 1.0 - log_var).sum(-1)
    return reconstruction + beta * kl


#: Batch keys under which stage 2 receives the frozen joint posterior, computed once per fit.
JOINT_MEAN, JOINT_LOG_VAR = "__joint_mean__", "__joint_log_var__"


def stage2_loss(module: JNFModule, blocks: dict[str, Tensor], noise: Tensor) -> Tensor:
    """Per-row Σ_j −log q_j(z | x_j), z one draw of the frozen joint posterior.

    The joint posterior's (mean, log-variance) come from ``blocks[JOINT_MEAN]`` and
    ``blocks[JOINT_LOG_VAR]`` when present (the joint part is frozen in stage 2, so they are
    computed once, not every epoch), else from the joint encoder.
    """
    if JOINT_MEAN in blocks:
        mean, log_var = blocks[JOINT_MEAN], blocks[JOINT_LOG_VAR]
    else:
        with torch.no_grad():
            mean, log_var = module.joint_posterior(blocks)
    z = reparameterize(mean, log_var, noise)
    loss = 0.0
    for name in module.names:
        mean, log_var = module.expert_posterior(name, blocks[name])
        loss = loss - module.expert_log_prob(name, z, mean, log_var)
    return loss


def joint_log_weights(module: JNFModule, blocks: dict[str, Tensor], mean: Tensor, log_var: Tensor, noise: Tensor) -> Tensor:
    """log w_k = Σ_m log p(x_m | z_k) + log N(z_k; 0, I) − log q(z_k | X), for noise (K, D) shared by rows."""
    z = reparameterize(mean, log_var, noise[:, None, :])  # (K, n, D)
    log_w = std_normal_log_prob(z) - gaussian_log_prob(z, mean, log_var)
    for name in module.names:
        log_w = log_w + module.log_likelihood(name, blocks[name], z)
    return log_w
