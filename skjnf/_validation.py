"""Turn every accepted X into one internal form: float blocks per modality plus an observed mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_array, validate_data

__all__ = [
    "Container",
    "Layout",
    "ModalityData",
    "Validated",
    "modalities_from_prefix",
    "resolve_layout",
    "validate_X",
    "check_cond_mod",
    "row_conditioning",
]

_FLOAT_DTYPES = (np.float64, np.float32)


@dataclass(frozen=True)
class Layout:
    """What `fit` learned about the modalities: names, widths and, for 2-D input, columns."""

    names: tuple[str, ...]
    dims: tuple[int, ...]
    columns: tuple[np.ndarray, ...] | None = None  # None when fitted on a mapping
    shapes: tuple[tuple[int, ...], ...] | None = None  # per-row block shapes; None: (dim,)

    def dim(self, name: str) -> int:
        return self.dims[self.names.index(name)]

    def shape(self, name: str) -> tuple[int, ...]:
        return (self.dim(name),) if self.shapes is None else self.shapes[self.names.index(name)]


@dataclass(frozen=True)
class Container:
    """The container the user passed, to give outputs back in: a mapping of modalities (``type``:
    dict, SliceDict, ...), a numpy array, or a pandas / polars DataFrame (``columns``, ``index``)."""

    kind: str  # "mapping", "array", "dataframe" or "polars"
    type: type | None = None
    columns: object = None
    index: object = None

    @classmethod
    def of_table(cls, X) -> Container:
        """The container of a 2-D table X."""
        if hasattr(X, "columns") and hasattr(X, "index"):
            return cls("dataframe", columns=X.columns, index=X.index)
        if type(X).__module__.startswith("polars"):
            return cls("polars", columns=list(X.columns))
        return cls("array")

    def table(self, values: np.ndarray, columns=None):
        """2-D ``values`` as the table kind the user passed (a pandas or polars DataFrame, with the
        input's column names unless ``columns`` are given), else as they are."""
        if values.ndim != 2 or self.kind not in ("dataframe", "polars"):
            return values
        columns = self.columns if columns is None else columns
        if self.kind == "dataframe":
            import pandas as pd

            return pd.DataFrame(values, columns=columns, index=self.index)
        import polars as pl

        return pl.DataFrame(values, schema=list(columns), orient="row")

    def rebuild(self, arrays: dict[str, np.ndarray], layout: Layout):
        """Per-modality outputs (rows last but one: (..., n, width)) back in this container; a
        DataFrame only for 2-D outputs."""
        if self.kind == "mapping":
            arrays = {m: x.reshape(*x.shape[:-1], *layout.shape(m)) for m, x in arrays.items()}
            for build in (lambda: self.type(arrays), lambda: self.type(**arrays)):  # dict-like, or SliceDict(**blocks)
                try:
                    return build()
                except TypeError:
                    pass
            return dict(arrays)
        first = next(iter(arrays.values()))
        out = np.empty((*first.shape[:-1], sum(layout.dims)), dtype=first.dtype)  # leading dims: draws, rows
        for modality, cols in zip(layout.names, layout.columns):
            out[..., cols] = arrays[modality]
        return self.table(out)


#: A plain dict of modalities, and a plain 2-D array: what outputs without an input container use.
MAPPING, ARRAY = Container("mapping", dict), Container("array")


@dataclass
class ModalityData:
    """Validated input: float32 tensors per present modality, and which rows observe what.

    Rows where a modality is missing hold zeros in its block (never NaN), so that a
    block can be fed to a network as a whole; ``observed`` says which rows are real.
    """

    blocks: dict[str, torch.Tensor]
    observed: np.ndarray  # (n_samples, n_modalities) bool, in layout order
    dtype: np.dtype
    container: Container = ARRAY  # how to give outputs back

    @property
    def n_samples(self) -> int:
        return self.observed.shape[0]


@dataclass(frozen=True)
class Validated:
    """What :func:`validate_X` returns: the layout (fit's, or the fitted one), the data, and what
    ``fit`` records of X (``n_features_in_``, ``feature_names_in_``; None after fit)."""

    layout: Layout
    data: ModalityData
    n_features_in: int | None = None
    feature_names_in: np.ndarray | None = None


class _FeatureRecord(BaseEstimator):
    """Where scikit-learn's ``validate_data`` records X's feature count and names at fit, instead
    of the estimator itself: a failed fit must leave the estimator as it was."""


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, if it is an integer (not a bool) >= ``minimum``; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def check_cond_mod(cond_mod, names) -> np.ndarray:
    """Boolean mask over modalities ``names`` from ``cond_mod`` (None: every modality); an empty or
    unknown name is a ValueError."""
    if cond_mod is None:
        return np.ones(len(names), dtype=bool)
    requested = [cond_mod] if isinstance(cond_mod, str) else list(cond_mod)
    if not requested:
        raise ValueError("cond_mod is an empty list; name at least one modality or pass None.")
    for name in requested:
        if name not in names:
            raise ValueError(f"Unknown modality {name!r} in cond_mod; known modalities are {list(names)}.")
    return np.isin(names, requested)


def row_conditioning(observed: np.ndarray, requested: np.ndarray, names) -> np.ndarray:
    """(n, M) mask of the modalities each row is conditioned on: observed and ``requested`` (M,);
    a row left with none is a ValueError naming it."""
    conditioning = observed & requested[None, :]
    empty = np.flatnonzero(~conditioning.any(axis=1))
    if len(empty):
        raise ValueError(
            f"Row(s) {empty[:10].tolist()} observe none of the conditioning modalities "
            f"{[n for n, c in zip(names, requested) if c]}."
        )
    return conditioning


def _describe(spec) -> str:
    return f"{type(spec).__name__} {spec!r}"


def resolve_layout(modalities, n_features: int, feature_names) -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    """Column indices of each modality of a 2-D input, from the ``modalities`` parameter.

    Every column must belong to exactly one modality.
    """
    if modalities is None:
        return ("x0",), (np.arange(n_features),)
    if isinstance(modalities, str) and modalities == "prefix":
        modalities = modalities_from_prefix(feature_names)
    if not isinstance(modalities, Mapping) or len(modalities) == 0:
        raise TypeError(
            "modalities must be None, 'prefix' or a non-empty dict {name: spec}, where spec is an int width, "
            f"a list of column indices or a list of column names; got {_describe(modalities)}."
        )
    names, columns, start = [], [], 0
    for name, spec in modalities.items():
        if not isinstance(name, str):
            raise TypeError(f"Modality names must be strings; got {_describe(name)}.")
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            if spec < 1:
                raise ValueError(f"Modality {name!r}: width must be >= 1, got {spec}.")
            idx = np.arange(start, start + int(spec))
            start += int(spec)
        elif isinstance(spec, Sequence) and not isinstance(spec, str) or isinstance(spec, np.ndarray):
            idx = _columns_from_list(name, list(spec), feature_names)
        else:
            raise TypeError(
                f"Modality {name!r}: spec must be an int width, a list of column indices or a list of "
                f"column names; got {_describe(spec)}."
            )
        if len(idx) and (idx.min() < 0 or idx.max() >= n_features):
            raise ValueError(f"Modality {name!r} refers to columns {idx.tolist()}, but X has {n_features} features.")
        names.append(name)
        columns.append(idx)
    used = np.concatenate(columns)
    counts = np.bincount(used, minlength=n_features)
    if (counts > 1).any():
        raise ValueError(f"Columns {np.flatnonzero(counts > 1).tolist()} belong to several modalities.")
    if (counts == 0).any():
        raise ValueError(
            f"Columns {np.flatnonzero(counts == 0).tolist()} belong to no modality; every column of X "
            "must be assigned to exactly one modality (select the others out first)."
        )
    return tuple(names), tuple(columns)


def modalities_from_prefix(columns) -> dict[str, list[str]]:
    """Group column names ``"name__column"`` by their prefix, as a ``ColumnTransformer`` names them.

    Examples
    --------
    >>> modalities_from_prefix(["rna__g1", "rna__g2", "protein__p1"])
    {'rna': ['rna__g1', 'rna__g2'], 'protein': ['protein__p1']}
    """
    if columns is None:
        raise ValueError(
            "modalities='prefix' needs a pandas DataFrame with column names 'modality__column' "
            "(e.g. a ColumnTransformer with set_output(transform='pandas'))."
        )
    groups: dict[str, list[str]] = {}
    for column in columns:
        prefix, sep, _ = str(column).partition("__")
        if not sep:
            raise ValueError(
                f"Column {column!r} has no 'modality__' prefix; modalities='prefix' needs one on every column."
            )
        groups.setdefault(prefix, []).append(column)
    return groups


def _columns_from_list(name: str, spec: list, feature_names) -> np.ndarray:
    if len(spec) == 0:
        raise ValueError(f"Modality {name!r}: the column list is empty.")
    if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in spec):
        return np.asarray(spec, dtype=np.intp)
    if all(isinstance(c, str) for c in spec):
        if feature_names is None:
            raise ValueError(
                f"Modality {name!r} is given by column names, which needs a pandas DataFrame with string column names."
            )
        position = {c: i for i, c in enumerate(feature_names)}
        unknown = [c for c in spec if c not in position]
        if unknown:
            raise ValueError(f"Modality {name!r}: columns {unknown} are not in X's columns.")
        return np.asarray([position[c] for c in spec], dtype=np.intp)
    raise TypeError(f"Modality {name!r}: columns must be all ints or all strings; got {spec!r}.")


