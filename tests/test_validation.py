"""Bad input gets a clear error that names what and where; odd but valid input works."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from _helpers import small_jnf

QUICK = dict(joint_epochs=2, flow_epochs=2)


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    return {"a": z @ rng.normal(size=(2, 4)), "b": z @ rng.normal(size=(2, 3))}


@pytest.fixture(scope="module")
def model():
    return small_jnf(**QUICK).fit(_data())


@pytest.mark.parametrize(
    "X, match",
    [
        ({}, "empty mapping"),
        ({"a": np.zeros((0, 3)), "b": np.zeros((0, 2))}, "Modality 'a'.*0 sample"),
        ({"a": np.zeros((5, 3)), "b": np.zeros((4, 2))}, "same number of rows.*'a': 5, 'b': 4"),
        ({"a": np.ones(5), "b": np.ones((5, 2))}, "Modality 'a' must be an array of shape"),
        ({"a": np.array([["x", "y"]] * 5), "b": np.ones((5, 2))}, "Modality 'a'"),
        ({"a": np.ones((5, 2)) + 1j, "b": np.ones((5, 2))}, "Modality 'a'.*[Cc]omplex"),
        ({"a": np.full((5, 2), np.inf), "b": np.ones((5, 2))}, "Modality 'a'.*infinity"),
        ({"a": np.c_[np.full(5, np.nan), np.ones(5)], "b": np.ones((5, 2))}, "Modality 'a' has NaN in only part"),
        ({"a": np.ones((1, 2)), "b": np.ones((1, 2))}, "Modality .a. is observed in 1 row.*at least 2"),
        ({1: np.ones((5, 2))}, "keys of X\\) must be strings"),
    ],
)
def test_bad_fit_input_names_the_problem(X, match):
    with pytest.raises((ValueError, TypeError), match=match):
        small_jnf(**QUICK).fit(X)


def test_any_string_names_a_modality():
    """Catches a modality name colliding with what training carries beside the blocks (the noise,
    the observed mask, the frozen joint posterior): such names were once reserved."""
    rng = np.random.default_rng(0)
    X = {"__noise__": rng.normal(size=(40, 2)), "__observed__": rng.normal(size=(40, 3))}
    model = small_jnf(**QUICK).fit(X)
    assert model.transform(X).shape == (40, model.latent_dim)
    assert model.predict({"__noise__": X["__noise__"]})["__observed__"].shape == (40, 3)


def test_sparse_input_is_a_type_error():
    with pytest.raises(TypeError, match="sparse"):
        small_jnf(**QUICK).fit(sp.csr_matrix(np.ones((5, 3))))
    with pytest.raises(TypeError, match="Modality 'a': sparse"):
        small_jnf(**QUICK).fit({"a": sp.csr_matrix(np.ones((5, 3))), "b": np.ones((5, 1))})


def test_bad_transform_input(model):
    X = _data()
    with pytest.raises(ValueError, match=r"Unknown modality 'c'.*\['a', 'b'\]"):
        model.transform({**X, "c": X["a"]})
    with pytest.raises(ValueError, match="Modality 'b' has 2 features, but JNFEstimator is expecting 3"):
        model.transform({"a": X["a"], "b": X["b"][:, :2]})
    with pytest.raises(ValueError, match=r"Unknown modality 'z' in cond_mod; known modalities are \['a', 'b'\]"):
        model.transform(X, cond_mod="z")
    with pytest.raises(ValueError, match=r"Row\(s\) \[1\] observe none"):
        model.transform({"a": np.r_[X["a"][:1], np.full((1, 4), np.nan)]})
    with pytest.raises(TypeError, match="fitted on a mapping"):
        model.transform(np.ones((3, 7)))
    with pytest.raises(ValueError, match=r"Row\(s\) \[1\] observe none of the conditioning modalities \['a'\]"):
        model.score_samples({"a": np.r_[X["a"][:1], np.full((1, 4), np.nan)], "b": X["b"][:2]}, cond_mod="a")


def test_missing_modality_at_transform_is_conditioned_out(model):
    X = _data()
    np.testing.assert_array_equal(model.transform({"b": X["b"]}), model.transform(X, cond_mod="b"))
    with_nan = {"a": np.full_like(X["a"], np.nan), "b": X["b"]}
    np.testing.assert_array_equal(model.transform(with_nan), model.transform({"b": X["b"]}))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"likelihood": {"c": "normal"}}, r"likelihood names unknown modality 'c'"),
        ({"likelihood": {"a": "poissonish"}}, "likelihood for modality 'a' must be one of"),
        ({"likelihood_scale": {"b": -1.0}}, "likelihood_scale for modality 'b' must be a float > 0"),
        ({"likelihood_scale": 0.0}, "likelihood_scale"),
        ({"rescale_likelihoods": {"a": 0.0}}, "positive"),
        ({"hidden_sizes": (8, 0)}, "hidden_sizes must be a sequence of positive ints"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"n_mcmc_steps": 0}, "n_mcmc_steps"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"likelihood": {"a": "bernoulli"}}, "Modality 'a' uses likelihood='bernoulli' and must hold only 0 and 1"),
    ],
)
def test_bad_parameters_fail_in_fit(params, match):
    estimator = small_jnf(**QUICK, **params)  # __init__ never validates
    with pytest.raises(ValueError, match=match):
        estimator.fit(_data())
    assert not hasattr(estimator, "module_")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        small_jnf(**QUICK, device="cuda").fit(_data())


@pytest.mark.parametrize(
    "modalities, match",
    [
        ({"a": 4, "b": 4}, r"refers to columns .* X has 7 features"),
        ({"a": 3, "b": 3}, r"Columns \[6\] belong to no modality"),
        ({"a": [0, 1, 2, 3], "b": [3, 4, 5, 6]}, r"Columns \[3\] belong to several"),
        ({"a": ["a0"], "b": 6}, "needs a pandas DataFrame"),
        ({"a": 0, "b": 7}, "width must be >= 1"),
        ({"a": "0:3", "b": 4}, "spec must be an int width"),
    ],
)
def test_bad_modalities_spec(modalities, match):
    array = np.hstack(list(_data().values()))
    with pytest.raises((ValueError, TypeError), match=match):
        small_jnf(**QUICK, modalities=modalities).fit(array)


def test_unknown_column_name():
    frame = pd.DataFrame(np.hstack(list(_data().values())), columns=list("abcdefg"))
    with pytest.raises(ValueError, match=r"Modality 'x': columns \['zz'\] are not in X's columns"):
        small_jnf(**QUICK, modalities={"x": ["zz"], "y": list("abcdefg")}).fit(frame)


def test_incomplete_rows_are_used_and_counted():
    X = _data()
    X["b"][:5] = np.nan
    jnf = small_jnf(**QUICK).fit(X)
    # stage 1 learns from all 40 rows; the experts from the 35 that observe both modalities
    assert jnf.n_training_rows_ == {"joint": 40, "experts": {"a": 35, "b": 35}}
    z = jnf.transform(X)  # rows without b are conditioned on a alone
    np.testing.assert_array_equal(z[:5], jnf.transform({"a": X["a"][:5]}))


def test_rows_observing_nothing_are_named():
    X = _data()
    X["a"][[3, 7]] = np.nan
    X["b"][[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"Row\(s\) \[3, 7\] observe no modality"):
        small_jnf(**QUICK).fit(X)


def test_modalities_never_observed_together_warn():
    rng = np.random.default_rng(0)
    X = {m: rng.normal(size=(30, 2)) for m in "abc"}
    X["a"][15:] = np.nan
    X["b"][:15] = np.nan
    with pytest.warns(UserWarning, match="'a' and 'b' are never observed in the same row"):
        small_jnf(**QUICK).fit(X)


def test_odd_but_valid_shapes():
    rng = np.random.default_rng(0)
    one_feature = {"a": rng.normal(size=(30, 1)), "b": rng.normal(size=(30, 1))}
    z = small_jnf(**QUICK, latent_dim=5).fit(one_feature).transform(one_feature)  # latent > features
    assert z.shape == (30, 5) and np.isfinite(z).all()
    constant = {"a": np.ones((30, 3)), "b": rng.normal(size=(30, 2))}
    jnf = small_jnf(**QUICK).fit(constant)
    assert np.isfinite(jnf.score_samples(constant)).all()
    assert np.abs(jnf.predict(constant)["a"] - 1.0).max() < 0.2  # decoders start at the data mean


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_dtype_is_preserved(dtype):
    X = {m: x.astype(dtype) for m, x in _data().items()}
    jnf = small_jnf(**QUICK).fit(X)
    assert jnf.transform(X).dtype == dtype
    assert jnf.predict(X)["a"].dtype == dtype
    assert jnf.sample_latent(X, 2).dtype == dtype


def test_integer_input_becomes_float64():
    X = {m: np.round(x * 10).astype(np.int64) for m, x in _data().items()}
    assert small_jnf(**QUICK).fit(X).transform(X).dtype == np.float64


def test_read_only_memmap_input(tmp_path):
    X = {}
    for name, block in _data().items():
        path = tmp_path / f"{name}.npy"
        np.save(path, block)
        X[name] = np.load(path, mmap_mode="r")
    jnf = small_jnf(**QUICK).fit(X)
    assert np.isfinite(jnf.transform(X)).all()


def test_refit_gives_a_fresh_model():
    X = _data()
    jnf = small_jnf(**QUICK).fit(X)
    first = jnf.transform(X)
    jnf.fit({m: x[::-1].copy() for m, x in X.items()})
    jnf.fit(X)
    np.testing.assert_array_equal(jnf.transform(X), first)
