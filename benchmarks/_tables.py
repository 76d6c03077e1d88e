"""Real multi-view tables built from scikit-learn's datasets, standardised per feature.

Each table is cut into views the way a user would describe the data, split 75 / 25 into
train / test (stratified by the label, fixed seed), and standardised per feature on the training
rows (``StandardScaler``): the data users actually give JNF. Labels come along for linear probes.

* ``digits3``: 8x8 digits as left half (32), right half (32), ink profile (16: row and column means).
* ``digits6``: the same digits in six views, 272 features, mfeat-style: left, right, profile,
  Fourier magnitudes (40), horizontal and vertical gradients (112), 4x4 block means (16).
* ``cancer``: breast cancer as mean / error / worst (10 + 10 + 10).
* ``wine``: wine as three groups of its 13 measurements (5 + 4 + 4).
* ``linear-gaussian``: x_m = W_m z + b_m + noise, z ~ N(0, I_5), widths (20, 15, 10), noise sd
  (0.4, 0.6, 0.8), standardised with the model's own mean and standard deviations, so the exact
  covariance (``Table.covariance``) gives the Bayes-optimal predictor and log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

TABLES = ("digits3", "digits6", "cancer", "wine", "linear-gaussian")
#: Tables built to have the properties of tables users bring (issue 27): a spectrum beside a few
#: values it encodes, a small modality beside a wide one, and few rows with many features.
BUILT_TABLES = ("spectra", "small-wide", "few-rows")


@dataclass
class Table:
    name: str
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    y_train: np.ndarray
    y_test: np.ndarray
    #: linear-gaussian only: the exact covariance of the stacked standardised features (mean 0).
    covariance: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        return list(self.train)

    @property
    def n_features(self) -> int:
        return sum(x.shape[1] for x in self.train.values())


def _digit_views(six: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    digits = load_digits()
    images, n = digits.images, len(digits.images)
    views = {
        "left": images[:, :, :4].reshape(n, -1),
        "right": images[:, :, 4:].reshape(n, -1),
        "profile": np.hstack([images.mean(axis=2), images.mean(axis=1)]),
    }
    if six:
        views["fourier"] = np.abs(np.fft.rfft2(images)).reshape(n, -1)
        views["gradient"] = np.hstack([np.diff(images, axis=1).reshape(n, -1), np.diff(images, axis=2).reshape(n, -1)])
        views["blocks"] = images.reshape(n, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(n, -1)
    return views, digits.target


def _cancer_views() -> tuple[dict[str, np.ndarray], np.ndarray]:
    data = load_breast_cancer()
    x = data.data
    return {"mean": x[:, :10], "error": x[:, 10:20], "worst": x[:, 20:]}, data.target


def _wine_views() -> tuple[dict[str, np.ndarray], np.ndarray]:
    data = load_wine()
    x = data.data
    return {"acidity": x[:, :5], "phenols": x[:, 5:9], "colour": x[:, 9:]}, data.target


def linear_gaussian(n_train: int = 1500, n_test: int = 500, seed: int = 0) -> Table:
    """The linear-Gaussian table (module docstring); labels are the sign of the first latent."""
    rng = np.random.default_rng(seed)
    k, dims, noise_sds = 5, (20, 15, 10), (0.4, 0.6, 0.8)
    W = rng.normal(size=(sum(dims), k))
    b = rng.normal(size=sum(dims))
    noise = np.concatenate([np.full(d, s) for d, s in zip(dims, noise_sds)])
    covariance = W @ W.T + np.diag(noise**2)
    std = np.sqrt(np.diag(covariance))
    z = rng.normal(size=(n_train + n_test, k))
    x = (z @ W.T + b + rng.normal(size=(len(z), sum(dims))) * noise - b) / std
    bounds = np.cumsum([0, *dims])
    views = {m: x[:, lo:hi].astype(np.float32) for m, lo, hi in zip("abc", bounds[:-1], bounds[1:])}
    y = (z[:, 0] > 0).astype(int)
    return Table(
        "linear-gaussian",
        {m: v[:n_train] for m, v in views.items()},
        {m: v[n_train:] for m, v in views.items()},
        y[:n_train],
        y[n_train:],
        covariance / np.outer(std, std),
    )


def _spectra(n: int = 215, seed: int = 0, channels: int = 100) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Near-infrared-like spectra: a random baseline (offset, slope, curvature) that dominates each
    spectrum's variance, plus three overlapping absorption bands whose heights are the three
    composition values (fat, water, protein; water ~ 1.5 - fat - protein), plus channel noise, of
    a size that leaves RidgeCV a 5-fold MSE of about 0.05 on the standardised composition, as on
    the Tecator meat spectra (215 rows, 100 channels, fat / water / protein) users brought."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, channels)
    fat, protein = rng.uniform(0, 1, n), 0.5 * rng.uniform(0, 1, n)
    composition = np.c_[fat, 1.5 - fat - protein + 0.1 * rng.normal(size=n), protein]
    bands = np.stack([np.exp(-0.5 * ((grid - c) / w) ** 2) for c, w in [(0.3, 0.08), (0.5, 0.12), (0.65, 0.07)]])
    baseline = rng.normal(0, 3, (n, 1)) + rng.normal(0, 1, (n, 1)) * grid + rng.normal(0, 0.5, (n, 1)) * grid**2
    spectrum = baseline + 0.3 * composition @ bands + 0.04 * rng.normal(size=(n, channels))
    return {"spectrum": spectrum, "composition": composition}, (fat > 0.5).astype(int)


def _linear_views(
    n: int, dims: tuple[int, ...], k: int, noise_sd: float, seed: int, names: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """x_m = W_m z + noise, z ~ N(0, I_k): views, labels (sign of z_0), and the exact covariance."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(sum(dims), k))
    z = rng.normal(size=(n, k))
    x = z @ W.T + noise_sd * rng.normal(size=(n, sum(dims)))
    bounds = np.cumsum([0, *dims])
    views = {m: x[:, lo:hi] for m, lo, hi in zip(names, bounds[:-1], bounds[1:])}
    return views, (z[:, 0] > 0).astype(int), W @ W.T + noise_sd**2 * np.eye(sum(dims))