def _check_block(name: str, block, estimator_name: str, dtype=_FLOAT_DTYPES) -> np.ndarray:
    try:
        return check_array(
            block,
            dtype=dtype,
            ensure_all_finite="allow-nan",
            ensure_min_samples=1,
            input_name=name,
            estimator=estimator_name,
        )
    except ValueError as error:
        raise ValueError(f"Modality {name!r}: {error}") from error


def _observed_rows(name: str, block: np.ndarray) -> np.ndarray:
    """Rows where the modality is observed; a partly-NaN row is an error."""
    nan = np.isnan(block)
    missing = nan.all(axis=1)
    partial = nan.any(axis=1) & ~missing
    if partial.any():
        rows = np.flatnonzero(partial)
        raise ValueError(
            f"Modality {name!r} has NaN in only part of its columns in row(s) {rows[:10].tolist()}"
            f"{' ...' if len(rows) > 10 else ''}. A modality is missing in a row only when all of its "
            "values are NaN; impute or remove partial NaN values first."
        )
    return ~missing


def _to_tensor(block: np.ndarray, observed: np.ndarray) -> torch.Tensor:
    values = np.where(observed[:, None], block, 0.0).astype(np.float32)
    return torch.from_numpy(values)


def validate_X(X, *, layout: Layout | None, modalities=None, fitted=None, name: str = "JNFEstimator") -> Validated:
    """Validate X (any accepted container).

    Fit (``layout`` None): the layout comes from X and ``modalities`` (the parameter), and the
    result records ``n_features_in`` and ``feature_names_in``. Afterwards X is checked against
    the fitted ``layout`` and, for 2-D input, against the feature count and names of ``fitted``
    (the fitted estimator, only read). ``name`` is the estimator's, for messages.
    """
    if sp.issparse(X):
        raise TypeError(
            f"{name} does not accept sparse input (got {type(X).__name__}); "
            "pass a dense array, a DataFrame or a dict of dense arrays."
        )
    if isinstance(X, Mapping):
        return _validate_mapping(name, X, layout, modalities)
    return _validate_2d(name, fitted, X, layout, modalities)


