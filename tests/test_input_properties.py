"""Property-based tests of input handling (hypothesis): whatever a user passes, a call either
works, with output of the documented shape and dtype and no NaN in a row that observes
something, or raises a ValueError / TypeError naming the modality or the rows at fault; never an
error from inside torch or numpy."""

import re
import warnings

import numpy as np
import pandas as pd
import pytest
from _helpers import small_jnf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from skorch.helper import SliceDict

DTYPES = ("int64", "int8", "float16", "float32", "float64", "bool", "object")
CONTAINERS = ("dict", "slicedict", "array", "dataframe")
TINY = dict(latent_dim=2, hidden_sizes=(4,), flow_hidden_sizes=(4,), joint_epochs=1, flow_epochs=1, batch_size=8)
FITTED = {}  # one tiny fitted model per (widths, container), shared by the examples


@st.composite
def tables(draw, min_rows=0):
    """A random table: (blocks {name: ndarray}, container kind), some blocks NaN in whole or in part."""
    n_modalities = draw(st.integers(1, 3))
    names = [f"m{j}" for j in range(n_modalities)]
    widths = [draw(st.integers(1, 3)) for _ in names]
    n = draw(st.integers(min_rows, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    blocks = {}
    for name, width in zip(names, widths):
        dtype = draw(st.sampled_from(DTYPES))
        values = rng.normal(size=(n, width))
        if dtype == "bool":
            block = values > 0
        elif dtype.startswith("int"):
            block = np.round(3 * values).astype(dtype)
        else:
            block = values.astype("float64" if dtype == "object" else dtype)
            pattern = draw(st.sampled_from(("none", "whole", "partial", "all rows")))
            if n and pattern == "whole":
                block[rng.random(n) < 0.4] = np.nan
            elif n and pattern == "partial":
                block[rng.integers(n), rng.integers(width)] = np.nan
            elif pattern == "all rows":
                block[:] = np.nan
            if dtype == "object":
                block = block.astype(object)
        blocks[name] = block
    return blocks, draw(st.sampled_from(CONTAINERS))


def as_container(blocks, kind):
    if kind == "dict":
        return dict(blocks), None
    if kind == "slicedict":
        return SliceDict(**blocks), None
    columns = {m: [f"{m}__{k}" for k in range(x.shape[1])] for m, x in blocks.items()}
    array = np.hstack([np.asarray(x, dtype=np.float64) for x in blocks.values()])
    modalities = {m: x.shape[1] for m, x in blocks.items()}
    if kind == "dataframe":
        return pd.DataFrame(array, columns=sum(columns.values(), [])), columns
    return array, modalities


def observing(blocks) -> np.ndarray:
    """Rows observing at least one modality (a modality is missing where its row is all NaN)."""
    return np.any([~np.isnan(np.asarray(x, dtype=np.float64)).all(1) for x in blocks.values()], axis=0)


def check_error(error, blocks):
    """A ValueError / TypeError raised by skjnf or scikit-learn's validation, naming what is wrong."""
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    frames = [frame.filename for frame in _traceback_frames(error)]
    assert not any(re.search(r"[/\\](torch|numpy)[/\\]", f) for f in frames[-1:]), frames[-1:]
    message = str(error)
    named = [m for m in blocks if repr(m) in message or m in message]
    assert named or re.search(r"row|sample|modalit|feature|NaN", message, re.I), message


def _traceback_frames(error):
    import traceback

    return traceback.extract_tb(error.__traceback__)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_fit_works_or_names_what_is_wrong(table):
    blocks, kind = table
    X, modalities = as_container(blocks, kind)
    model = small_jnf(modalities=modalities, **TINY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X)
    except Exception as error:  # noqa: BLE001 -- the property is about which errors
        event(f"fit raised {type(error).__name__}")
        check_error(error, blocks)
        assert not hasattr(model, "module_")  # never half fitted
        return
    event("fit worked")
    z = model.transform(X)
    n = len(next(iter(blocks.values())))
    assert z.shape == (n, 2) and z.dtype in (np.float32, np.float64)
    assert np.isfinite(z).all()
    predicted = model.predict(X)
    arrays = predicted.values() if isinstance(predicted, (dict, SliceDict)) else [np.asarray(predicted)]
    assert all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in arrays)


def _fitted(widths, kind):
    key = (tuple(widths), kind)
    if key not in FITTED:
        rng = np.random.default_rng(0)
        blocks = {f"m{j}": rng.normal(size=(30, w)) for j, w in enumerate(widths)}
        X, modalities = as_container(blocks, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            FITTED[key] = small_jnf(modalities=modalities, **TINY).fit(X)
    return FITTED[key]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.booleans())
def test_inference_works_or_names_what_is_wrong(table, drop_a_modality):
    """transform / predict / score_samples on any table, given a model fitted on the same layout
    (a mapping may also leave a modality out)."""
    blocks, kind = table
    model = _fitted([x.shape[1] for x in blocks.values()], kind)
    if drop_a_modality and kind in ("dict", "slicedict") and len(blocks) > 1:
        blocks = dict(list(blocks.items())[1:])
    X, _ = as_container(blocks, kind)
    n = len(next(iter(blocks.values())))
    for call in (model.transform, model.predict, model.score_samples):
        try:
            out = call(X)
        except Exception as error:  # noqa: BLE001
            event(f"{call.__name__} raised {type(error).__name__}")
            check_error(error, blocks)
            continue
        event(f"{call.__name__} worked")
        rows = observing(blocks)
        if call is model.transform:
            assert out.shape == (n, 2) and out.dtype in (np.float32, np.float64)
            assert np.isfinite(out[rows]).all()
        elif call is model.score_samples:
            assert out.shape == (n,) and np.isfinite(out[rows]).all()
        else:
            arrays = out.values() if isinstance(out, (dict, SliceDict)) else [np.asarray(out)]
            assert all(np.isfinite(np.asarray(a, dtype=np.float64)[rows]).all() for a in arrays)


@pytest.mark.parametrize("kind", CONTAINERS)
def test_rows_observing_nothing_are_named(kind):
    """A row with every modality missing is an error naming it, at fit and at inference."""
    blocks = {"m0": np.ones((4, 2)), "m1": np.ones((4, 1))}
    blocks["m0"][2] = np.nan
    blocks["m1"][2] = np.nan
    X, modalities = as_container(blocks, kind)
    with pytest.raises(ValueError, match=r"Row\(s\) \[2\]"):
        small_jnf(modalities=modalities, **TINY).fit(X)
    model = _fitted([2, 1], kind)
    with pytest.raises(ValueError, match=r"[Rr]ow.*2"):
        model.transform(X)
