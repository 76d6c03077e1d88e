"""Turn every accepted X into one internal form: float blocks per modality plus an observed mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.utils.validation import check_array, validate_data

__all__ = [
    "Layout",
    "ModalityData",
    "modalities_from_prefix",
    "resolve_layout",
    "validate_X",
    "rebuild_container",
    "table_container",
    "as_table",
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


@dataclass
class ModalityData:
    """Validated input: float32 tensors per present modality, and which rows observe what.

    Rows where a modality is missing hold zeros in its block (never NaN), so that a
    block can be fed to a network as a whole; ``observed`` says which rows are real.
    """

    blocks: dict[str, torch.Tensor]
    observed: np.ndarray  # (n_samples, n_modalities) bool, in layout order
    dtype: np.dtype
    container: dict = field(default_factory=dict)  # how to rebuild the user's container

    @property
    def n_samples(self) -> int:
        return self.observed.shape[0]


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, if it is an integer (not a bool) >= ``minimum``; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


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


def validate_X(X, *, layout: Layout | None, modalities=None, estimator):
    """Validate X (any accepted container) and return ``(layout, ModalityData, info)``.

    Fit (``layout`` None): the layout comes from X and ``modalities`` (the parameter), and
    ``info`` holds ``n_features_in_`` and ``feature_names_in_``. Afterwards X is checked against
    the fitted ``layout``. ``estimator`` serves only scikit-learn's own checks of 2-D input
    (feature names and counts, against a throw-away clone at fit) and the messages' wording; it
    is never modified here.
    """
    if sp.issparse(X):
        raise TypeError(
            f"{type(estimator).__name__} does not accept sparse input (got {type(X).__name__}); "
            "pass a dense array, a DataFrame or a dict of dense arrays."
        )
    if isinstance(X, Mapping):
        return _validate_mapping(estimator, X, layout, modalities)
    return _validate_2d(estimator, X, layout, modalities)


def _validate_2d(estimator, X, layout: Layout | None, modalities):
    name = type(estimator).__name__
    if layout is None:
        # validate_data stores n_features_in_ / feature_names_in_ on the object it is given;
        # a throw-away clone keeps the real estimator untouched until fit succeeds.
        scratch = clone(estimator)
        array = validate_data(scratch, X, dtype=_FLOAT_DTYPES, ensure_all_finite="allow-nan", reset=True)
        feature_names = getattr(scratch, "feature_names_in_", None)
        names, columns = resolve_layout(modalities, array.shape[1], feature_names)
        layout = Layout(names, tuple(len(c) for c in columns), columns)
        info = {"n_features_in_": scratch.n_features_in_, "feature_names_in_": feature_names}
    else:
        if layout.columns is None:
            raise TypeError(
                f"This {name} was fitted on a mapping of modalities {list(layout.names)}; "
                f"pass a dict (or SliceDict) with those keys, not {type(X).__name__}."
            )
        array = validate_data(estimator, X, dtype=_FLOAT_DTYPES, ensure_all_finite="allow-nan", reset=False)
        info = {}
    blocks, observed = {}, []
    for modality, cols in zip(layout.names, layout.columns):
        block = array[:, cols]
        rows = _observed_rows(modality, block)
        blocks[modality] = _to_tensor(block, rows)
        observed.append(rows)
    data = ModalityData(blocks, np.stack(observed, axis=1), array.dtype, table_container(X))
    return layout, data, info


def _validate_mapping(estimator, X: Mapping, layout: Layout | None, modalities):
    name = type(estimator).__name__
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
        info = {"n_features_in_": sum(layout.dims), "feature_names_in_": None}
    else:
        info = {}
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
    container = {"kind": "mapping", "type": type(X)}
    return layout, ModalityData(blocks, observed, dtype, container), info


def rebuild_container(arrays: dict[str, np.ndarray], layout: Layout, container: dict):
    """Put per-modality outputs (rows last but one: (..., n, width)) back into the container type
    the user passed; a DataFrame only for 2-D outputs."""
    if container["kind"] == "mapping":
        arrays = {m: x.reshape(*x.shape[:-1], *layout.shape(m)) for m, x in arrays.items()}
        kind = container["type"]
        for build in (lambda: kind(arrays), lambda: kind(**arrays)):  # dict-like, or SliceDict(**blocks)
            try:
                return build()
            except TypeError:
                pass
        return dict(arrays)
    first = next(iter(arrays.values()))
    out = np.empty((*first.shape[:-1], sum(layout.dims)), dtype=first.dtype)  # leading dims: draws, rows
    for modality, cols in zip(layout.names, layout.columns):
        out[..., cols] = arrays[modality]
    return as_table(out, container)


def table_container(X) -> dict:
    """How to rebuild a 2-D table like X (:func:`as_table`): a pandas or polars DataFrame, or an array."""
    if hasattr(X, "columns") and hasattr(X, "index"):
        return {"kind": "dataframe", "columns": X.columns, "index": X.index}
    if type(X).__module__.startswith("polars"):
        return {"kind": "polars", "columns": list(X.columns)}
    return {"kind": "array"}


def as_table(values: np.ndarray, container: dict, columns=None):
    """2-D ``values`` as the table kind the user passed (a pandas or polars DataFrame, with the
    input's column names unless ``columns`` are given), else as they are."""
    if values.ndim != 2 or container["kind"] not in ("dataframe", "polars"):
        return values
    columns = container["columns"] if columns is None else columns
    if container["kind"] == "dataframe":
        import pandas as pd

        return pd.DataFrame(values, columns=columns, index=container["index"])
    import polars as pl

    return pl.DataFrame(values, schema=list(columns), orient="row")
