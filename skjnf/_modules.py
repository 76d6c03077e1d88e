"""The JNF networks: joint encoder, decoders, unimodal experts with flows, and the stage losses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._batch import StageBatch
from ._distributions import (
    FlowDistribution,
    gaussian_log_prob,
    reparameterize,
    softclamp,
    std_normal_log_prob,
)
from ._flows import make_flow
from ._layers import mlp
from ._likelihoods import Decoded, Likelihood
from ._stacked import expert_bases, flows_at

__all__ = [
    "GaussianHead",
    "UnimodalEncoder",
    "JointEncoder",
    "Decoder",
    "SubsetEncoder",
    "JNFModule",
    "stage1_loss",
    "stage2_loss",
    "stage2_terms",
    "stage2_noise_dim",
    "stage2_row_counts",
    "stage2_expert_rows",
    "random_subset_masks",
    "TRUNK_CACHE_BYTES",
    "frozen_inference",
]


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
    """e_j: x_j → (mean, log-variance) of the base Gaussian of expert j.

    The mean is an MLP's output plus a linear path, ``linear_weight @ x + linear_bias``: fixed
    buffers that ``fit`` sets in closed form before stage 2 (a ridge regression of the joint
    posterior means on x_j, :func:`~skjnf._fitting.set_linear_paths`), zero until then. The MLP learns what the
    linear map leaves, and weight decay pulls it towards that linear map rather than towards a
    constant. Gradient steps alone did not find a linear relation that spreads over many
    correlated features, which a ridge regression reads at once.
    """

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], latent_dim: int):
        super().__init__()
        self.body = _flat(in_features, hidden_sizes)
        self.head = GaussianHead(_out_width(in_features, hidden_sizes), latent_dim)
        self.register_buffer("linear_weight", torch.zeros(latent_dim, in_features))
        self.register_buffer("linear_bias", torch.zeros(latent_dim))

    def set_linear_path(self, weight: Tensor, bias: Tensor) -> None:
        """Set the linear path and zero the MLP's mean output, so the mean starts as that linear map."""
        with torch.no_grad():
            self.linear_weight.copy_(weight)
            self.linear_bias.copy_(bias)
            nn.init.zeros_(self.head.mean.weight)
            nn.init.zeros_(self.head.mean.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_var = self.head(self.body(x))
        return mean + F.linear(x.flatten(1), self.linear_weight, self.linear_bias), log_var


class JointEncoder(nn.Module):
    """q(z | X): one trunk per modality, concatenated, then a joint MLP and Gaussian heads.

    Given ``observed`` (n, M), a missing modality's trunk features are replaced by a learned
    vector of its own (``missing_features[j]``, zero at the start), so the same encoder gives
    q(z | x_O) for any observed set O: on complete rows it is exactly the complete-data encoder
    (same weights, same function), which a pooled encoder would not be. The vectors are trained
    only when ``fit`` sees incomplete rows.

    Given ``in_features`` (the default MLP trunks), the mean also has a **linear path** from each
    modality's input, ``skips[j]`` (zero at the start; a missing modality's path is the learned
    vector ``missing_skips[j]``): the MLP learns what a linear map of the inputs leaves. Without
    it, stage 1 did not find the linear part of the posterior mean within its epochs
    (docs/user_guide/concepts.md, "Linear paths").
    """

    def __init__(
        self,
        trunks: Sequence[nn.Module],
        trunk_widths: Sequence[int],
        hidden_sizes: Sequence[int],
        latent_dim: int,
        in_features: Sequence[int] | None = None,
    ):
        super().__init__()
        self.trunks = nn.ModuleList(trunks)
        self.missing_features = nn.ParameterList(nn.Parameter(torch.zeros(width)) for width in trunk_widths)
        joint_in = sum(trunk_widths)
        self.body = mlp(joint_in, hidden_sizes)
        self.head = GaussianHead(_out_width(joint_in, hidden_sizes), latent_dim)
        self.skips = None
        if in_features is not None:
            self.skips = nn.ModuleList(nn.Linear(d, latent_dim, bias=False) for d in in_features)
            for skip in self.skips:
                nn.init.zeros_(skip.weight)
            self.missing_skips = nn.ParameterList(nn.Parameter(torch.zeros(latent_dim)) for _ in in_features)

    def forward(self, blocks: Sequence[Tensor], observed: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = [trunk(x) for trunk, x in zip(self.trunks, blocks)]
        if observed is not None:
            features = [
                torch.where(observed[:, j : j + 1], h, missing.to(h.dtype))
                for j, (h, missing) in enumerate(zip(features, self.missing_features))
            ]
        mean, log_var = self.head(self.body(torch.cat(features, dim=-1)))
        if self.skips is not None:
            for j, (skip, x) in enumerate(zip(self.skips, blocks)):
                path = skip(x.flatten(1))
                if observed is not None:
                    path = torch.where(observed[:, j : j + 1], path, self.missing_skips[j].to(path.dtype))
                mean = mean + path
        return mean, log_var


class Decoder(nn.Module):
    """g_m: z (…, D) → natural parameters (…, d_m); linear output, no activation.

    ``widths`` run from the latent outwards (the default model passes ``hidden_sizes`` reversed).
    With hidden layers, a linear path from z (``skip``, zero at the start) sits beside the MLP, as
    in the joint encoder.
    """

    def __init__(self, latent_dim: int, widths: Sequence[int], out_features: int):
        super().__init__()
        self.body = mlp(latent_dim, widths)
        self.out = nn.Linear(_out_width(latent_dim, widths), out_features)
        self.skip = None
        if len(widths):
            self.skip = nn.Linear(latent_dim, out_features, bias=False)
            nn.init.zeros_(self.skip.weight)

    def forward(self, z: Tensor) -> Tensor:
        out = self.out(self.body(z))
        return out if self.skip is None else out + self.skip(z)

    def shrink(self, weight: Tensor, bias: Tensor, share: float) -> None:
        """Become ``L(z) + share · (g(z) − L(z))`` for the linear map L(z) = ``weight @ z + bias``:
        the output layer scaled by ``share``, the linear path (``skip``) given the rest."""
        with torch.no_grad():
            self.out.weight.mul_(share)
            self.out.bias.mul_(share).add_((1 - share) * bias)
            self.skip.weight.mul_(share).add_((1 - share) * weight)


#: Hidden width of the subset encoder's own view of each input (next to the frozen trunk's features).
#: At the side-by-side benchmark's matched layers (trunks ending in 10 features) a linear view gave
#: 2-of-3 digit MSE 0.0348 against the reference's 0.0338; one hidden layer of 128 gave 0.0325 for
#: +8 % fit time, and 512 gave 0.0309 for +26 %; on the real tables 128 did as well as 512
#: (benchmarks/subset_inference.py: digits6 mean MSE over the sets 0.415 / 0.425, digits3
#: 0.437 / 0.431).
RAW_READOUT_WIDTH = 128


class SubsetEncoder(nn.Module):
    """Base Gaussian of the subset posterior q_S(z | x_S), for any subset S (a Deep Sets encoder).

    It reads each modality through the joint encoder's trunk, frozen in stage 2 (features the
    joint encoder learned for inferring z from that modality, whatever network the user gave
    it), plus a one-hidden-layer view of the input itself (a narrow trunk keeps only what the
    joint encoder needed *with* the other modalities), and gives features h_j and positive
    weights w_j.
    The modalities in S are pooled by their weighted mean Σ w_j h_j / Σ w_j, as a product of
    Gaussian experts pools means by precision, so one informative modality can dominate where it
    knows more. An embedding of S is added and an MLP with Gaussian heads reads the result. One
    network serves every subset. ``mask`` is (n, M), 1 where a modality is in S; modalities
    outside S may be passed as ``None``.

    With ``linear_paths`` (one slot per subset bitmask), the mean also gets a linear map of the
    inputs in S per subset, ``linear_weight[S] @ x + linear_bias[S]``: buffers ``fit`` sets in
    closed form (ridge regressions of the joint posterior means on x_S), as for the experts, so a
    prediction from several views uses each view's linear information; zero until set.
    """

    def __init__(
        self,
        trunk_widths: Sequence[int],
        in_features: Sequence[int],
        hidden_sizes: Sequence[int],
        latent_dim: int,
        linear_paths: int = 0,
    ):
        super().__init__()
        self.register_buffer("linear_weight", torch.zeros(linear_paths, latent_dim, sum(in_features)))
        self.register_buffer("linear_bias", torch.zeros(linear_paths, latent_dim))
        self.in_features = tuple(in_features)
        width = hidden_sizes[-1] if len(hidden_sizes) else 2 * latent_dim
        self.width = width
        self.readouts = nn.ModuleList(nn.Linear(w, 2 * width) for w in trunk_widths)
        # a view of the input itself: what a narrow trunk passes on only jointly with the other
        # modalities' features is lost for a subset without them
        self.raw_readouts = nn.ModuleList(
            nn.Sequential(mlp(d, [RAW_READOUT_WIDTH]), nn.Linear(RAW_READOUT_WIDTH, 2 * width, bias=False))
            for d in in_features
        )
        self.subset_embedding = nn.Linear(len(trunk_widths), width)
        # as deep as the experts' encoders: with one layer of hidden_sizes[-1], digits6 kept 4
        # (target, set) pairs worse than their best single view beyond noise at seed 1 (this: 0 at
        # seeds 0-2); mean MSE over the sets equal on digits6, 4 % lower on digits3
        # (benchmarks/subset_inference.py --seeds 0 1 2)
        body = [nn.ReLU(), *mlp(width, hidden_sizes)] if len(hidden_sizes) else []
        self.body = nn.Sequential(*body)
        self.head = GaussianHead(width, latent_dim)

    def forward(
        self, trunk_features: Sequence[Tensor | None], inputs: Sequence[Tensor | None], mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``inputs`` are the flat blocks the trunks read; ``mask`` (n, M), or (n, k, M) for k
        subsets of each row: the readouts then run once per row."""
        weighted, total = 0.0, 0.0
        for j, (readout, raw, h, x) in enumerate(zip(self.readouts, self.raw_readouts, trunk_features, inputs)):
            if h is not None:
                features, raw_weight = (readout(h) + raw(x)).split(self.width, dim=-1)
                if mask.dim() == 3:
                    features, raw_weight = features[:, None], raw_weight[:, None]
                weight = mask[..., j : j + 1] * F.softplus(raw_weight)
                weighted, total = weighted + weight * features, total + weight
        h = weighted / (total + 1e-6) + self.subset_embedding(mask)
        mean, log_var = self.head(self.body(h))
        if len(self.linear_weight):
            mean = mean + self._linear_path(inputs, mask)
        return mean, log_var

    def _linear_path(self, inputs: Sequence[Tensor | None], mask: Tensor) -> Tensor:
        """Each row's (and subset's) ``linear_weight[S] @ x + linear_bias[S]``: its subset's weights
        gathered per row, in chunks of at most ``LINEAR_PATH_GATHER`` weights (no host sync)."""
        n, (D, d) = mask.shape[0], self.linear_weight.shape[1:]
        x = torch.cat([x if x is not None else mask.new_zeros(n, w) for x, w in zip(inputs, self.in_features)], dim=-1)
        powers = 2 ** torch.arange(mask.shape[-1], device=mask.device, dtype=mask.dtype)
        bits = (mask * powers).sum(-1).round().long()  # (n,) or (n, k)
        if bits.dim() == 2:
            x = x[:, None].expand(-1, bits.shape[1], -1)
        flat_bits, flat_x = bits.reshape(-1), x.reshape(-1, d, 1)
        step = max(1, LINEAR_PATH_GATHER // (D * d))
        out = [mask.new_zeros(0, D, 1)]
        for start in range(0, len(flat_bits), step):
            rows = flat_bits[start : start + step]
            weight, bias = self.linear_weight[rows], self.linear_bias[rows].unsqueeze(-1)
            out.append(torch.baddbmm(bias, weight, flat_x[start : start + step]))
        return torch.cat(out).reshape(*bits.shape, D)

    def set_linear_path(self, bits: int, columns: Tensor, weight: Tensor, bias: Tensor) -> None:
        """Subset ``bits``'s linear path: ``weight`` (D, len(columns)) on the input ``columns``."""
        device = self.linear_weight.device
        with torch.no_grad():
            self.linear_weight[bits].zero_()
            self.linear_weight[bits][:, columns.to(device)] = weight.to(device)
            self.linear_bias[bits] = bias.to(device)


#: How far beyond the range of fit's rows, as a fraction of that range, each feature reaches the
#: experts (then clipped). Clipping at the range itself cut off test spectra that overshot a few
#: channels by 1-4 % of their range and distorted the shape a linear map reads: spectrum →
#: composition 0.095 / 0.076 / 0.068 at seeds 0-2, 0.066 / 0.055 / 0.054 with this margin (any
#: margin from 0.05 to 1 gave the same); other tables moved by at most 2 % either way.
EXPERT_INPUT_MARGIN = 0.05
#: The same for the subset encoder, which pools several views (an extreme feature weighs less)
#: through the joint encoder's trunks (trained on unclipped values). It predicts best unclipped,
#: and a partial clip can be worse than none: digits6, the left half from the five other views,
#: 0.523 (seed 2) at the range itself, 0.764 at one range beyond, 0.483 at three or more or
#: unclipped; digits3 from two views 0.430 / 0.400 / 0.452 (seeds 0-2) at the experts' margin,
#: 0.381 on average at three. Three ranges matched no clipping on every table and seed measured
#: and still stops absurd values (1e3 standard deviations).
SUBSET_INPUT_MARGIN = 3.0


class FeatureRange(nn.Module):
    """Clips each feature of a flat block (n, d) to the range it had in the rows ``fit`` saw,
    widened on each side by ``margin`` times that range.

    The experts and the subset encoder read their inputs through it: they predict the *other*
    modalities, and far beyond the training range a ReLU network extrapolates linearly and the
    flows amplify what it gives. On the standardised digits, a feature with a tiny training
    spread reached 120 in one test row, the expert reading it put that row's latent 40 standard
    deviations out, and its decoded predictions alone doubled a view's mean error
    (docs/subset_posterior.md). The joint encoder reads values as they are: its latent explains
    the row's own values, extreme ones included (clipping it cost 15-25 nats of held-out
    log-likelihood per digit row). Infinite bounds (a model from an older pickle) clip nothing.
    """

    def __init__(self, low: Tensor, high: Tensor):
        super().__init__()
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, x: Tensor, margin: float) -> Tensor:
        reach = margin * (self.high - self.low)
        return torch.minimum(torch.maximum(x, self.low - reach), self.high + reach)


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
    of ``_flows.FLOW_NAMES`` or a factory called with ``latent_dim``. ``input_ranges`` gives each
    modality's per-feature (low, high) over the rows fit saw: the experts and the subset encoder
    read their inputs clipped to them (None: unbounded, for placeholders a state dict overwrites).
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
        input_ranges: Sequence[tuple[Tensor, Tensor]] | None = None,
    ):
        super().__init__()
        self.names, self.latent_dim = tuple(names), latent_dim
        if input_ranges is None:
            input_ranges = [
                (torch.full((math.prod(s),), -math.inf), torch.full((math.prod(s),), math.inf)) for s in shapes
            ]
        self.input_ranges = nn.ModuleList(FeatureRange(low, high) for low, high in input_ranges)
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
            build_part(
                p.get("trunk"), lambda s=s: _flat(math.prod(s), hidden_sizes), f"Modality {n!r}: the trunk", in_shape=s
            )
            for n, p, s in zip(names, parts, self.in_shapes)
        ]
        with torch.no_grad():  # trunk widths, from a probe
            widths = [trunk(torch.zeros(2, *s)).shape[-1] for trunk, s in zip(trunks, self.in_shapes)]
        # a linear path beside the joint MLP when the trunks are the default MLPs (not a user's)
        linear = len(hidden_sizes) and not any(p.get("trunk") for p in parts)
        in_features = [math.prod(s) for s in self.in_shapes] if linear else None
        self.joint_encoder = JointEncoder(trunks, widths, hidden_sizes, latent_dim, in_features)
        out_shapes = [
            shape if lik.n_outputs == math.prod(shape) else (lik.n_outputs,) for lik, shape in zip(likelihoods, shapes)
        ]
        self.decoders = nn.ModuleList(
            build_part(
                p.get("decoder"),
                lambda lik=lik: Decoder(latent_dim, decoder_hidden_sizes, lik.n_outputs),
                f"Modality {n!r}: the decoder",
                latent_dim=latent_dim,
                out_shape=out,
            )
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
            SoftclampedEncoder(
                build_part(p["encoder"], None, f"Modality {n!r}: the encoder", in_shape=s, latent_dim=latent_dim)
            )
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
        # Subsets of 2..M-1 modalities exist only from M = 3 on.
        self.subset_encoder = self.subset_flow = None
        if len(names) >= 3:
            in_features = [math.prod(s) for s in self.in_shapes]
            n_paths = 2 ** len(names) if len(names) <= MAX_TARGET_ROUTED_MODALITIES else 0
            if n_paths * latent_dim * sum(in_features) > MAX_SUBSET_PATH_WEIGHTS:
                n_paths = 0  # memory: the subset posterior then has no linear paths
            self.subset_encoder = SubsetEncoder(widths, in_features, hidden_sizes, latent_dim, n_paths)
            subset_flow = next((f for f in flows if isinstance(f, str)), "maf")
            self.subset_flow = make_flow(subset_flow, latent_dim, n_flow_blocks, flow_hidden_sizes)
        # Per subset bitmask, the bitmask of the subset whose posterior it uses (itself unless one of
        # its subsets fitted held-out rows better; see choose_subset_routes).
        n_routes = 2 ** len(names) if self.subset_encoder is not None and len(names) <= MAX_ROUTED_MODALITIES else 0
        self.register_buffer("subset_routes", torch.arange(n_routes, dtype=torch.long))
        # Per subset bitmask and target modality, the bitmask of the conditioning set whose posterior
        # mean predicts that target (itself unless a subset predicted it better on held-out rows;
        # see _routing.choose_target_routes).
        n_target_routes = n_routes if len(names) <= MAX_TARGET_ROUTED_MODALITIES else 0
        target_routes = torch.arange(n_target_routes, dtype=torch.long)[:, None].repeat(1, len(names))
        self.register_buffer("target_routes", target_routes)
        # Per subset bitmask, whether its own posterior is the Gaussian product of its experts rather
        # than the subset flow (where that predicted held-out modalities better; choose_target_routes).
        self.register_buffer("subset_products", torch.zeros(n_target_routes, dtype=torch.bool))
        # Whether a target route names the set whose *own* posterior (its subset flow or product)
        # predicts the target, rather than whatever that set's subset route uses (older pickles
        # chose their target routes among the routed posteriors; see choose_target_routes).
        self.register_buffer("target_routes_own", torch.tensor(False))
        # Gaussian fit of the joint encoder's aggregate posterior E_X q(z | X), set after stage 1.
        self.register_buffer("aggregate_mean", torch.zeros(latent_dim))
        self.register_buffer("aggregate_scale_tril", torch.eye(latent_dim))

    # -- the parts each stage trains ------------------------------------------------------
    def joint_parts(self) -> list[nn.Module]:
        """Stage 1: joint encoder, decoders and their (learned) scales."""
        return [self.joint_encoder, self.decoders, self.likelihoods]

    def expert_parts(self) -> list[nn.Module]:
        """Stage 2: unimodal encoders and flows, and the subset encoder and its flow."""
        return [module for part in self.stage2_parts() for module in part]

    def stage2_parts(self) -> list[list[nn.Module]]:
        """Stage 2's independent parts: each expert (encoder, flow), then the subset posterior's."""
        parts = [[encoder, flow] for encoder, flow in zip(self.encoders, self.flows)]
        if self.subset_encoder is not None:
            parts.append([self.subset_encoder, self.subset_flow])
        return parts

    # -- the paper's objects ----------------------------------------------------------------
    def index(self, name: str) -> int:
        return self.names.index(name)

    def bitmask(self, names: Sequence[str]) -> int:
        """The subset bitmask of modalities ``names`` (bit j: ``self.names[j]``)."""
        return sum(1 << self.index(m) for m in names)

    def encoder_input(self, j: int, x: Tensor, margin: float | None = EXPERT_INPUT_MARGIN) -> Tensor:
        """A flat block (n, d) as modality j's encoders read it, (n, *in_shape): clipped to the
        range of fit's rows widened by ``margin`` times that range for the cross-modal encoders,
        as it is for the joint one (``margin=None``)."""
        x = self.likelihoods[j].encoder_input(x if margin is None else self.input_ranges[j](x, margin))
        return x.reshape(x.shape[0], *self.in_shapes[j])

    def natural_parameters(self, j: int, z: Tensor) -> Tensor:
        """Decoder j's output at z (…, D), flattened to (…, n_outputs)."""
        return self.decoders[j](z).reshape(*z.shape[:-1], -1)

    def joint_posterior(self, blocks: dict[str, Tensor], observed: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z | X), or of q(z | x_O) given ``observed`` (n, M) marking O
        (every block present, zeros where a modality is missing)."""
        inputs = [self.encoder_input(j, blocks[name], margin=None) for j, name in enumerate(self.names)]
        return self.joint_encoder(inputs, observed)

    def expert(self, name: str, x: Tensor) -> FlowDistribution:
        """Expert ``name``'s posterior q_j(z | x_j) of the rows of block ``x`` (n, d_j)."""
        j = self.index(name)
        return FlowDistribution(*self.encoders[j](self.encoder_input(j, x)), self.flows[j])

    def subset(self, blocks: dict[str, Tensor], mask: Tensor, trunk_features: Tensor | None = None) -> FlowDistribution:
        """The subset posterior q_S(z | x_S) of the rows of ``blocks``, S marked by ``mask`` (n, M)."""
        return FlowDistribution(*self.subset_posterior(blocks, mask, trunk_features), self.subset_flow)

    def subset_posterior(
        self, blocks: dict[str, Tensor], mask: Tensor, trunk_features: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of the subset posterior's base Gaussian; ``mask`` (n, M) or (n, k, M) marks S.

        Each modality is read through the joint encoder's trunk (clipped to fit's range widened by
        ``SUBSET_INPUT_MARGIN`` first), or from ``trunk_features`` where stage 2 computed the frozen
        trunks' features once.
        """
        inputs = self.subset_inputs(blocks)
        if trunk_features is not None:
            cached = trunk_features.split([r.in_features for r in self.subset_encoder.readouts], dim=-1)
            features = [None if x is None else h for h, x in zip(cached, inputs)]
        else:
            features = self.subset_trunk_features(inputs)
        flat = [None if x is None else x.reshape(len(x), -1) for x in inputs]
        return self.subset_encoder(features, flat, mask)

    def subset_inputs(self, blocks: dict[str, Tensor]) -> list[Tensor | None]:
        """Each modality's block as the subset posterior reads it (clipped to fit's range widened
        by ``SUBSET_INPUT_MARGIN``); None for a modality ``blocks`` lacks."""
        return [
            self.encoder_input(j, blocks[name], SUBSET_INPUT_MARGIN) if name in blocks else None
            for j, name in enumerate(self.names)
        ]

    def subset_trunk_features(self, inputs: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The joint encoder's trunk features of each of ``subset_inputs``' blocks (None stays None)."""
        return [None if x is None else trunk(x) for trunk, x in zip(self.joint_encoder.trunks, inputs)]

    def set_aggregate_posterior(self, mean: Tensor, log_var: Tensor) -> None:
        """Fit N(m, Σ) to E_X q(z | X) from the joint posteriors of the training rows.

        Mixture moments: m is the mean of the row means, Σ their covariance plus the mean
        per-row variance (a ridge of 1e-6 keeps Σ positive definite).
        """
        mean, variance = mean.double(), torch.exp(log_var.double())
        centred = mean - mean.mean(0)
        covariance = centred.T @ centred / max(len(mean) - 1, 1) + torch.diag(variance.mean(0))
        covariance = covariance + 1e-6 * torch.eye(self.latent_dim, dtype=covariance.dtype, device=covariance.device)
        self.aggregate_mean.copy_(mean.mean(0))
        self.aggregate_scale_tril.copy_(torch.linalg.cholesky(covariance))

    def aggregate_whitened(self, z: Tensor) -> Tensor:
        """L⁻¹(z − m) for the aggregate posterior's Gaussian fit N(m, LLᵀ); z (..., D)."""
        centred = (z - self.aggregate_mean).unsqueeze(-1)
        tril = self.aggregate_scale_tril.expand(*centred.shape[:-2], -1, -1)
        return torch.linalg.solve_triangular(tril, centred, upper=False).squeeze(-1)

    def aggregate_log_prob(self, z: Tensor) -> Tensor:
        """log r(z) of the Gaussian fit of the aggregate posterior; z (..., D)."""
        log_det = torch.log(torch.diagonal(self.aggregate_scale_tril)).sum()
        return std_normal_log_prob(self.aggregate_whitened(z)) - log_det

    def decode(self, name: str, z: Tensor) -> Decoded:
        """p(x_m | z) of modality ``name`` at z (…, D): mean, predict, probabilities, sample, log_prob."""
        j = self.index(name)
        return Decoded(self.likelihoods[j], self.natural_parameters(j, z))

    def log_likelihood(self, name: str, x: Tensor, z: Tensor) -> Tensor:
        """log p(x_m | z), summed over features; z may carry leading sample dimensions."""
        return self.decode(name, z).log_prob(x)


