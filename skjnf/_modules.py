"""The JNF networks: joint encoder, decoders, unimodal experts with flows, and the stage losses."""

from __future__ import annotations

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

__all__ = ["mlp", "GaussianHead", "JointEncoder", "Decoder", "JNFModule", "stage1_loss", "stage2_loss"]


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
        self.body = mlp(in_features, hidden_sizes)
        self.head = GaussianHead(_out_width(in_features, hidden_sizes), latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(x))


class JointEncoder(nn.Module):
    """q(z | X): one trunk per modality, concatenated, then a joint MLP and Gaussian heads."""

    def __init__(self, dims: Sequence[int], hidden_sizes: Sequence[int], latent_dim: int):
        super().__init__()
        self.trunks = nn.ModuleList(mlp(d, hidden_sizes) for d in dims)
        joint_in = sum(_out_width(d, hidden_sizes) for d in dims)
        self.body = mlp(joint_in, hidden_sizes)
        self.head = GaussianHead(_out_width(joint_in, hidden_sizes), latent_dim)

    def forward(self, blocks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        h = torch.cat([trunk(x) for trunk, x in zip(self.trunks, blocks)], dim=-1)
        return self.head(self.body(h))


class Decoder(nn.Module):
    """g_m: z (…, D) → natural parameters (…, d_m); linear output, no activation."""

    def __init__(self, latent_dim: int, hidden_sizes: Sequence[int], out_features: int):
        super().__init__()
        widths = tuple(reversed(tuple(hidden_sizes)))
        self.body = mlp(latent_dim, widths)
        self.out = nn.Linear(_out_width(latent_dim, widths), out_features)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.body(z))


class JNFModule(nn.Module):
    """All of JNF's networks; modalities are addressed by position in ``names``."""

    def __init__(
        self,
        names: Sequence[str],
        dims: Sequence[int],
        likelihoods: Sequence[Likelihood],
        latent_dim: int,
        hidden_sizes: Sequence[int],
        flow: str,
        n_flow_blocks: int,
        flow_hidden_sizes: Sequence[int],
        decoder_biases: Sequence[Tensor] | None = None,
    ):
        super().__init__()
        self.names = tuple(names)
        self.latent_dim = latent_dim
        self.likelihoods = nn.ModuleList(likelihoods)
        # encoders read each modality as its likelihood presents it (categorical codes one-hot)
        in_dims = [lik.encoder_input(torch.zeros(1, d)).shape[-1] for lik, d in zip(likelihoods, dims)]
        self.joint_encoder = JointEncoder(in_dims, hidden_sizes, latent_dim)
        self.decoders = nn.ModuleList(Decoder(latent_dim, hidden_sizes, lik.n_outputs) for lik in likelihoods)
        if decoder_biases is not None:
            # Decoders start at the data mean: raw features far from 0 (e.g. around 50) need no
            # thousands of Adam steps just to reach their level.
            with torch.no_grad():
                for decoder, bias in zip(self.decoders, decoder_biases):
                    decoder.out.bias.copy_(bias)
        self.encoders = nn.ModuleList(UnimodalEncoder(d, hidden_sizes, latent_dim) for d in in_dims)
        self.flows = nn.ModuleList(
            make_flow(flow, latent_dim, n_flow_blocks, flow_hidden_sizes) for _ in dims
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

    def joint_posterior(self, blocks: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z | X); needs every modality."""
        return self.joint_encoder([lik.encoder_input(blocks[name]) for name, lik in zip(self.names, self.likelihoods)])

    def expert_posterior(self, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of expert ``name``'s base Gaussian."""
        j = self.index(name)
        return self.encoders[j](self.likelihoods[j].encoder_input(x))

    def expert_log_prob(self, name: str, z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
        return expert_log_prob(z, mean, log_var, self.flows[self.index(name)])

    def decode(self, name: str, z: Tensor) -> Tensor:
        return self.decoders[self.index(name)](z)

    def log_likelihood(self, name: str, x: Tensor, z: Tensor) -> Tensor:
        """log p(x_m | z), summed over features; z may carry leading sample dimensions."""
        j = self.index(name)
        return self.likelihoods[j].log_prob(x, self.decoders[j](z))

    def decoder_mean(self, name: str, z: Tensor) -> Tensor:
        j = self.index(name)
        return self.likelihoods[j].mean(self.decoders[j](z))

    def decoder_predict(self, name: str, z: Tensor) -> Tensor:
        """The point prediction of modality ``name`` (categorical: the most probable category)."""
        j = self.index(name)
        return self.likelihoods[j].predict(self.decoders[j](z))

    def decoder_probabilities(self, name: str, z: Tensor) -> Tensor:
        j = self.index(name)
        return self.likelihoods[j].probabilities(self.decoders[j](z))

    def decoder_sample(self, name: str, z: Tensor, generator) -> Tensor:
        j = self.index(name)
        return self.likelihoods[j].sample(self.decoders[j](z), generator)


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


def stage2_loss(module: JNFModule, blocks: dict[str, Tensor], noise: Tensor) -> Tensor:
    """Per-row Σ_j −log q_j(z | x_j), z one draw of the frozen joint posterior."""
    with torch.no_grad():
        z = reparameterize(*module.joint_posterior(blocks), noise)
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
