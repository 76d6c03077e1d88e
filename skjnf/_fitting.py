"""What ``fit`` does between validation and the fitted attributes: choose the training rows,
split off the validation rows, build and check the networks, and run both stages."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._batch import StageBatch
from ._contracts import check_contracts
from ._distributions import reparameterize
from ._modules import (
    TRUNK_CACHE_BYTES,
    Decoder,
    JNFModule,
    UnimodalEncoder,
    frozen_inference,
    stage1_loss,
    stage2_expert_rows,
    stage2_noise_dim,
    stage2_row_counts,
    stage2_terms,
)
from ._posteriors import joint_posterior
from ._ridge import ridge_loo
from ._routing import choose_subset_routes, choose_target_routes, clear_gain, subsets_by_size
from ._spec import ModelSpec, build_module
from ._training import STAGES, StageModule, train_stage
from ._validation import Layout, ModalityData
from ._warnings import user_stacklevel

__all__ = [
    "ACTIVITY_THRESHOLD",
    "TrainingSettings",
    "latent_activity",
    "training_rows",
    "split_rows",
    "build_checked_module",
    "train_both_stages",
]


@dataclass(frozen=True)
class TrainingSettings:
    """The estimator parameters the two stages read."""

    joint_epochs: int
    flow_epochs: int
    lr: float
    beta: float
    expert_weight_decay: float
    batch_size: int
    early_stopping: bool
    n_posterior_samples: int
    verbose: int


def training_rows(data: ModalityData, layout: Layout) -> tuple[dict, np.ndarray | None]:
    """The blocks fit trains on (every row) and their observed mask, None when every row is complete.

    A row observing no modality, or a modality observed in fewer than two rows, is an error; two
    modalities never observed in the same row get a warning (nothing ties their latents together
    but the other modalities).
    """
    observed = data.observed
    empty = np.flatnonzero(~observed.any(axis=1))
    if len(empty):
        raise ValueError(
            f"Row(s) {empty[:10].tolist()} observe no modality (every block missing or all-NaN); fit needs "
            "at least one observed modality per row: drop these rows."
        )
    for name, count in zip(layout.names, observed.sum(axis=0)):
        if count < 2:
            raise ValueError(
                f"Modality {name!r} is observed in {int(count)} row(s) (n_samples = {data.n_samples}); "
                "fit needs at least 2."
            )
    together = observed.T.astype(np.int64) @ observed.astype(np.int64)
    for a, b in zip(*np.nonzero(np.triu(together == 0, k=1))):
        warnings.warn(
            f"Modalities {layout.names[a]!r} and {layout.names[b]!r} are never observed in the same row: "
            "their relation is learned only through the other modalities.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return dict(data.blocks), None if observed.all() else observed


def training_row_counts(observed: np.ndarray, names: Sequence[str]) -> dict:
    """Rows each part of the model learned from (training and validation rows together)."""
    several = observed.sum(axis=1) >= 2  # experts learn from rows observing another modality too
    counts = {
        "joint": int(observed.any(axis=1).sum()),
        "experts": {name: int(n) for name, n in zip(names, observed[several].sum(axis=0))},
    }
    if len(names) >= 3:
        counts["subset"] = int((observed.sum(axis=1) >= 2).sum())
    return counts


def split_rows(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows), sorted; no validation rows when the fraction leaves none."""
    n_valid = math.ceil(validation_fraction * n)
    if n_valid == 0 or n - n_valid < 1:
        if validation_fraction > 0:
            warnings.warn(
                f"validation_fraction={validation_fraction} leaves no validation set for {n} "
                "rows; the best epoch is chosen by training loss.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def build_checked_module(spec: ModelSpec, blocks: dict, observed: np.ndarray, train_rows, seed: int) -> JNFModule:
    """The networks, started from each modality's observed training rows and probed on two of them;
    the encoders clip inputs to each feature's range over all observed rows."""
    train_observed = observed[train_rows]
    train_blocks = {}
    for j, name in enumerate(spec.names):
        train_blocks[name] = blocks[name][train_rows][torch.from_numpy(train_observed[:, j])]
        if len(train_blocks[name]) == 0:
            raise ValueError(
                f"Modality {name!r} is observed only in validation rows; observe it in more rows or "
                "lower validation_fraction."
            )
    # every row fit was given, validation rows included: none of the user's own rows is clipped
    ranges = []
    for j, name in enumerate(spec.names):
        rows = blocks[name][torch.from_numpy(observed[:, j])]
        ranges.append((rows.amin(0), rows.amax(0)))
    module = build_module(spec, train_blocks, seed, ranges)
    check_contracts(module, {m: x[:2] for m, x in train_blocks.items()})
    return module


def train_both_stages(
    module: JNFModule,
    spec: ModelSpec,
    train: StageBatch,
    valid: StageBatch | None,
    settings: TrainingSettings,
    seeds,
    device,
) -> dict:
    """Stage 1, then stage 2 with the joint part frozen; returns ``{"joint": ..., "flows": ...}`` histories.

    ``train`` / ``valid`` are their rows' blocks and observed mask, on ``device``; the joint
    part's ``requires_grad`` flags are restored however training ends.
    """
    joint_params = [p for part in module.joint_parts() for p in part.parameters()]
    history = {}
    try:
        for stage, epochs, seed in (
            ("joint", settings.joint_epochs, seeds[0]),
            ("flows", settings.flow_epochs, seeds[1]),
        ):
            if epochs == 0:
                warnings.warn(
                    f"{STAGES[stage]} runs for 0 epochs: its networks stay at initialisation.",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
            if stage == "flows":  # freeze before the first stage-2 forward (docs/algorithm.md §2.2)
                for p in joint_params:
                    p.requires_grad_(False)
                    p.grad = None
            history[stage] = _train_stage(module, stage, spec, train, valid, epochs, seed, settings, device)
            if stage == "joint":
                shares = shrink_decoders(module, train, valid, seed)
                if shares:
                    history["joint"]["decoder_shares"] = shares
                scales = calibrate_auto_scales(module, spec, valid if valid is not None else train, seed)
                if scales:
                    history["joint"]["calibrated_scales"] = scales
    finally:
        for p in joint_params:
            p.requires_grad_(True)
    return history


#: A latent dimension is active when its joint posterior mean varies over the rows by more than this
#: (in units of the prior's variance; Burda et al. 2016, "Importance weighted autoencoders", §5.2).
ACTIVITY_THRESHOLD = 0.01


def latent_activity(module: JNFModule, data: StageBatch) -> np.ndarray:
    """Per latent dimension, the variance over ``data``'s rows of the joint posterior mean: near 0
    for a dimension the model does not use (its posterior is the prior whatever the row)."""
    with frozen_inference(module):
        mean, _ = joint_posterior(module, data.blocks, data.observed)
    return mean.double().var(0, correction=0).cpu().numpy() if len(mean) else np.zeros(module.latent_dim)


def _train_stage(module, stage, spec, train, valid, epochs, seed, settings: TrainingSettings, device) -> dict:
    shuffle_seed, noise_seed, valid_seed = np.random.SeedSequence(seed).generate_state(3)
    noise_generator = torch.Generator(device=device).manual_seed(int(noise_seed))
    if stage == "joint":
        rescale, beta = spec.rescale, float(settings.beta)

        def part_losses(m, b, e, active):
            return [stage1_loss(m, b.blocks, e, rescale, beta, b.observed)]

        parts, noise_dim, part_rows = [module.joint_parts()], module.latent_dim, None
    else:

        def part_losses(m, b, e, active):
            experts, subset = stage2_terms(m, b, e, active=active)
            return list(experts.values()) + ([subset] if m.subset_encoder is not None else [])

        def part_rows(b):
            return stage2_row_counts(b.observed, len(b), len(parts))

        parts, noise_dim = module.stage2_parts(), stage2_noise_dim(module)
        train = _with_joint_posterior(module, train)
        valid = None if valid is None else _with_joint_posterior(module, valid)
        module.set_aggregate_posterior(train.joint_mean, train.joint_log_var)
        set_linear_paths(module, train, torch.Generator(device=device).manual_seed(int(valid_seed) + 3))
    if valid is not None:
        fixed = torch.Generator(device=device).manual_seed(int(valid_seed))
        valid = valid.replace(noise=torch.randn(len(valid), noise_dim, generator=fixed, device=device))
    history = train_stage(
        StageModule(module, part_losses, parts, noise_generator, STAGES[stage], noise_dim, part_rows),
        train,
        valid,
        epochs=epochs,
        lr=settings.lr,
        weight_decay=0.0 if stage == "joint" else float(settings.expert_weight_decay),
        # the subset posterior is not decayed: on small data it then fell behind single views
        undecayed_parts=(len(parts) - 1,) if stage == "flows" and module.subset_encoder is not None else (),
        batch_size=settings.batch_size,
        early_stopping=settings.early_stopping,
        shuffle_generator=torch.Generator().manual_seed(int(shuffle_seed)),
        verbose=settings.verbose,
    )
    if stage == "flows" and valid is not None and module.subset_encoder is not None:
        rows = at_most(valid, MAX_SELECTION_ROWS, torch.Generator(device=device).manual_seed(int(valid_seed) + 2))
        with frozen_inference(module):  # the choices live in the module's buffers (fitted_choices)
            choose_subset_routes(module, rows, rows.noise)
            choose_target_routes(module, rows.blocks, rows.observed, settings.n_posterior_samples, int(valid_seed))
    part_epochs, part_losses_best = history.pop("part_best_epochs"), history.pop("part_best_losses")
    if stage == "flows" and valid is not None and part_epochs:
        # Each expert's calibration: mean held-out −log q_j(z | x_j) at its kept epoch.
        labels = list(module.names) + (["subset"] if module.subset_encoder is not None else [])
        history["expert_valid_loss"] = dict(zip(module.names, part_losses_best))
        history["expert_best_epoch"] = dict(zip(module.names, part_epochs))
        if module.subset_encoder is not None:
            history["subset_valid_loss"], history["subset_best_epoch"] = part_losses_best[-1], part_epochs[-1]
        if settings.verbose:
            kept = ", ".join(f"{label} {e} ({v:.2f})" for label, e, v in zip(labels, part_epochs, part_losses_best))
            print(f"{STAGES[stage]}: kept epoch (held-out -log q) per part: {kept}")
    return history


#: Shares of each default decoder's nonlinear part tried after stage 1 (see ``shrink_decoders``).
DECODER_SHARES = np.linspace(0.0, 1.0, 11)
#: A decoder is shrunk only for a validation gain beyond this many standard errors of the per-row
#: gain over keeping it as trained.
SHRINK_STANDARD_ERRORS = 1.0


def shrink_decoders(module: JNFModule, train: StageBatch, valid: StageBatch | None, seed: int) -> dict[str, float]:
    """Shrink each default decoder towards its best linear approximation by the share of its
    nonlinear part that the validation rows support; returns ``{modality: share}``.

    g(z) ← L(z) + s (g(z) − L(z)): L is the least-squares linear fit of g over draws of the
    training rows' joint posterior (the inputs g was trained on), and s in ``DECODER_SHARES``
    maximises the validation rows' mean log p(x_m | z) over ``CALIBRATION_DRAWS`` draws of their
    joint posterior (1 keeps the decoder as trained, 0 makes it linear), taken below 1 only for a
    gain beyond ``SHRINK_STANDARD_ERRORS`` standard errors of the per-row gain over keeping it.
    Folded into the weights (:meth:`Decoder.shrink`), so predictions, sampling and pickles see it.

    Why: on 1,000 rows the MLP's nonlinear part fits the training rows' noise. On a linear-Gaussian
    table (true latent 4, ``latent_dim=8``) held-out reconstruction went from 1.07-1.08 of the
    Bayes floor to 1.03-1.04 and the held-out log-likelihood rose by 0.6 nats a row (seeds 0-2);
    fitting L at the posterior means instead (where ``predict`` decodes) gave 1.02-1.03 but cost
    up to 7.5 nats, since g was trained on draws, which a mean-fitted L over-amplifies. Without
    the standard-error rule digits6 took shares of 0.8-0.9 on noise and lost 1.4 nats a row on
    average (seeds 0-2; with it 0.26, against gains of 14 on the 40-row table and 2-3 on the
    spectra and small-wide tables).
    """
    if valid is None:
        return {}
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed) + 5)
    train = at_most(train, MAX_LINEAR_PATH_ROWS // CALIBRATION_DRAWS, generator)
    valid = at_most(valid, MAX_SELECTION_ROWS, generator)
    kept, shares = int(np.argmin(np.abs(DECODER_SHARES - 1.0))), {}  # the share keeping g as trained
    with frozen_inference(module):
        z_train, z_valid = (
            reparameterize(*joint_posterior(module, data.blocks, data.observed), _draws(len(data), module, generator))
            for data in (train, valid)
        )
        z_train = z_train.flatten(0, 1)
        design = torch.cat([z_train, torch.ones_like(z_train[:, :1])], 1).double().cpu()
        for j, (name, decoder) in enumerate(zip(module.names, module.decoders)):
            if not isinstance(decoder, Decoder) or decoder.skip is None:
                continue
            rows = slice(None) if valid.observed is None else valid.observed[:, j]
            x, z = valid.blocks[name][rows], z_valid[:, rows]
            if not len(x):
                continue
            out = module.natural_parameters(j, z_train).double().cpu()
            coef = torch.linalg.lstsq(design, out, driver="gelsd").solution.float().to(device)  # (D + 1, d)
            weight, bias = coef[:-1].T, coef[-1]
            g, linear = module.natural_parameters(j, z), F.linear(z, weight, bias)
            likelihood = module.likelihoods[j]
            row_scores = torch.stack(
                [likelihood.log_prob(x, linear + s * (g - linear)).mean(0) for s in DECODER_SHARES]
            )
            best = int(row_scores.mean(1).argmax())
            if not clear_gain(row_scores[best] - row_scores[kept], SHRINK_STANDARD_ERRORS):
                best = kept
            share = round(float(DECODER_SHARES[best]), 2)
            decoder.shrink(weight, bias, share)
            shares[name] = share
    return shares


def _draws(n: int, module: JNFModule, generator: torch.Generator) -> Tensor:
    """Standard normal noise for ``CALIBRATION_DRAWS`` draws of ``n`` rows' posterior."""
    return torch.randn(CALIBRATION_DRAWS, n, module.latent_dim, generator=generator, device=generator.device)


#: Joint-posterior draws per row when the "auto" scales are calibrated after stage 1.
CALIBRATION_DRAWS = 8
#: Most rows the scale calibration and the choice of routes read (a random subset beyond that).
#: The target routes cost 2^M - 2 posterior means of ``n_posterior_samples`` draws over these rows:
#: 1.4 s for digits6's 135 validation rows, so about 100 s (M = 6) to 7 min (M = 8) for 10,000.
MAX_SELECTION_ROWS = 2048


def at_most(data: StageBatch, max_rows: int, generator: torch.Generator) -> StageBatch:
    """``data`` itself with at most ``max_rows`` rows, else a random subset of that many."""
    if len(data) <= max_rows:
        return data
    return data.rows(torch.randperm(len(data), generator=generator, device=generator.device)[:max_rows])


def calibrate_auto_scales(module: JNFModule, spec: ModelSpec, data: StageBatch, seed: int) -> dict[str, float]:
    """Set each "auto" scale (normal, laplace) to its maximum-likelihood value on ``data`` (the
    validation rows, else the training rows), from the residuals of the trained decoders at
    ``CALIBRATION_DRAWS`` draws of the joint posterior; returns ``{modality: scale}``.

    Stage 1 trains with a wide fixed scale (half the RMS feature std), which keeps the latent
    informative (see ``likelihood_scale``) but makes p(x | z) far wider than the decoders' errors:
    on a linear-Gaussian table the held-out log-likelihood was 7.8 nats per row below what the
    calibrated scale gives. Means, latents and predictions do not depend on it. Measured over the
    42 fits of ``benchmarks/incomplete_rows.py`` it raised the held-out log-likelihood in 35
    (all 14 linear-Gaussian ones, by 4-8 nats); it lowered it in 4 digit fits (by 2-10 nats: a
    few test rows far from the decoders' means weigh more under a sharper Gaussian) and in 3
    cancer fits (by under 0.6). Choosing between the training scale and the MLE by the
    validation rows' importance-weighted likelihood picked the MLE in those fits too, so the
    plain MLE stays.
    """
    names = [m for m, scale in zip(spec.names, spec.scales) if scale == "auto"]
    names = [m for m in names if hasattr(module.likelihoods[module.index(m)], "calibrate")]
    if not names:
        return {}
    scales = {}
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed) + 1)
    data = at_most(data, MAX_SELECTION_ROWS, generator)  # bounds memory: (draws, rows, features) residuals
    blocks, observed = data.blocks, data.observed
    with frozen_inference(module):
        mean, log_var = joint_posterior(module, blocks, observed)
        z = reparameterize(mean, log_var, _draws(len(mean), module, generator))
        for name in names:
            j = module.index(name)
            x, a = blocks[name], module.natural_parameters(j, z)
            if observed is not None:
                rows = observed[:, j]
                x, a = x[rows], a[:, rows]
            if len(x):
                scales[name] = module.likelihoods[j].calibrate(x, a)
    return scales


