"""JNFImputer: fill whole missing modality blocks of one table with JNF's cross-modal predictions."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, StrOptions
from sklearn.utils.validation import _get_feature_names, check_is_fitted

from ._estimator import JNFEstimator
from ._validation import Container, resolve_layout, validate_X

__all__ = ["JNFImputer"]


def _table_values(X) -> np.ndarray:
    """A float64 copy of a 2-D table's values (array, pandas or polars DataFrame)."""
    if sp.issparse(X):
        raise TypeError(
            f"JNFImputer does not accept sparse input (got {type(X).__name__}); pass a dense array or a DataFrame."
        )
    if type(X).__module__.startswith("polars"):
        X = X.to_numpy()
    values = np.asarray(X)
    if np.iscomplexobj(values):
        raise ValueError("Complex data not supported: JNFImputer needs real values.")
    return np.array(values, dtype=np.float64, copy=True)


def _take_rows(X, rows: np.ndarray):
    """Rows of a 2-D table, in its own container (so that its column names travel with them)."""
    if hasattr(X, "iloc"):
        return X.iloc[rows]
    if type(X).__module__.startswith("polars"):
        return X[rows.tolist()]
    return np.asarray(X)[rows]


class JNFImputer(TransformerMixin, BaseEstimator):
    """Fill the missing modality blocks of a table with JNF's predictions from the observed ones.

    The table's columns are grouped into modalities (``modalities``, every form
    :class:`JNFEstimator` accepts); a modality is missing in a row when all of its values there
    are NaN. ``fit`` trains JNF on the incomplete table (every row observing at least one
    modality is used); ``transform`` returns the table with each missing block replaced by the
    model's prediction given what that row observes, observed values untouched, in the same
    container and column order. It sits where ``IterativeImputer`` or ``KNNImputer`` sit in a
    ``Pipeline``. See the User Guide section "Missing modalities and imputation".

    Parameters
    ----------
    modalities : dict, "prefix" or None, default=None
        ``{name: spec}``, spec an int width (consecutive columns), a list of column indices or
        a list of column names; ``"prefix"`` groups DataFrame columns named ``"modality__column"``.
        Passed on to the estimator. None makes the whole table one modality, which leaves nothing
        to impute from (it exists for scikit-learn's generic checks).
    estimator : JNFEstimator or None, default=None
        The model (unfitted; cloned in ``fit``), as ``IterativeImputer`` takes ``estimator=``:
        its parameters are tuned as ``estimator__latent_dim`` and so on. None uses
        ``JNFEstimator()`` at its defaults. Its ``modalities`` and ``random_state`` are set
        from this imputer's.
    sample_posterior : bool, default=False
        False: each missing block is the prediction at the posterior mean (``predict``). True:
        one draw of the posterior predictive per call (a latent drawn given the observed
        modalities, then the likelihood's noise), for multiple imputation: successive calls give
        new draws, the sequence fixed by ``random_state``.
    add_indicator : bool, default=False
        Append one column per modality: 1.0 where that modality was missing, else 0.0.
    partial_nan : {"impute", "error"}, default="impute"
        NaN in only part of a modality's columns in a row (a few cells, not the whole block).
        ``"impute"``: JNF reads those cells as their column's training mean, and they are filled
        with the model's reconstruction of that row (one step of iterative imputation; the
        whole-block predictions use the same pass). ``"error"``: a ``ValueError`` naming the
        modality and rows, as :class:`JNFEstimator` raises.
    random_state : int, RandomState instance or None, default=None
        Seeds the estimator and the draws of ``sample_posterior``.

    Attributes
    ----------
    estimator_ : JNFEstimator
        The fitted model.
    modality_names_ : list of str
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (``n_features_in_``,)
        Defined only when X has string column names.

    random_state_ : RandomState instance
        Draws the seeds of ``sample_posterior``'s successive calls.
    column_means_ : ndarray of shape (``n_features_in_``,)
        Each column's mean over its observed training values (what ``partial_nan="impute"``
        reads a missing cell as).

    Notes
    -----
    JNF conditions on whole modalities: a block with a few NaN cells is still observed, so with
    ``partial_nan="impute"`` the column means stand in for those cells while the latent is
    inferred, and the cells are then filled from the reconstruction. That is the right tool for
    scattered cells; whole missing blocks are where JNF's cross-modal prediction helps.

    See Also
    --------
    JNFEstimator, sklearn.impute.IterativeImputer, sklearn.impute.KNNImputer

    Examples
    --------
    >>> import numpy as np
    >>> from skjnf import JNFEstimator, JNFImputer
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(200, 2))
    >>> X = np.hstack([z @ rng.normal(size=(2, 4)), z @ rng.normal(size=(2, 3))])
    >>> X[:20, 4:] = np.nan  # the second modality is missing in 20 rows
    >>> small = JNFEstimator(latent_dim=2, hidden_sizes=(16,), joint_epochs=3, flow_epochs=3)
    >>> imputer = JNFImputer(modalities={"a": 4, "b": 3}, estimator=small, random_state=0)
    >>> X_filled = imputer.fit_transform(X)
    >>> bool(np.isnan(X_filled).any()), bool((X_filled[20:] == X[20:]).all())
    (False, True)
    """

    _parameter_constraints: dict = {
        "modalities": [None, dict, StrOptions({"prefix"})],
        "estimator": [None, HasMethods(["fit", "predict", "sample"])],
        "sample_posterior": ["boolean"],
        "add_indicator": ["boolean"],
        "partial_nan": [StrOptions({"impute", "error"})],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        modalities=None,
        *,
        estimator=None,
        sample_posterior=False,
        add_indicator=False,
        partial_nan="impute",
        random_state=None,
    ):
        self.modalities = modalities
        self.estimator = estimator
        self.sample_posterior = sample_posterior
        self.add_indicator = add_indicator
        self.partial_nan = partial_nan
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Train JNF on the incomplete table.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
            Missing modalities are all-NaN in their columns.
        y : None
            Ignored.

        Returns
        -------
        self : JNFImputer
        """
        random_state = check_random_state(self.random_state)
        estimator = clone(JNFEstimator() if self.estimator is None else self.estimator)
        seed = int(random_state.randint(np.iinfo(np.int32).max))
        estimator.set_params(modalities=self.modalities, random_state=seed)
        values, means = _table_values(X), None
        if values.ndim == 2 and values.size:  # else the estimator's validation says what is wrong
            _, columns = resolve_layout(self.modalities, values.shape[1], _get_feature_names(X))
            with warnings.catch_warnings():  # an all-NaN column: the estimator names its modality
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nanmean(values, axis=0)
            X = self._with_partial_cells_filled(X, values, columns, means)
        estimator.fit(X)
        self.column_means_ = means
        self.estimator_ = estimator
        self.modality_names_ = list(estimator.modality_names_)
        self.n_features_in_ = estimator.n_features_in_
        if hasattr(estimator, "feature_names_in_"):
            self.feature_names_in_ = estimator.feature_names_in_
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.random_state_ = random_state  # the sequence of sample_posterior's draws
        return self

    def transform(self, X):
        """X with every missing modality block filled from the row's observed modalities.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)

        Returns
        -------
        X_filled : same container as X, of shape (n_samples, n_features_out)
            Observed values as they were; ``add_indicator`` appends one column per modality.
        """
        check_is_fitted(self)
        estimator = self.estimator_
        X, values = self._partial_cells_read_as_means(X)
        # the estimator's own checks: feature names and count, partial NaN inside a block
        data = validate_X(X, layout=estimator._layout, fitted=estimator, name=type(estimator).__name__).data
        missing = ~data.observed
        empty = np.flatnonzero(missing.all(axis=1))
        if len(empty):
            raise ValueError(f"Row(s) {empty[:10].tolist()} observe no modality: there is nothing to impute them from.")
        cells = np.isnan(values)  # whole missing blocks and partial cells alike
        rows = np.flatnonzero(cells.any(axis=1))
        if len(rows):
            part = _take_rows(X, rows)
            if self.sample_posterior:
                seed = int(self.random_state_.randint(np.iinfo(np.int32).max))
                filled = np.asarray(estimator.sample(1, X=part, random_state=seed, add_noise=True))[0]
            else:
                filled = _table_values(estimator.predict(part))
            values[rows] = np.where(cells[rows], filled, values[rows])
        if self.add_indicator:
            values = np.hstack([values, missing.astype(np.float64)])
        return Container.of_table(X).table(values, self.get_feature_names_out())

    def _partial_cells_read_as_means(self, X):
        """(X with its partial NaN cells read as the training column means, its values as float64)."""
        values = _table_values(X)
        if values.ndim == 2 and values.shape[1] == self.n_features_in_:  # else validation names the fault
            X = self._with_partial_cells_filled(X, values, self.estimator_._layout.columns, self.column_means_)
        return X, values

    def _with_partial_cells_filled(self, X, values: np.ndarray, columns, means: np.ndarray):
        """X with the NaN cells of partly observed blocks read as ``means`` (``partial_nan="impute"``),
        in X's container; X itself when there are none, or with ``"error"`` (the estimator raises)."""
        partial = np.zeros(values.shape, dtype=bool)
        for cols in columns:
            nan = np.isnan(values[:, cols])
            partial[:, cols] = nan & ~nan.all(axis=1, keepdims=True)
        if self.partial_nan == "error" or not partial.any():
            return X
        return Container.of_table(X).table(np.where(partial, means, values))

    def score(self, X, y=None):
        """Mean held-out log-likelihood of each row's observed values (``JNFEstimator.score``).

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        return self.estimator_.score(self._partial_cells_read_as_means(X)[0])

    def get_feature_names_out(self, input_features=None):
        """The input's column names (``x0, x1, ...`` for arrays), then ``missingindicator_<modality>``
        per modality with ``add_indicator``.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            The input's names, checked against ``feature_names_in_``.

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self)
        from sklearn.utils.validation import _check_feature_names_in

        names = list(_check_feature_names_in(self, input_features))
        if self.add_indicator:
            names += [f"missingindicator_{m}" for m in self.modality_names_]
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        return tags