def _few_rows(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """40 rows, 120 'genes' and 21 'lipids' driven by 5 latent factors and a 5-class label (nutrimouse-like)."""
    rng = np.random.default_rng(seed + 7)
    y = np.repeat(np.arange(5), 8)
    z = rng.normal(size=(40, 5)) + 1.5 * rng.normal(size=(5, 5))[y]
    genes = z @ rng.normal(size=(5, 120)) + rng.normal(size=(40, 120))
    lipids = np.tanh(z @ rng.normal(size=(5, 21)) / 2) + 0.3 * rng.normal(size=(40, 21))
    return {"genes": genes, "lipids": lipids}, y


def bayes_predict(table: Table, X: dict[str, np.ndarray], cond: list[str]) -> dict[str, np.ndarray]:
    """E[x_m | x_S] for every modality m not in S, from the exact covariance (linear-gaussian)."""
    bounds = np.cumsum([0, *(x.shape[1] for x in table.train.values())])
    columns = {m: np.arange(lo, hi) for m, lo, hi in zip(table.names, bounds[:-1], bounds[1:])}
    given = np.concatenate([columns[m] for m in cond])
    cov = table.covariance
    x_s = np.concatenate([X[m] for m in cond], axis=1).astype(np.float64)
    solved = np.linalg.solve(cov[np.ix_(given, given)], x_s.T)
    return {m: (cov[np.ix_(columns[m], given)] @ solved).T for m in table.names if m not in cond}


def load_table(name: str, seed: int = 0) -> Table:
    """One of ``TABLES`` or ``BUILT_TABLES``: train / test dicts of standardised float32 views, and labels."""
    if name == "linear-gaussian":
        return linear_gaussian(seed=seed)
    covariance = None
    if name == "small-wide":
        views, y, covariance = _linear_views(400, (100, 3), 4, 1.0, seed, ("wide", "small"))
    else:
        views, y = {
            "digits3": lambda: _digit_views(False),
            "digits6": lambda: _digit_views(True),
            "cancer": _cancer_views,
            "wine": _wine_views,
            "spectra": _spectra,
            "few-rows": _few_rows,
        }[name]()
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=seed)
    X_train, X_test = {}, {}
    stds = []
    for view, block in views.items():
        scaler = StandardScaler().fit(block[train])
        X_train[view] = scaler.transform(block[train]).astype(np.float32)
        X_test[view] = scaler.transform(block[test]).astype(np.float32)
        stds.append(scaler.scale_)
    if covariance is not None:  # of the standardised features (the scaler's means are ignored: ~0)
        std = np.concatenate(stds)
        covariance = covariance / np.outer(std, std)
    return Table(name, X_train, X_test, y[train], y[test], covariance)