#: Most rows the closed-form linear paths of the experts are fitted on (a random subset beyond that):
#: the ridge's cost grows with rows x features², and the MLP beside the path learns from every row.
MAX_LINEAR_PATH_ROWS = 8192
#: Ridge penalties tried by leave-one-out cross-validation, relative to the mean eigenvalue of the
#: inputs' centred Gram matrix (so the grid follows the data's units and width).
RIDGE_ALPHAS = np.logspace(-6, 2, 17)


def set_linear_paths(module: JNFModule, data: StageBatch, generator: torch.Generator) -> None:
    """Set the closed-form linear paths: each default expert encoder's, the ridge regression of the
    frozen joint posterior means on its (clipped) input over the rows that expert learns from;
    and, where the subset encoder has them, each subset S's, on the inputs of S over the rows
    observing S. Penalties are chosen by leave-one-out error, as ``RidgeCV`` does
    (:func:`~skjnf._ridge.ridge_loo`); custom encoders are left alone."""
    data = at_most(data, MAX_LINEAR_PATH_ROWS, generator)
    blocks, observed = data.blocks, data.observed
    has = None if observed is None else observed.cpu().numpy()
    target = data.joint_mean.double().cpu().numpy()
    inputs = [
        module.encoder_input(j, blocks[name]).flatten(1).double().cpu().numpy() for j, name in enumerate(module.names)
    ]
    expert_rows = None if observed is None else stage2_expert_rows(observed).cpu().numpy()
    for j, encoder in enumerate(module.encoders):
        if isinstance(encoder, UnimodalEncoder):
            rows = slice(None) if expert_rows is None else expert_rows[:, j]
            fitted = _ridge(inputs[j][rows], target[rows])
            if fitted is not None:
                encoder.set_linear_path(*(torch.as_tensor(a, dtype=torch.float32) for a in fitted))
    subset = module.subset_encoder
    if subset is None or not len(subset.linear_weight):
        return
    offsets = np.cumsum([0, *(x.shape[1] for x in inputs)])
    for bits, members in subsets_by_size(len(module.names)):
        if len(members) < 2:
            continue
        rows = slice(None) if has is None else has[:, members].all(1)
        fitted = _ridge(np.hstack([inputs[j][rows] for j in members]), target[rows])
        if fitted is not None:
            columns = torch.from_numpy(np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in members]))
            subset.set_linear_path(bits, columns, *(torch.as_tensor(a, dtype=torch.float32) for a in fitted))
    with torch.no_grad():  # the MLP's mean starts at zero: the subset posterior's mean at the linear map
        subset.head.mean.weight.zero_()
        subset.head.mean.bias.zero_()