def _validate_2d(name: str, fitted, X, layout: Layout | None, modalities) -> Validated:
    checks = {"dtype": _FLOAT_DTYPES, "ensure_all_finite": "allow-nan", "estimator": name}
    if layout is None:
        record = _FeatureRecord()
        array = validate_data(record, X, reset=True, **checks)
        feature_names = getattr(record, "feature_names_in_", None)
        names, columns = resolve_layout(modalities, array.shape[1], feature_names)
        layout = Layout(names, tuple(len(c) for c in columns), columns)
        fit_record = (record.n_features_in_, feature_names)
    else:
        if layout.columns is None:
            raise TypeError(
                f"This {name} was fitted on a mapping of modalities {list(layout.names)}; "
                f"pass a dict (or SliceDict) with those keys, not {type(X).__name__}."
            )
        array = validate_data(fitted, X, reset=False, **checks)
        fit_record = (None, None)
    blocks, observed = {}, []
    for modality, cols in zip(layout.names, layout.columns):
        block = array[:, cols]
        rows = _observed_rows(modality, block)
        blocks[modality] = _to_tensor(block, rows)
        observed.append(rows)
    data = ModalityData(blocks, np.stack(observed, axis=1), array.dtype, Container.of_table(X))
    return Validated(layout, data, *fit_record)