def stage1_loss(
    module: JNFModule,
    blocks: dict[str, Tensor],
    noise: Tensor,
    rescale: Sequence[float],
    beta: float,
    observed: Tensor | None = None,
) -> Tensor:
    """Per-row Σ_m r_m·(−log p(x_m | z)) + β·KL(q(z | X) ‖ N(0, I)), z reparameterised from ``noise``.

    Given ``observed`` (n, M), the encoder reads only the observed modalities and the sum runs
    over them: the ELBO of log p(x_O), the marginal of what the row has.
    """
    mean, log_var = module.joint_posterior(blocks, observed)
    z = reparameterize(mean, log_var, noise)
    terms = [-r * module.log_likelihood(name, blocks[name], z) for name, r in zip(module.names, rescale)]
    if observed is not None:
        terms = [torch.where(observed[:, j], term, 0.0) for j, term in enumerate(terms)]
    reconstruction = sum(terms)
    kl = 0.5 * (mean**2 + torch.exp(log_var) - 1.0 - log_var).sum(-1)
    return reconstruction + beta * kl


#: Most bytes of the frozen trunks' features stage 2 computes once per fit (``StageBatch.trunk_features``:
#: a tenth of stage 2's work at the reference's layers); beyond that they are computed every step.
TRUNK_CACHE_BYTES = 2**30


