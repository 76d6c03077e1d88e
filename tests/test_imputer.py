"""JNFImputer: filling missing modality blocks, in scikit-learn's imputer slot."""

import pickle
import warnings

import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from skjnf import JNFEstimator, JNFImputer

WIDTHS = {"a": 6, "b": 5, "c": 4}
SMALL = dict(latent_dim=2, hidden_sizes=(32,), flow_hidden_sizes=(16,), n_flow_blocks=1, n_posterior_samples=8)


def small_estimator(**params):
    return JNFEstimator(**{**SMALL, "joint_epochs": 40, "flow_epochs": 20, "lr": 1e-2, **params})


class LinearGaussian:
    """x = W z + 0.5 noise, z ~ N(0, I_2): E[x_missing | x_observed] in closed form."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.W = self.rng.normal(size=(sum(WIDTHS.values()), 2))
        self.cov = self.W @ self.W.T + 0.25 * np.eye(len(self.W))

    def draw(self, n):
        return self.rng.normal(size=(n, 2)) @ self.W.T + 0.5 * self.rng.normal(size=(n, len(self.W)))

    def conditional(self, x, observed, hidden):
        """E[x_hidden | x_observed] and the conditional covariance."""
        solve = np.linalg.solve(self.cov[np.ix_(observed, observed)], self.cov[np.ix_(observed, hidden)])
        return x[:, observed] @ solve, self.cov[np.ix_(hidden, hidden)] - self.cov[np.ix_(hidden, observed)] @ solve


def hide_blocks(X, fraction, seed=0):
    """A copy of X with one random modality block set to NaN in ``fraction`` of the rows."""
    rng = np.random.default_rng(seed)
    X = X.copy()
    bounds = np.cumsum([0, *WIDTHS.values()])
    rows = np.flatnonzero(rng.random(len(X)) < fraction)
    blocks = rng.integers(len(WIDTHS), size=len(rows))
    for row, j in zip(rows, blocks):
        X[row, bounds[j] : bounds[j + 1]] = np.nan
    return X


@pytest.fixture(scope="module")
def table():
    model = LinearGaussian()
    train, test = model.draw(600), model.draw(300)
    return model, hide_blocks(train, 0.3), test


@pytest.fixture(scope="module")
def imputer(table):
    _, train, _ = table
    return JNFImputer(WIDTHS, estimator=small_estimator(), random_state=0).fit(train)


def test_missing_blocks_are_filled_near_the_bayes_prediction_and_observed_values_kept(table, imputer):
    """Catches filling from the wrong rows or columns, or overwriting observed values: on a
    linear-Gaussian table the filled b blocks are within 1.25x of the Bayes MSE E[x_b | x_a, x_c]."""
    model, _, test = table
    hidden = np.arange(6, 11)  # modality b
    observed = np.setdiff1d(np.arange(15), hidden)
    X = test.copy()
    X[:, hidden] = np.nan
    filled = imputer.transform(X)
    np.testing.assert_array_equal(filled[:, observed], test[:, observed])
    bayes, _ = model.conditional(test, observed, hidden)
    mse, bayes_mse = ((filled[:, hidden] - test[:, hidden]) ** 2).mean(), ((bayes - test[:, hidden]) ** 2).mean()
    assert mse < 1.25 * bayes_mse, (mse, bayes_mse)
    np.testing.assert_array_equal(imputer.transform(test), test)  # nothing missing: nothing changes


def test_posterior_draws_cover_the_truth_and_follow_random_state(table, imputer):
    """Catches draws without the likelihood's noise (far too narrow) or a fixed seed per call: the
    central 90 % of 50 draws covers the true value 80-98 % of the time; calls differ, and the
    sequence of calls repeats with the same random_state."""
    _, train, test = table
    X = test[:100].copy()
    X[:, :6] = np.nan  # modality a
    sampler = clone(imputer).set_params(sample_posterior=True).fit(train)
    draws = np.stack([sampler.transform(X)[:, :6] for _ in range(50)])
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    coverage = ((test[:100, :6] >= low) & (test[:100, :6] <= high)).mean()
    assert 0.8 < coverage < 0.98, coverage
    assert not np.allclose(draws[0], draws[1])
    again = clone(imputer).set_params(sample_posterior=True).fit(train)
    np.testing.assert_array_equal(again.transform(X)[:, :6], draws[0])


def test_indicator_columns_and_feature_names(table, imputer):
    _, train, _ = table
    with_indicator = clone(imputer).set_params(add_indicator=True).fit(train)
    out = with_indicator.transform(train)
    missing = np.stack([np.isnan(train[:, lo:hi]).all(1) for lo, hi in ((0, 6), (6, 11), (11, 15))], axis=1)
    np.testing.assert_array_equal(out[:, 15:], missing.astype(float))
    names = list(with_indicator.get_feature_names_out())
    assert names[:2] == ["x0", "x1"] and names[15:] == [
        "missingindicator_a",
        "missingindicator_b",
        "missingindicator_c",
    ]


@pytest.mark.parametrize("kind", ["pandas", "polars"])
def test_dataframes_round_trip_with_their_columns(table, kind):
    """pandas and polars in, the same container, columns and order out; set_output is honoured."""
    _, train, test = table
    columns = [f"{m}__{k}" for m, w in WIDTHS.items() for k in range(w)]
    frame = (pd.DataFrame if kind == "pandas" else pl.DataFrame)(dict(zip(columns, train.T)))
    imputer = JNFImputer("prefix", estimator=small_estimator(joint_epochs=2, flow_epochs=2), random_state=0)
    out = imputer.fit(frame).transform(frame)
    assert type(out) is type(frame) and list(out.columns) == columns
    assert not np.isnan(np.asarray(out, dtype=float)).any()
    target = "pandas" if kind == "polars" else "polars"
    converted = imputer.set_output(transform=target).transform(frame)
    assert type(converted) is (pd.DataFrame if target == "pandas" else pl.DataFrame)
    estimator = small_estimator(joint_epochs=2, flow_epochs=2, modalities="prefix").fit(frame)
    assert type(estimator.predict(frame)) is type(frame)  # JNFEstimator.predict keeps the container too
    assert type(estimator.set_output(transform=kind).transform(frame)) is type(frame)


def test_partial_nan_cells_are_filled_from_the_reconstruction_or_named_as_errors(imputer, table):
    """Catches scattered NaN cells left as the column means (or as NaN): filled from the model's
    reconstruction, they are closer to the truth than the means (on this table, below 0.6x the
    mean fill's MSE); with partial_nan="error" they are an error naming the modality and rows."""
    _, _, test = table
    rng = np.random.default_rng(1)
    X = test.copy()
    cells = rng.random(X.shape) < 0.1
    X[cells] = np.nan
    filled = imputer.transform(X)
    np.testing.assert_array_equal(filled[~cells], test[~cells])
    mse = ((filled[cells] - test[cells]) ** 2).mean()
    mean_fill = ((np.broadcast_to(imputer.column_means_, X.shape)[cells] - test[cells]) ** 2).mean()
    assert mse < 0.6 * mean_fill, (mse, mean_fill)
    assert np.isfinite(imputer.score(X))
    X = test[:10].copy()
    X[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"Modality 'a'.*row\(s\) \[3\]"):
        clone(imputer).set_params(partial_nan="error").fit(test).transform(X)
    X = test[:10].copy()
    X[4] = np.nan
    with pytest.raises(ValueError, match=r"Row\(s\) \[4\] observe no modality"):
        imputer.transform(X)


def test_pipeline_grid_search_clone_and_pickle(table):
    """In a Pipeline before a classifier; GridSearchCV on the unsupervised score (held-out
    log-likelihood of the observed values); clone and pickle keep the fitted imputer's output."""
    model, train, _ = table
    y = (model.draw(600)[:, 0] > 0).astype(int)  # any labels: the pipeline must run
    pipe = make_pipeline(
        JNFImputer(WIDTHS, estimator=small_estimator(joint_epochs=2, flow_epochs=2), random_state=0),
        LogisticRegression(),
    )
    assert pipe.fit(train, y).predict(train).shape == (600,)
    search = GridSearchCV(
        JNFImputer(WIDTHS, estimator=small_estimator(joint_epochs=2, flow_epochs=2), random_state=0),
        {"estimator__latent_dim": [1, 2]},
        cv=2,
    ).fit(train)
    assert np.isfinite(search.best_score_)
    fitted = search.best_estimator_
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fitted)).transform(train), fitted.transform(train))
    assert clone(fitted).get_params()["estimator__latent_dim"] == fitted.get_params()["estimator__latent_dim"]


def test_skops_round_trip(imputer, table):
    sio = pytest.importorskip("skops.io")
    _, train, _ = table
    dumped = sio.dumps(imputer)
    loaded = sio.loads(dumped, trusted=sio.get_untrusted_types(data=dumped))
    np.testing.assert_array_equal(loaded.transform(train), imputer.transform(train))


def test_imputer_defaults_work_without_an_estimator():
    X = LinearGaussian().draw(60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at the defaults either
        imputer = JNFImputer(WIDTHS, random_state=0)
        imputer.set_params(estimator=None)
        assert imputer.fit(hide_blocks(X, 0.3)).estimator_.get_params()["latent_dim"] == 10


def _check_estimator_imputer():
    estimator = JNFEstimator(latent_dim=2, hidden_sizes=(8,), flow_hidden_sizes=(8,), n_flow_blocks=1)
    return JNFImputer(estimator=estimator.set_params(joint_epochs=2, flow_epochs=2), random_state=0)


@parametrize_with_checks([_check_estimator_imputer()])
def test_sklearn_compatible_imputer(estimator, check):
    check(estimator)