def _ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(coefficients (D, d), intercept (D,)) of the ridge regression of y on x with its penalty
    among ``RIDGE_ALPHAS`` chosen by leave-one-out error (scikit-learn's ``RidgeCV``), or None
    with fewer than 3 rows."""
    if len(x) < 3:
        return None
    scale = max(float(((x - x.mean(0)) ** 2).sum()) / x.shape[1], 1e-12)
    coef, intercept, _ = ridge_loo(x, y, scale * RIDGE_ALPHAS)
    return coef, intercept


def _with_joint_posterior(module: JNFModule, data: StageBatch) -> StageBatch:
    """``data`` with what the frozen joint part gives its rows in every stage-2 step, computed
    once: the joint posterior (given what each row observes) and, for the subset posterior, the
    trunk features (where they take at most ``TRUNK_CACHE_BYTES``)."""
    with frozen_inference(module):
        mean, log_var = joint_posterior(module, data.blocks, data.observed)
        data = data.replace(joint_mean=mean, joint_log_var=log_var)
        if module.subset_encoder is not None:
            width = sum(readout.in_features for readout in module.subset_encoder.readouts)
            if len(mean) * width * mean.element_size() <= TRUNK_CACHE_BYTES:
                features = module.subset_trunk_features(module.subset_inputs(data.blocks))
                data = data.replace(trunk_features=torch.cat(features, dim=-1))
    return data