#: Largest number of modalities for which every subset's posterior is checked on held-out rows.
MAX_ROUTED_MODALITIES = 12


#: Most weights (subsets x latent x input features) of the subset posterior's linear paths: 80 MB.
MAX_SUBSET_PATH_WEIGHTS = 20_000_000
#: Most linear-path weights gathered at once (rows x latent x input features): 16 MB in float32.
LINEAR_PATH_GATHER = 4_000_000


#: Largest number of modalities for which each target's conditioning set is chosen on held-out rows
#: (2^M - 2 posterior means over the validation rows, and a loss per subset and target).
MAX_TARGET_ROUTED_MODALITIES = 8


#: Random subsets drawn per row and step for the subset posterior's loss (its mean over them). With
#: 57 subsets of 2..5 of six digit views, one draw per row left each subset little signal (worst
#: MSE(S) / best single view 2.63 against 1.64 with 4 draws, when the subset encoder had trunks of
#: its own). Reading the joint encoder's frozen trunks, 2 draws did as well as 4 on every table
#: (benchmarks/subset_inference.py: digits6 1.17 / 1.16, digits3 1.07 / 1.00, the others equal)
#: in 30 % less stage-2 time; and with the linear paths, 1 as well as 2 (seeds 0-1: worst
#: MSE(S) / best single view on digits6 1.06 / 1.01 against 1.80 / 1.04, mean MSE over the sets
#: within 1 %; cross-modal MSE on every table within the seeds' spread, seeds 0-2), the digits6
#: fit 30.0 -> 25.6 s (the subset posterior stops earlier; benchmarks/results/subset_draws.md).
SUBSET_DRAWS = 1


