"""What a fitted model is made of: the checked, per-modality settings that build its networks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ._likelihoods import LIKELIHOODS, make_likelihood
from ._modules import NETWORK_PARTS, JNFModule
from ._posteriors import SUBSET_POSTERIORS
from ._validation import Layout

__all__ = ["PARAMETER_CONSTRAINTS", "ModelSpec", "model_spec", "build_module", "count_categories"]


#: scikit-learn's checks of every JNFEstimator parameter (its ``_parameter_constraints``); what
#: these cannot express (per-modality dicts, network factories) ``model_spec`` checks at fit.
PARAMETER_CONSTRAINTS: dict = {
    "modalities": [None, dict, StrOptions({"prefix"})],
    "latent_dim": [Interval(Integral, 1, None, closed="left")],
    "hidden_sizes": [list, tuple],
    "decoder_hidden_sizes": [None, list, tuple],
    "likelihood": [StrOptions(set(LIKELIHOODS)), dict],
    "likelihood_scale": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto", "learn"}), dict],
    "rescale_likelihoods": ["boolean", dict],
    "beta": [Interval(Real, 0, None, closed="left")],
    "flow": [StrOptions({"maf", "realnvp"}), dict],
    "networks": [None, dict],
    "n_flow_blocks": [Interval(Integral, 0, None, closed="left")],
    "flow_hidden_sizes": [list, tuple],
    "joint_epochs": [Interval(Integral, 0, None, closed="left")],
    "flow_epochs": [Interval(Integral, 0, None, closed="left")],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "lr": [Interval(Real, 0, None, closed="neither")],
    "expert_weight_decay": [Interval(Real, 0, None, closed="left")],
    "validation_fraction": [Interval(Real, 0, 1, closed="left")],
    "early_stopping": ["boolean"],
    "cond_mod": [None, str, list, tuple],
    "latent": [StrOptions({"mean", "sample"})],
    "subset_posterior": [StrOptions(set(SUBSET_POSTERIORS))],
    "n_mcmc_steps": [Interval(Integral, 1, None, closed="left")],
    "n_leapfrog": [Interval(Integral, 1, None, closed="left")],
    "step_size": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
    "n_posterior_samples": [Interval(Integral, 1, None, closed="left")],
    "n_importance_samples": [Interval(Integral, 1, None, closed="left")],
    "device": [str, torch.device],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the networks, one entry per modality where it varies.

    Built once per ``fit`` from the estimator's parameters and the data's layout (``model_spec``),
    kept on the fitted estimator, and used again to rebuild the networks when unpickling.
    """

    names: tuple[str, ...]
    dims: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    networks: Mapping
    flows: tuple
    likelihoods: tuple[str, ...]  # the likelihood family of each modality
    scales: tuple  # float, "auto" or "learn" per modality
    rescale: tuple[float, ...]
    latent_dim: int
    hidden_sizes: tuple[int, ...]
    decoder_hidden_sizes: tuple[int, ...]
    n_flow_blocks: int
    flow_hidden_sizes: tuple[int, ...]
    n_categories: tuple  # int for a categorical modality given as one column of codes, else None

    def as_dict(self) -> dict:
        """Plain containers only (what pickles and skops store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping) -> ModelSpec:
        """From :meth:`as_dict`'s output, or the dict a 0.1 pickle holds."""
        fields = {f.name for f in dataclasses.fields(cls)}
        state = dict(state)
        if "decoders" in state:  # named so up to 0.2
            state.setdefault("likelihoods", state.pop("decoders"))
        state = {k: v for k, v in state.items() if k in fields}
        if state.get("decoder_hidden_sizes") is None:
            state["decoder_hidden_sizes"] = tuple(reversed(tuple(state["hidden_sizes"])))
        tuples = {k: tuple(v) for k, v in state.items() if isinstance(v, list)}
        tuples["shapes"] = tuple(tuple(shape) for shape in state["shapes"])
        return cls(**{**state, **tuples})


def _per_modality(value, names: Sequence[str], parameter: str, default):
    """Expand a scalar-or-dict parameter to one value per modality; unknown names are an error."""
    if not isinstance(value, Mapping):
        return [value] * len(names)
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ValueError(f"{parameter} names unknown modality {unknown[0]!r}; modalities are {list(names)}.")
    return [value.get(name, default) for name in names]


def _check_widths(value, parameter: str) -> tuple[int, ...]:
    widths = tuple(value)
    if not all(isinstance(w, Integral) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"{parameter} must be a sequence of positive ints; got {value!r}.")
    return tuple(int(w) for w in widths)


def _check_networks(networks, names) -> dict:
    """Validate the ``networks`` parameter's names, parts and factories."""
    if networks is None:
        return {}
    unknown = [k for k in networks if k not in names]
    if unknown:
        raise ValueError(f"networks names unknown modality {unknown[0]!r}; modalities are {list(names)}.")
    for name, parts in networks.items():
        if not isinstance(parts, Mapping):
            raise TypeError(f"networks[{name!r}] must be a dict {{part: factory}} with parts {sorted(NETWORK_PARTS)}.")
        for part, spec in parts.items():
            if part not in NETWORK_PARTS:
                raise ValueError(f"networks[{name!r}] has unknown part {part!r}; parts are {sorted(NETWORK_PARTS)}.")
            factory = spec[0] if isinstance(spec, tuple) else spec
            if not callable(factory) or (
                isinstance(spec, tuple) and (len(spec) != 2 or not isinstance(spec[1], Mapping))
            ):
                raise TypeError(
                    f"networks[{name!r}][{part!r}] must be a callable or (callable, kwargs dict); got {spec!r}."
                )
    return dict(networks)