def _validate_mapping(name: str, X: Mapping, layout: Layout | None, modalities) -> Validated:
    fit = layout is None
    if len(X) == 0:
        raise ValueError("X is an empty mapping; it needs at least one modality.")
    for key in X:
        if not isinstance(key, str):
            raise TypeError(f"Modality names (the keys of X) must be strings; got {_describe(key)}.")
    if fit:
        if modalities is not None and (not isinstance(modalities, Mapping) or set(modalities) != set(X)):
            raise ValueError(
                f"With a mapping X, leave modalities=None (the keys of X name the modalities); got "
                f"modalities with names {list(modalities) if isinstance(modalities, Mapping) else modalities!r} "
                f"and X with keys {list(X)}."
            )
        names = tuple(X)
    else:
        unknown = [k for k in X if k not in layout.names]
        if unknown:
            raise ValueError(
                f"Unknown modality {unknown[0]!r} in X; this {name} was fitted with modalities {list(layout.names)}."
            )
        names = layout.names
    arrays, n_rows, shapes = {}, {}, {}
    for modality in names:
        if modality not in X:
            continue
        block = X[modality]
        if sp.issparse(block):
            raise TypeError(f"Modality {modality!r}: sparse input is not supported; pass a dense array.")
        if np.ndim(block) < 2:
            raise ValueError(
                f"Modality {modality!r} must be an array of shape (n_samples, n_features) or "
                f"(n_samples, *shape); got shape {np.shape(block)}. Reshape a single feature with "
                "x.reshape(-1, 1)."
            )
        if np.ndim(block) > 2:  # e.g. images (n, channels, height, width): kept flat inside
            shapes[modality] = tuple(np.shape(block)[1:])
            block = np.reshape(np.asarray(block), (np.shape(block)[0], -1))
        else:
            shapes[modality] = (np.shape(block)[1],)
        arrays[modality] = _check_block(modality, block, name)
        n_rows[modality] = arrays[modality].shape[0]
    if len(set(n_rows.values())) > 1:
        raise ValueError(f"All modalities must have the same number of rows; got {n_rows}.")
    if fit:
        layout = Layout(names, tuple(arrays[m].shape[1] for m in names), shapes=tuple(shapes[m] for m in names))
    else:
        for modality, array in arrays.items():
            expected = layout.dim(modality)
            if shapes[modality] != layout.shape(modality) and len(layout.shape(modality)) > 1:
                raise ValueError(
                    f"Modality {modality!r} has rows of shape {shapes[modality]}, but {name} is "
                    f"expecting {layout.shape(modality)} for it."
                )
            if array.shape[1] != expected:
                raise ValueError(
                    f"Modality {modality!r} has {array.shape[1]} features, but {name} is expecting "
                    f"{expected} features as input for it."
                )
    n = next(iter(n_rows.values()))
    blocks, observed = {}, np.zeros((n, len(layout.names)), dtype=bool)
    for j, modality in enumerate(layout.names):
        if modality in arrays:
            observed[:, j] = _observed_rows(modality, arrays[modality])
            blocks[modality] = _to_tensor(arrays[modality], observed[:, j])
    dtype = np.result_type(*[a.dtype for a in arrays.values()])
    data = ModalityData(blocks, observed, dtype, Container("mapping", type(X)))
    return Validated(layout, data, sum(layout.dims) if fit else None)