def random_subset_masks(noise: Tensor, observed: Tensor | None = None) -> Tensor:
    """(n, M) float masks of random subsets of 2..M-1 modalities from Gaussian noise (n, M + 1).

    The ranks of the first M columns are a uniform random permutation; the last column, through
    the normal CDF, picks the subset size uniformly in 2..M-1. Fixed noise gives fixed subsets
    (the validation loss uses fixed noise). Given ``observed`` (n, M), subsets are drawn among a
    row's observed modalities, of size 2..min(|O|, M-1) (a row with |O| < 2 gets a subset of one,
    which :func:`stage2_terms` leaves out).
    """
    n_modalities = noise.shape[1] - 1
    if observed is None:
        observed = torch.ones_like(noise[:, :n_modalities], dtype=torch.bool)
    keys = noise[:, :n_modalities].masked_fill(~observed, math.inf)  # unobserved rank last
    ranks = keys.argsort(-1).argsort(-1)
    largest = observed.sum(1).clamp(max=n_modalities - 1).long()
    uniform = 0.5 * (1.0 + torch.erf(noise[:, -1] / math.sqrt(2.0)))
    size = torch.minimum(2 + (uniform * (largest - 1)).long(), largest).clamp(min=1)
    return ((ranks < size[:, None]) & observed).to(noise.dtype)


