"""JNFEstimator: Joint Normalizing Flows as a scikit-learn transformer."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from ._batch import StageBatch
from ._fitting import (
    ACTIVITY_THRESHOLD,
    TrainingSettings,
    build_checked_module,
    latent_activity,
    split_rows,
    train_both_stages,
    training_row_counts,
    training_rows,
)
from ._inference import Inference, InferenceSettings
from ._persistence import plain_state, resolve_device, restored_state
from ._posteriors import HMCSettings, HMCStats
from ._routing import fitted_choices
from ._spec import PARAMETER_CONSTRAINTS, model_spec
from ._validation import ARRAY, MAPPING, ModalityData, check_cond_mod, check_int, row_conditioning, validate_X

__all__ = ["JNFEstimator"]


def _seeds(random_state, n: int) -> list[int]:
    """n independent int seeds from ``random_state``; the global RNG is touched only when it is None."""
    base = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    return [int(s) for s in np.random.SeedSequence(base).generate_state(n)]


def _as_arrays(tensors: dict[str, torch.Tensor], dtype) -> dict[str, np.ndarray]:
    """Each tensor as a numpy array of ``dtype`` (the input's float type): one copy off the device."""
    return {m: x.cpu().numpy().astype(dtype, copy=False) for m, x in tensors.items()}


class JNFEstimator(TransformerMixin, BaseEstimator):
    """Joint Normalizing Flows: a multimodal VAE with flow-enriched unimodal posteriors.

    JNF learns one latent space shared by several modalities (views) of the same samples.
    Stage 1 trains a joint VAE on all modalities; stage 2 freezes it and trains one encoder per
    modality, enriched by a normalizing flow, to match the joint posterior. Any subset of
    modalities then gives a posterior: the joint encoder (all of them), one flow expert (one),
    or the subset posterior (the rest; see ``subset_posterior``). Between the stages each default
    decoder keeps only the share of its nonlinear part that the validation rows support
    (``history_["joint"]["decoder_shares"]``): on a thousand rows an MLP decoder otherwise fits
    the training rows' noise (linear-Gaussian reconstruction 1.07-1.08 → 1.03-1.04 of the Bayes floor;
    held-out log-likelihood +14 nats a row on a 40-row table; the digits keep theirs).

    Training on incomplete rows: ``fit`` uses every row that observes at least one modality.
    In stage 1 the joint encoder reads a missing modality as a learned vector in place of its
    trunk's features and the ELBO runs over the observed modalities only (a lower bound of
    log p(x_O)); complete rows go through exactly the complete-data encoder. In stage 2 expert j
    learns from every row observing j, its target the joint posterior given that row's observed
    modalities, q(z | x_O), on the rows observing j and at least one other (on a row with x_j
    alone the target would be the joint encoder's own Gaussian, which the flow exists to improve
    on); when modalities are missing at random this averages, over the unobserved ones, to the
    same target as complete rows give (the tower property). The subset posterior learns from
    random subsets of each row's observed modalities. Measured in
    ``benchmarks/incomplete_rows.py``.

    Parameters
    ----------
    modalities : dict, "prefix" or None, default=None
        For 2-D array or DataFrame input: ``{name: spec}``, spec an int width (consecutive
        columns in dict order), a list of column indices, or a list of column names.
        ``"prefix"`` groups DataFrame columns named ``"modality__column"`` (the names a
        ``ColumnTransformer`` gives with ``set_output(transform="pandas")``). ``None`` with 2-D
        input means one modality ``"x0"``. Leave ``None`` for dict / SliceDict input.
    latent_dim : int, default=10
        Dimension D of the shared latent space. At 10, a linear probe on the latent scored
        within 0.04 of one on PCA of the same size on every table measured (above it on the
        digits and cancer), and one view was predicted from another better than RidgeCV on the
        digits (``benchmarks/results/cross_modal.md``); larger sizes cost time (the six-view
        digits: 24 s at 10, 44 s at 32). If ``active_dims_`` equals ``latent_dim`` the model
        uses every dimension: compare larger sizes by ``score`` (e.g. ``GridSearchCV``); a
        prediction from many views that are near-linear maps of each other needs about as many
        dimensions as their shared rank (User Guide, "Choosing the size and the training
        settings").
    hidden_sizes : tuple of int, default=(256, 256)
        Widths of the encoder MLPs (and of the decoders, reversed, unless
        ``decoder_hidden_sizes`` is given). Beside each MLP sits a linear path (the joint
        encoder's mean from the inputs, each decoder from z, each expert's mean set by ridge
        regression): the MLPs learn what a linear map leaves (User Guide, "Concepts"). See the
        User Guide, "Choosing the size and the training settings", for how the training
        defaults were chosen.
    decoder_hidden_sizes : tuple of int or None, default=None
        Widths of the decoder MLPs, from the latent outwards; ``None`` uses ``hidden_sizes``
        reversed. A lighter decoder (e.g. ``(512,)``) trains faster and makes ``score``'s
        importance sampling cheaper.
    likelihood : str or dict, default="normal"
        Likelihood of each modality (a dict maps names to likelihoods; unnamed ones are normal):
        ``"normal"``, ``"laplace"``, ``"bernoulli"`` (0/1 data), ``"categorical"`` (one-hot
        columns, or one column of integer codes; ``predict`` returns the most probable category,
        ``predict_probabilities`` the probabilities), ``"poisson"`` or ``"negative_binomial"``
        (non-negative integer counts; the latter learns one dispersion per feature).
    likelihood_scale : float, "auto", "learn" or dict, default="auto"
        Standard deviation (normal) or scale (laplace). ``"auto"``: stage 1 trains with one fixed
        scale per modality, half the RMS standard deviation of its features (training rows);
        then the scale is set to its maximum-likelihood value on the validation rows
        (``history_["joint"]["calibrated_scales"]``), which ``score`` and
        ``sample(add_noise=True)`` use; latents and predictions do not depend on it.
        ``"learn"``: one scale per feature learned in stage 1, starting at the feature's
        standard deviation, floored at 1e-3 of it. A dict gives one of these per modality. See
        the User Guide, "Likelihoods and scales", for why ``"auto"`` is the default.
    rescale_likelihoods : bool or dict, default=True
        Weights of the stage-1 reconstruction terms: ``True`` weights each modality by
        (largest width / its width), so that each counts as much as the widest in the joint
        latent; ``False`` weights every feature alike (a modality then counts by its width); a
        dict gives the weights. ``score`` never uses them. See the User Guide, "Likelihoods and
        scales": unweighted, a small modality beside a wide one is left out of the latent.
    beta : float, default=1.0
        Weight of the KL term in stage 1.
    flow : {"maf", "realnvp"} or dict, default="maf"
        Flow of the unimodal posteriors; a dict maps modality names to a flow name or to a
        factory ``f(latent_dim=D)`` (or ``(f, kwargs)``) returning a module whose
        ``forward(z)`` gives ``(u, log|det du/dz|)`` and ``inverse(u)`` gives ``(z, log|det dz/du|)``,
        for z of shape (..., D) (unnamed modalities get "maf").
    n_flow_blocks : int, default=2
        Flow blocks per modality; 0 gives Gaussian experts.
    flow_hidden_sizes : tuple of int, default=(128, 128, 128)
        Hidden widths of each flow block's network.
    networks : dict or None, default=None
        Custom networks per modality: ``{name: {part: factory}}``, a factory being a callable
        (e.g. a ``torch.nn.Module`` class) or ``(callable, kwargs)``; parts left out use the
        MLPs of ``hidden_sizes``. ``"encoder"``: ``f(in_shape, latent_dim)``, a module mapping
        ``x`` of shape ``(n, *in_shape)`` to ``(mean, log_variance)``, each
        ``(n, latent_dim)``. ``"decoder"``: ``f(latent_dim, out_shape)``, mapping ``z`` of
        shape ``(..., latent_dim)`` to the likelihood's natural parameters
        ``(..., *out_shape)``. ``"trunk"``: ``f(in_shape)``, mapping ``x`` to features
        ``(n, width)`` for the joint encoder. Blocks may have any row shape (e.g. images
        ``(n, 1, 8, 8)``); default networks flatten them. The contract is checked on two rows
        at the start of ``fit``.
    joint_epochs, flow_epochs : int, default=100
        Most epochs of stage 1 (joint VAE) and stage 2 (experts and flows); with early stopping
        stages often end earlier.
    batch_size : int, default=128
        Rows per training step.
    lr : float, default=2e-3
        Adam learning rate of both stages.
    expert_weight_decay : float, default=1.0
        Decoupled weight decay (AdamW) of the stage-2 experts: it pulls their flows towards the
        identity they start from and their MLPs towards the closed-form linear path beside them
        (see the User Guide, "Concepts"). Without it the experts overfit the training rows'
        joint posteriors and their flows grow far tails.
    early_stopping : bool, default=True
        Stop a stage after 10 epochs (and at least 100 optimizer steps) in which no part
        improved on the validation rows; the best weights are restored either way.
    cond_mod : str, list of str or None, default=None
        Default conditioning modalities of transform and co; None uses every observed one.
    latent : {"mean", "sample"}, default="mean"
        What ``transform`` returns: the posterior mean or one posterior draw.
    subset_posterior : {"amortized", "product", "product_prior", "generative"}, default="amortized"
        The posterior given a subset of 2..M-1 modalities. ``"amortized"``: a subset encoder and
        a flow of its own, trained in stage 2 like the experts, or, where it predicted the other
        modalities better on the validation rows, the closed-form Gaussian product of the
        subset's linearised experts; ``fit`` also routes each subset (``transform``), and for up
        to 8 modalities each (subset, target) pair (``predict``), to the posterior of the smaller
        subset that did better on the validation rows (``subset_routes_``, ``target_routes_``,
        ``product_subsets_``).
        ``"product"``: the experts' product divided by a Gaussian fit of the joint encoder's
        aggregate posterior, sampled by HMC. ``"product_prior"``: the paper's product of experts
        divided by the prior N(0, I), by HMC. ``"generative"``: HMC on p(z) Π p(x_j | z). See
        the User Guide, "Concepts", for the measurements behind the default.
    n_mcmc_steps : int, default=20
        HMC iterations of the HMC ``subset_posterior`` options (the first half is burn-in).
    n_leapfrog : int, default=5
        Leapfrog steps per HMC iteration.
    step_size : "auto" or float, default="auto"
        HMC step: adapted per row during burn-in towards acceptance 0.75, or fixed.
    n_posterior_samples : int, default=2
        Posterior positions averaged per row for a posterior mean: for a flow posterior,
        draws in antithetic pairs ±ε of base noise (an odd count adds the base mean); for an
        HMC subset posterior, post-burn-in positions of
        ``ceil(n_posterior_samples / (n_mcmc_steps - n_mcmc_steps // 2))`` chains. One pair
        predicted as well as 200 draws on real tables, at a tenth of 20 draws' time (User
        Guide: "Training defaults").
    n_importance_samples : int, default=100
        Importance samples K of ``score_samples``.
    device : {"cpu", "cuda", "auto"}, default="cpu"
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation, the validation split, training noise and inference noise.
    verbose : int, default=0
        1 prints each stage's epochs (train / validation loss, skorch's log) and shows a
        progress bar during HMC; 2 adds a progress bar over each epoch's batches.

    Attributes
    ----------
    modality_names_ : list of str
    modality_dims_ : dict of str to int
    n_features_in_ : int
        Number of features seen in fit (all modalities).
    feature_names_in_ : ndarray of shape (``n_features_in_``,)
        Defined only when X is a DataFrame with string column names.
    module_ : torch.nn.Module
        The trained networks.
    history_ : dict
        ``{"joint": ..., "flows": ...}``, each a dict with ``"epochs"`` (a list of
        ``{"epoch", "train_loss", "valid_loss"}``, floats, per-row means), ``"best_epoch"`` (the
        1-based epoch whose weights were kept) and ``"monitor"`` (``"valid_loss"``, or
        ``"train_loss"`` when there is no validation set); ``"joint"`` also holds
        ``"calibrated_scales"`` (the "auto" likelihood scales set after stage 1) and
        ``"decoder_shares"`` (per modality, the share of its decoder's nonlinear part kept after
        stage 1, chosen on the validation rows; 0 leaves a linear decoder; absent without
        validation rows). Stage 2 keeps each part's own best epoch (each expert and the subset
        posterior have their own parameters) and, with a
        validation set, reports each expert's calibration: ``"expert_valid_loss"`` (mean
        held-out -log q_j(z | x_j) at the kept epoch, a dict by modality), ``"expert_best_epoch"``,
        and with three or more modalities ``"subset_valid_loss"`` and ``"subset_best_epoch"``;
        its epoch rows carry ``"part_losses"`` (one per part, in that order). Each part stops on
        its own after ``early_stopping``'s patience (its entry is then None): the stage's
        ``train_loss`` and ``valid_loss`` sum the parts still training.
    latent_activity_ : ndarray of shape (latent_dim,)
        Variance over the training rows of each dimension of the joint posterior mean (in units
        of the prior's variance): near 0 for a dimension the model does not use.
    active_dims_ : int
        Number of dimensions with ``latent_activity_`` above 0.01 (Burda et al.'s active units).
        Far below ``latent_dim``: the extra dimensions are unused and a smaller ``latent_dim``
        fits as well.
    subset_routes_, target_routes_, product_subsets_ : dict, dict, list
        The choices ``fit`` made for the subset posterior on the validation rows (properties
        read from ``module_``'s buffers): subsets ``transform`` routes to a smaller subset's
        posterior, targets ``predict`` decodes from a smaller subset's own posterior (one that
        predicted them better by more than a standard error of the validation rows' noise),
        subsets whose own posterior is the Gaussian product; empty with fewer than three
        modalities.
    n_training_rows_ : dict
        Rows each part learned from (training and validation rows): ``"joint"`` (stage 1: every
        row, each through the modalities it observes), ``"experts"`` (stage 2, per modality: the
        rows observing it and another modality) and, with three or more modalities, ``"subset"``
        (rows observing two or more).

    See Also
    --------
    sklearn.decomposition.PCA, sklearn.decomposition.FactorAnalysis

    References
    ----------
    .. [1] A. Senellart and S. Allassonnière, "Learning multimodal latent generative models
       with energy-based prior", arXiv:2502.03952; "Improving multimodal joint variational
       autoencoders through normalizing flows and correlation analysis", arXiv:2305.11832.

    Examples
    --------
    >>> import numpy as np
    >>> from skjnf import JNFEstimator
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(200, 2))
    >>> X = {"a": z @ rng.normal(size=(2, 5)), "b": z @ rng.normal(size=(2, 3))}
    >>> jnf = JNFEstimator(latent_dim=2, hidden_sizes=(32,), joint_epochs=5, flow_epochs=5,
    ...                    random_state=0).fit(X)
    >>> jnf.transform(X).shape
    (200, 2)
    >>> jnf.transform({"b": X["b"]}).shape
    (200, 2)
    """

    _parameter_constraints: dict = PARAMETER_CONSTRAINTS

    def __init__(
        self,
        *,
        modalities=None,
        latent_dim=10,
        hidden_sizes=(256, 256),
        decoder_hidden_sizes=None,
        likelihood="normal",
        likelihood_scale="auto",
        rescale_likelihoods=True,
        beta=1.0,
        flow="maf",
        n_flow_blocks=2,
        flow_hidden_sizes=(128, 128, 128),
        networks=None,
        joint_epochs=100,
        flow_epochs=100,
        batch_size=128,
        lr=2e-3,
        expert_weight_decay=1.0,
        validation_fraction=0.1,
        early_stopping=True,
        cond_mod=None,
        latent="mean",
        subset_posterior="amortized",
        n_mcmc_steps=20,
        n_leapfrog=5,
        step_size="auto",
        n_posterior_samples=2,
        n_importance_samples=100,
        device="cpu",
        random_state=None,
        verbose=0,
    ):
        self.modalities = modalities
        self.latent_dim = latent_dim
        self.hidden_sizes = hidden_sizes
        self.decoder_hidden_sizes = decoder_hidden_sizes
        self.likelihood = likelihood
        self.likelihood_scale = likelihood_scale
        self.rescale_likelihoods = rescale_likelihoods
        self.beta = beta
        self.flow = flow
        self.n_flow_blocks = n_flow_blocks
        self.flow_hidden_sizes = flow_hidden_sizes
        self.networks = networks
        self.joint_epochs = joint_epochs
        self.flow_epochs = flow_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.expert_weight_decay = expert_weight_decay
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.cond_mod = cond_mod
        self.latent = latent
        self.subset_posterior = subset_posterior
        self.n_mcmc_steps = n_mcmc_steps
        self.n_leapfrog = n_leapfrog
        self.step_size = step_size
        self.n_posterior_samples = n_posterior_samples
        self.n_importance_samples = n_importance_samples
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Run stage 1 (joint VAE) then stage 2 (unimodal experts with flows).

        Parameters
        ----------
        X : dict of array-like of shape (n_samples, n_features_m), or array-like of shape \
                (n_samples, n_features)
            The modalities. A row may miss modalities (all-NaN in their columns); every row
            that observes at least one is used (see "Training on incomplete rows" above).
        y : None
            Ignored.

        Returns
        -------
        self : JNFEstimator
        """
        validated = validate_X(X, layout=None, modalities=self.modalities, name=type(self).__name__)
        layout, data = validated.layout, validated.data
        blocks, observed = training_rows(data, layout)
        spec = model_spec(self.get_params(), layout, blocks, observed)
        device = resolve_device(self.device)
        init_seed, split_seed, seed1, seed2, inference_seed = _seeds(self.random_state, 5)
        train_rows, valid_rows = split_rows(data.n_samples, self.validation_fraction, split_seed)
        module = build_checked_module(spec, blocks, data.observed, train_rows, init_seed).to(device)
        # incomplete rows: the observed mask travels with the blocks
        rows = StageBatch(blocks, None if observed is None else torch.from_numpy(observed))
        train = rows.rows(train_rows).to(device)
        valid = rows.rows(valid_rows).to(device) if len(valid_rows) else None
        history = train_both_stages(module, spec, train, valid, self._training_settings(), (seed1, seed2), device)
        activity = latent_activity(module, train)
        # from now on an inference object, frozen once: eval mode (user networks may hold dropout or
        # batch norm) and no parameter requiring gradients, so inference only adds torch.no_grad()
        # and never writes on the module (several threads may share it)
        module.eval().requires_grad_(False)
        # Fitted state is assigned only now: a failed (re)fit leaves the previous one intact.
        self._layout, self._spec, self._device = layout, spec, device
        self._inference_seed = inference_seed
        self.modality_names_ = list(layout.names)
        self.modality_dims_ = dict(zip(layout.names, layout.dims))
        self.n_features_in_ = validated.n_features_in
        if validated.feature_names_in is not None:
            self.feature_names_in_ = validated.feature_names_in
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.n_training_rows_ = training_row_counts(data.observed, layout.names)
        self.history_ = history
        self.latent_activity_ = activity
        self.active_dims_ = int((activity > ACTIVITY_THRESHOLD).sum())
        self.module_ = module
        return self

    def _training_settings(self) -> TrainingSettings:
        return TrainingSettings(
            joint_epochs=self.joint_epochs,
            flow_epochs=self.flow_epochs,
            lr=self.lr,
            beta=self.beta,
            expert_weight_decay=self.expert_weight_decay,
            batch_size=self.batch_size,
            early_stopping=self.early_stopping,
            n_posterior_samples=self.n_posterior_samples,
            verbose=self.verbose,
        )

    # ------------------------------------------------------------ inference
    def _conditioning(self, cond_mod) -> np.ndarray:
        """Boolean mask over modalities from ``cond_mod`` (call argument, else the parameter)."""
        return check_cond_mod(self.cond_mod if cond_mod is None else cond_mod, self.modality_names_)

    def _inference(self, random_state=None) -> Inference:
        """The inference object of one call (HMC chains sized for ``n_posterior_samples``)."""
        seed = self._inference_seed if random_state is None else _seeds(random_state, 1)[0]
        hmc = HMCSettings.for_mean(self.n_posterior_samples, self.n_mcmc_steps, self.n_leapfrog, self.step_size)
        settings = InferenceSettings(
            self.n_posterior_samples, self.n_importance_samples, self.subset_posterior, hmc, seed, self.verbose > 0
        )
        return Inference(self.module_, settings)

    def _validated(self, X) -> ModalityData:
        check_is_fitted(self)
        return validate_X(X, layout=self._layout, fitted=self, name=type(self).__name__).data

    def _row_conditioning(self, data: ModalityData, cond_mod) -> np.ndarray:
        """(n, M) mask of the modalities each row is conditioned on: observed and requested."""
        return row_conditioning(data.observed, self._conditioning(cond_mod), self.modality_names_)

    def _latents(self, X, cond_mod, n_draws, random_state=None) -> tuple[ModalityData, np.ndarray, HMCStats]:
        """Posterior means (n, D) or ``n_draws`` draws (n_draws, n, D) of X's rows given ``cond_mod``,
        in X's float dtype, and the call's HMC diagnostics (already warned about)."""
        data = self._validated(X)
        inference = self._inference(random_state)
        z = inference.latents(data, self._row_conditioning(data, cond_mod), n_draws)
        inference.stats.warn()
        return data, z.cpu().numpy().astype(data.dtype, copy=False), inference.stats

    def transform(self, X, cond_mod=None):
        """Latent representation of each row, given its observed conditioning modalities.

        Parameters
        ----------
        X : dict of array-like, or array-like of shape (n_samples, n_features)
            Missing modalities are absent keys or all-NaN rows of a block.
        cond_mod : str, list of str or None, default=None
            Modalities to condition on (intersected with those observed in each row).

        Returns
        -------
        Z : ndarray of shape (n_samples, latent_dim)
            Posterior mean (``latent="mean"``) or one posterior draw (``latent="sample"``).
        """
        n_draws = None if self.latent == "mean" else 1
        _, z, _ = self._latents(X, cond_mod, n_draws)
        return z if n_draws is None else z[0]

    def sample_latent(self, X, n_samples=1, cond_mod=None, random_state=None, return_diagnostics=False):
        """Posterior draws of the latent for each row.

        Parameters
        ----------
        X : dict of array-like, or array-like of shape (n_rows, n_features)
        n_samples : int, default=1
            Draws per row.
        cond_mod : str, list of str or None, default=None
        random_state : int, RandomState instance or None, default=None
        return_diagnostics : bool, default=False
            Also return the HMC diagnostics of the call (the HMC ``subset_posterior`` options).

        Returns
        -------
        Z : ndarray of shape (n_samples, n_rows, latent_dim)
        diagnostics : dict
            Only with ``return_diagnostics=True``: ``"acceptance"`` and ``"step_size"`` (means over
            the rows that ran HMC; None if none did), ``"n_divergent"`` (post-burn-in divergent
            trajectories) and ``"escaped_rows"`` (rows whose chains ended outside [-10, 10]^D).
        """
        n_samples = check_int(n_samples, "n_samples")
        _, z, stats = self._latents(X, cond_mod, n_samples, random_state)
        return (z, stats.as_dict()) if return_diagnostics else z

    def predict(self, X, cond_mod=None):
        """Reconstruct every modality from the conditioning ones (imputes missing modalities).

        Parameters
        ----------
        X : dict of array-like, or array-like of shape (n_samples, n_features)
            As in ``transform``: missing modalities are the ones imputed.
        cond_mod : str, list of str or None, default=None
            As in ``transform``.

        Returns
        -------
        X_pred : same container type as X
            Decoder means at the posterior-mean latent of each row: given the row's conditioning
            set S (S's own posterior), or, for a target that a subset of S predicted better on
            the validation rows in ``fit`` (``target_routes_``), given that subset.
        """
        data, decoded = self._predictions(X, cond_mod, "predict")
        return data.container.rebuild(decoded, self._layout)

    def _predictions(self, X, cond_mod, output: str, names=None) -> tuple[ModalityData, dict[str, np.ndarray]]:
        """Each modality's ``output`` decoded at the posterior mean that predicts it
        (``Inference.predictions``), in X's float dtype."""
        data = self._validated(X)
        inference = self._inference()
        conditioning = self._row_conditioning(data, cond_mod)
        decoded = inference.predictions(data, conditioning, output, names or self.modality_names_)
        inference.stats.warn()
        return data, _as_arrays(decoded, data.dtype)

    def inverse_transform(self, Z):
        """Decode latents into every modality: the point prediction of each likelihood at z.

        ``inverse_transform(transform(X))`` equals ``predict(X)`` for the default ``latent="mean"``
        (with ``cond_mod``, for the targets that use S's own posterior; see ``predict``).

        Parameters
        ----------
        Z : array-like of shape (n_samples, latent_dim)

        Returns
        -------
        X_decoded : dict or ndarray
            A dict of (n_samples, width) arrays by modality, or one (n_samples, n_features_in_)
            array when fitted on 2-D input.
        """
        check_is_fitted(self)
        Z = check_array(Z, dtype=[np.float32, np.float64])
        if Z.shape[1] != self.latent_dim:
            raise ValueError(f"Z has {Z.shape[1]} columns; JNFEstimator's latent_dim is {self.latent_dim}.")
        decoded = self._inference().decode(torch.from_numpy(np.ascontiguousarray(Z)), "predict", self.modality_names_)
        return self._fitted_container().rebuild(_as_arrays(decoded, Z.dtype), self._layout)

    def _fitted_container(self):
        """The container of fit's input: a dict, or one 2-D array."""
        return MAPPING if self._layout.columns is None else ARRAY

    def predict_probabilities(self, X, cond_mod=None):
        """Probabilities of the bernoulli and categorical modalities, given the conditioning ones.

        Parameters
        ----------
        X : dict of array-like, or array-like of shape (n_samples, n_features)
        cond_mod : str, list of str or None, default=None
            Modalities to condition on (intersected with those observed in each row).

        Returns
        -------
        probabilities : dict of str to ndarray
            For each bernoulli modality, P(x_f = 1) of shape (n_samples, n_features_m); for each
            categorical one, the category probabilities of shape (n_samples, n_categories),
            at the posterior-mean latent of each row.
        """
        check_is_fitted(self)
        names = [m for m, d in zip(self.modality_names_, self._spec.likelihoods) if d in ("bernoulli", "categorical")]
        if not names:
            raise ValueError(
                "predict_probabilities needs a bernoulli or categorical modality; likelihoods are "
                f"{dict(zip(self.modality_names_, self._spec.likelihoods))}."
            )
        return self._predictions(X, cond_mod, "probabilities", names)[1]

    def sample(self, n_samples=1, X=None, cond_mod=None, random_state=None, add_noise=False):
        """Generate data: from the prior (X None) or conditioned on X's modalities.

        Parameters
        ----------
        n_samples : int, default=1
        X : dict of array-like, array-like or None, default=None
        cond_mod : str, list of str or None, default=None
        random_state : int, RandomState instance or None, default=None
        add_noise : bool, default=False
            Draw from the likelihood instead of returning its mean.

        Returns
        -------
        samples : dict or ndarray
            X None: n_samples joint draws, as a dict of (n_samples, width) arrays, or one
            (n_samples, n_features_in_) array when fitted on 2-D input. X given: arrays of shape
            (n_samples, n_rows, width) per modality (a dict), or (n_samples, n_rows, n_features_in_).
        """
        check_is_fitted(self)
        n_samples = check_int(n_samples, "n_samples")
        output = "sample" if add_noise else "mean"
        inference = self._inference(random_state)
        if X is None:
            generator = torch.Generator().manual_seed(inference.settings.seed)
            z = torch.randn(n_samples, self.latent_dim, generator=generator)
            dtype, container = np.float32, self._fitted_container()
        else:
            data = self._validated(X)
            z = inference.latents(data, self._row_conditioning(data, cond_mod), n_samples)
            inference.stats.warn()
            as_dict = self._layout.columns is None or data.container.kind == "mapping"
            dtype, container = data.dtype, MAPPING if as_dict else ARRAY
        decoded = inference.decode(z, output, self.modality_names_, seed=inference.settings.seed + 1)
        return container.rebuild(_as_arrays(decoded, dtype), self._layout)

    def score_samples(self, X, cond_mod=None):
        """Estimated log-likelihood of each row.

        Parameters
        ----------
        X : dict of array-like, or array-like of shape (n_samples, n_features)
            Rows may miss modalities: each row is scored on what it observes.
        cond_mod : str, list of str or None, default=None
            None: importance-weighted log p(x_O) of each row's observed modalities O, with
            ``n_importance_samples`` draws from the joint posterior (complete rows) or from the flow
            posterior given O (the others; the subset posterior and its routes, or one expert).
            Given: log p(x_T | x_S), S = cond_mod and T = the other modalities (each intersected
            with what the row observes), a Monte Carlo average over ``n_importance_samples``
            posterior draws given x_S; a row observing no modality of T scores 0.

        Returns
        -------
        log_likelihood : ndarray of shape (n_samples,)
        """
        data = self._validated(X)
        inference = self._inference()
        if cond_mod is None:
            self._row_conditioning(data, None)  # a row observing nothing is an error naming it
            return inference.log_likelihood(data).cpu().numpy()
        conditioning = self._conditioning(cond_mod)
        if conditioning.all():
            raise ValueError("cond_mod names every modality; nothing is left to score.")
        self._row_conditioning(data, cond_mod)
        log_p = inference.log_likelihood(data, conditioning)
        inference.stats.warn()
        return log_p.cpu().numpy()

    def score(self, X, y=None):
        """Mean estimated log-likelihood of the rows (higher is better).

        Parameters
        ----------
        X : dict of array-like, or array-like of shape (n_samples, n_features)
            Rows may miss modalities (see ``score_samples``).
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X)))

    def get_feature_names_out(self, input_features=None):
        """Names of the latent coordinates, ``jnf0`` to ``jnf{latent_dim-1}``.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            Ignored (the output names do not depend on the input's).

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self)
        return np.asarray([f"jnf{i}" for i in range(self.latent_dim)], dtype=object)

    # ------------------------------------------------------- fitted choices
    @property
    def subset_routes_(self) -> dict:
        """``{"a+b+c": "a+c"}``: the subsets whose ``transform`` uses a smaller subset's posterior
        (or one expert's), chosen in ``fit`` on the validation rows (``subset_posterior="amortized"``)."""
        return self._fitted_choices()["subset_routes"]

    @property
    def target_routes_(self) -> dict:
        """``{"a+b": {"c": "a"}}``: per conditioning set, the targets ``predict`` decodes from a
        smaller subset's posterior mean, chosen in ``fit`` on the validation rows."""
        return self._fitted_choices()["target_routes"]

    @property
    def product_subsets_(self) -> list:
        """``["a+b"]``: the subsets whose posterior is the Gaussian product of their experts."""
        return self._fitted_choices()["product_subsets"]

    def _fitted_choices(self) -> dict:
        check_is_fitted(self)  # NotFittedError is an AttributeError: hasattr() is False before fit
        return fitted_choices(self.module_)

    # ---------------------------------------------------------- persistence
    def __getstate__(self):
        return plain_state(super().__getstate__(), getattr(self, "module_", None))

    def __setstate__(self, state):
        parameters = inspect.signature(type(self).__init__).parameters
        defaults = {k: p.default for k, p in parameters.items() if k != "self"}
        super().__setstate__(restored_state(state, defaults))

    def __sklearn_is_fitted__(self):
        return hasattr(self, "module_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # NaN is accepted only as whole missing modalities, not anywhere: allow_nan stays False.
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