def _rescale(value, layout: Layout) -> list[float]:
    if value is True:
        return [max(layout.dims) / d for d in layout.dims]
    if isinstance(value, Mapping):
        rescale = _per_modality(value, layout.names, "rescale_likelihoods", 1.0)
        if not all(isinstance(r, Real) and r > 0 for r in rescale):
            raise ValueError(f"rescale_likelihoods weights must be positive numbers; got {value!r}.")
        return rescale
    return [1.0] * len(layout.names)


def model_spec(params: Mapping, layout: Layout, blocks: dict, observed: np.ndarray | None) -> ModelSpec:
    """The spec of an estimator's ``params`` (``get_params()``) on data of this ``layout``.

    ``blocks`` and ``observed`` (None: every row complete) are the training data: each block's
    observed rows must fit its likelihood, and a categorical modality given as one column of
    integer codes gets its category count from them.
    """
    names = layout.names
    decoders = _per_modality(params["likelihood"], names, "likelihood", "normal")
    for name, dist in zip(names, decoders):
        if dist not in LIKELIHOODS:
            raise ValueError(f"likelihood for modality {name!r} must be one of {sorted(LIKELIHOODS)}; got {dist!r}.")
    scales = _per_modality(params["likelihood_scale"], names, "likelihood_scale", "auto")
    for name, scale in zip(names, scales):
        if not (scale in ("auto", "learn") or isinstance(scale, Real) and not isinstance(scale, bool) and scale > 0):
            raise ValueError(
                f"likelihood_scale for modality {name!r} must be a float > 0, 'auto' or 'learn'; got {scale!r}."
            )
    hidden_sizes = _check_widths(params["hidden_sizes"], "hidden_sizes")
    decoder_hidden_sizes = params["decoder_hidden_sizes"]
    return ModelSpec(
        names=tuple(names),
        dims=tuple(layout.dims),
        shapes=tuple(tuple(layout.shape(name)) for name in names),
        networks=_check_networks(params["networks"], names),
        flows=tuple(_per_modality(params["flow"], names, "flow", "maf")),
        likelihoods=tuple(decoders),
        scales=tuple(s if isinstance(s, str) else float(s) for s in scales),
        rescale=tuple(float(r) for r in _rescale(params["rescale_likelihoods"], layout)),
        latent_dim=int(params["latent_dim"]),
        hidden_sizes=hidden_sizes,
        decoder_hidden_sizes=tuple(reversed(hidden_sizes))
        if decoder_hidden_sizes is None
        else _check_widths(decoder_hidden_sizes, "decoder_hidden_sizes"),
        n_flow_blocks=int(params["n_flow_blocks"]),
        flow_hidden_sizes=_check_widths(params["flow_hidden_sizes"], "flow_hidden_sizes"),
        n_categories=tuple(count_categories(names, decoders, blocks, observed)),
    )


def count_categories(names, decoders, blocks: dict, observed: np.ndarray | None) -> list:
    """Check each block's observed rows fit its likelihood; return the category count of code columns (else None)."""
    n_categories = []
    for j, (name, dist) in enumerate(zip(names, decoders)):
        x = blocks[name] if observed is None else blocks[name][torch.from_numpy(observed[:, j])]
        LIKELIHOODS[dist].check_data(name, x)
        codes = dist == "categorical" and x.shape[1] == 1
        n_categories.append(int(x.max()) + 1 if codes else None)  # from every observed row
    return n_categories


def build_module(spec: ModelSpec, train_blocks: dict | None, seed: int, input_ranges: list | None = None) -> JNFModule:
    """Build the networks on CPU with a forked, seeded RNG: init never touches the global RNG.

    ``train_blocks`` (each modality's observed training rows) set the data-dependent starts:
    learned scales and dispersions from the features' spread, decoder biases at their means.
    ``input_ranges`` (each modality's per-feature (low, high)) are what the encoders clip their
    inputs to (None: unbounded).
    ``None`` (unpickling) builds placeholders that a state dict then overwrites.
    """
    names = spec.names
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        likelihoods = [
            make_likelihood(dist, d, scale, None if train_blocks is None else train_blocks[name], n_categories=k)
            for name, d, dist, scale, k in zip(names, spec.dims, spec.likelihoods, spec.scales, spec.n_categories)
        ]
        biases = None
        if train_blocks is not None:
            biases = [lik.natural_parameter_from_data(train_blocks[name]) for lik, name in zip(likelihoods, names)]
        return JNFModule(
            names,
            spec.shapes,
            likelihoods,
            spec.latent_dim,
            spec.hidden_sizes,
            spec.flows,
            spec.n_flow_blocks,
            spec.flow_hidden_sizes,
            networks=dict(spec.networks),
            decoder_biases=biases,
            decoder_hidden_sizes=spec.decoder_hidden_sizes,
            input_ranges=input_ranges,
        )