def stage2_terms(
    module: JNFModule,
    batch: StageBatch,
    noise: Tensor,
    batched: bool = True,
    active: Sequence[bool] | None = None,
) -> tuple[dict[str, Tensor | None], Tensor | None]:
    """Per-row ({j: −log q_j(z | x_j)} for every modality j, −log q_S(z | x_S) or None when M < 3).

    z is one draw of the frozen joint posterior, from ``noise[:, :D]``; with M >= 3 the rest of
    ``noise`` draws ``SUBSET_DRAWS`` random subsets S of 2..M-1 modalities per row
    (:func:`random_subset_masks`), and the subset term is the mean over them.
    The joint posterior's (mean, log-variance) come from ``batch.joint_mean`` and
    ``batch.joint_log_var`` when present (the joint part is frozen in stage 2, so they are
    computed once, not every epoch), else from the joint encoder.

    Every flow reads the same z, so the experts' flows and the subset flow run once per row
    and, with ``batched``, as one batched pass per group of same-shape flows, with the default
    encoders' layers after their first batched too on accelerators (:mod:`~skjnf._stacked`);
    ``batched=False`` evaluates the same terms network by network. ``active`` (one flag per
    expert, then the subset posterior) leaves out the parts whose training has stopped: their
    term is None.

    Given ``batch.observed`` (n, M), the joint posterior is q(z | x_O), expert j learns from the
    rows :func:`stage2_expert_rows` gives, the subsets are drawn among the observed modalities and
    the subset term is zero on rows observing fewer than two: each expert learns
    E[q(z | x_O) | x_j], which is q_j's target p(z | x_j) when modalities are missing at random
    (the tower property).
    """
    blocks, observed = batch.blocks, batch.observed
    if batch.joint_mean is not None:
        mean, log_var = batch.joint_mean, batch.joint_log_var
    else:
        with torch.no_grad():
            mean, log_var = module.joint_posterior(blocks, observed)
    D = module.latent_dim
    z = reparameterize(mean, log_var, noise[:, :D])
    n_parts = len(module.names) + (module.subset_encoder is not None)
    active = [True] * n_parts if active is None else list(active)
    experts_on = [j for j in range(len(module.names)) if active[j]]
    inputs = [module.encoder_input(j, blocks[module.names[j]]) for j in experts_on]
    encoders = [module.encoders[j] for j in experts_on]
    flows = [module.flows[j] for j in experts_on]
    subset_on = module.subset_encoder is not None and active[-1]
    if subset_on:
        flows.append(module.subset_flow)
    if batched:
        default = [isinstance(encoder, UnimodalEncoder) and stack_encoders(z.device) for encoder in encoders]
        bases, mapped = expert_bases(encoders, inputs, default), flows_at(flows, z)
    else:
        bases, mapped = [e(x) for e, x in zip(encoders, inputs)], [flow(z) for flow in flows]
    expert_rows = None if observed is None else stage2_expert_rows(observed)
    experts = dict.fromkeys(module.names)
    for i, j in enumerate(experts_on):
        (u, log_det), (mean, log_var) = mapped[i], bases[i]
        name = module.names[j]
        experts[name] = -(gaussian_log_prob(u, mean, log_var) + log_det)
        if observed is not None:
            experts[name] = torch.where(expert_rows[:, j], experts[name], 0.0)
    if not subset_on:
        return experts, None
    n, k = len(z), SUBSET_DRAWS
    subset_noise = noise[:, D:].reshape(n * k, -1)
    row_observed = None if observed is None else observed.repeat_interleave(k, dim=0)
    masks = random_subset_masks(subset_noise, row_observed).reshape(n, k, -1)
    mean, log_var = module.subset_posterior(blocks, masks, batch.trunk_features)  # (n, k, D): one base per subset
    u, log_det = mapped[-1]
    subset = -(gaussian_log_prob(u[:, None], mean, log_var) + log_det[:, None]).mean(1)
    if observed is not None:
        subset = torch.where(observed.sum(1) >= 2, subset, 0.0)
    return experts, subset


#: Stack the default encoders' layers on the CPU too. There, stacking their 256 x 256 weights each step
#: cost more than the separate products it replaced (one digits6 batch of 128 rows: 2.09 ms stacked
#: against 1.94 ms, cancer 0.96 against 0.76), while the flows' stacked pass still paid (7 flows:
#: 3.2 against 3.9 ms); on an accelerator every launch saved counts.
STACK_ENCODERS_ON_CPU = False


def stack_encoders(device: torch.device) -> bool:
    """Whether stage 2 runs the default expert encoders as one stacked pass on ``device``."""
    return device.type != "cpu" or STACK_ENCODERS_ON_CPU


def stage2_expert_rows(observed: Tensor) -> Tensor:
    """(n, M) weights of the rows each expert learns from: those observing its modality and at
    least one other.

    On a row observing only x_j the target would be the joint encoder's own Gaussian q(z | x_j),
    the single-Gaussian answer the flow expert exists to improve on. Measured on the digits in
    three views with 85 % of the rows incomplete (benchmarks/incomplete_rows.py, two seeds): the
    experts' cross-modal MSE was 1.54 / 0.82 with those rows and 0.75 / 0.78 without; within
    noise at 30-60 % and on the linear-Gaussian table. The subset posterior keeps its rows with
    S = O: leaving them out made its MSE worse (0.59-0.64 -> 0.66-0.70).
    """
    return observed & (observed.sum(1, keepdim=True) >= 2)


def stage2_row_counts(observed: Tensor | None, n: int, n_parts: int) -> Tensor:
    """Rows each stage-2 part's loss counts in a batch of n, (n_parts,) on the batch's device: each
    expert's rows (:func:`stage2_expert_rows`), then the rows observing two or more modalities
    (the subset posterior's)."""
    if observed is None:
        return torch.full((n_parts,), float(n))
    counts = torch.cat([stage2_expert_rows(observed).sum(0), (observed.sum(1) >= 2).sum(0, keepdim=True)])
    return counts[:n_parts].to(torch.get_default_dtype())


def stage2_loss(module: JNFModule, batch: StageBatch, noise: Tensor) -> Tensor:
    """Per-row Σ_j −log q_j(z | x_j) − log q_S(z | x_S): the terms of :func:`stage2_terms`, summed."""
    experts, subset = stage2_terms(module, batch, noise)
    return sum(experts.values()) + (0.0 if subset is None else subset)


def stage2_noise_dim(module: JNFModule) -> int:
    """Columns of stage-2 noise per row: the latent draw, plus ``SUBSET_DRAWS`` random subsets when M >= 3."""
    return module.latent_dim + (SUBSET_DRAWS * (len(module.names) + 1) if module.subset_encoder is not None else 0)


@contextmanager
def frozen_inference(module: nn.Module):
    """``eval()``, ``no_grad`` and every parameter's ``requires_grad`` off; all restored afterwards.

    For ``fit``'s own passes over a module it is still training (the contract probe, route
    choices, calibration); a fitted module is frozen once at the end of ``fit`` and inference
    only adds ``torch.no_grad()``, so threads sharing it never write on it.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if was_training:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if was_training:
            module.train()
