"""Every benchmark table, in one place.

**Standardised tables** (``load_table``; what users give JNF): real multi-view tables built from
scikit-learn's datasets, and tables built to have the properties of those users bring, standardised
per feature.

Each table is cut into views the way a user would describe the data, split 75 / 25 into
train / test (stratified by the label, fixed seed), and standardised per feature on the training
rows (``StandardScaler``): the data users actually give JNF. Labels come along for linear probes.

* ``digits3``: 8x8 digits as left half (32), right half (32), ink profile (16: row and column means).
* ``digits6``: the same digits in six views, 272 features, mfeat-style: left, right, profile,
  Fourier magnitudes (40), horizontal and vertical gradients (112), 4x4 block means (16).
* ``mfeat-like``: the same digits in six views of 646 features, after UCI's mfeat (649): the image
  upsampled to 16x16 (256), its Fourier magnitudes (144), Karhunen-Loeve coefficients (64),
  gradients (112), row x column profile products (64), six morphological figures. Not in
  ``TABLES``: it is the wide table of the fit-speed benchmarks.
* ``cancer``: breast cancer as mean / error / worst (10 + 10 + 10).
* ``wine``: wine as three groups of its 13 measurements (5 + 4 + 4).
* ``linear-gaussian``: x_m = W_m z + b_m + noise, z ~ N(0, I_5), widths (20, 15, 10), noise sd
  (0.4, 0.6, 0.8), standardised with the model's own mean and standard deviations, so the exact
  covariance (``Table.covariance``) gives the Bayes-optimal predictor and log-likelihood.

**Unit-range sets** (``unit_range_sets``; ``run.py``, side by side with the reference, whose
decoders end in a sigmoid): three sets of three modalities, ``linear-gaussian`` (the same model),
``nonlinear`` and ``digits`` (image rows 0-2 / 3-4 / 5-7), every feature scaled on the training
rows to x' = (x - lo) / (hi - lo), lo and hi the training min / max widened by 10 % of the range on
each side: training values lie in [1/12, 11/12], test values almost always in [0, 1]. The
linear-Gaussian set keeps its exact mean and covariance in the scaled space (``Table.mean``).
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
    y_train: np.ndarray | None = None  # labels, for linear probes (standardised tables)
    y_test: np.ndarray | None = None
    #: Linear-Gaussian tables only: the exact covariance of the stacked features, and their mean
    #: (None: 0, as standardised).
    covariance: np.ndarray | None = None
    mean: np.ndarray | None = None
    description: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.train)

    @property
    def dims(self) -> list[int]:
        return [x.shape[1] for x in self.train.values()]

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


def _mfeat_like_views() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The digits in six views of 646 features, after UCI's mfeat (six views, 649 features):
    pixels of the image upsampled to 16 x 16 (256), Fourier magnitudes of that image (144), its
    Karhunen-Loeve coefficients (the 64 principal axes of the pixels), gradients (112), products of
    the row and column profiles (64) and six morphological figures (ink, centre, spread)."""
    from scipy.ndimage import zoom

    digits = load_digits()
    images, n = digits.images, len(digits.images)
    big = zoom(images, (1, 2, 2), order=1)
    flat = images.reshape(n, -1)
    centred = flat - flat.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    rows, cols = images.mean(axis=2), images.mean(axis=1)
    ink = images.sum(axis=(1, 2)) + 1e-9
    grid = np.arange(8.0)
    cy, cx = (images.sum(2) @ grid) / ink, (images.sum(1) @ grid) / ink
    sy = np.sqrt((images.sum(2) * (grid - cy[:, None]) ** 2).sum(1) / ink)
    sx = np.sqrt((images.sum(1) * (grid - cx[:, None]) ** 2).sum(1) / ink)
    views = {
        "pixels": big.reshape(n, -1),
        "fourier": np.abs(np.fft.rfft2(big)).reshape(n, -1),
        "karhunen": centred @ axes.T,
        "gradient": np.hstack([np.diff(images, axis=1).reshape(n, -1), np.diff(images, axis=2).reshape(n, -1)]),
        "profiles": (rows[:, :, None] * cols[:, None, :]).reshape(n, -1),
        "morphology": np.column_stack([ink, cy, cx, sy, sx, (images > 8).sum(axis=(1, 2))]),
    }
    return views, digits.target


def _cancer_views() -> tuple[dict[str, np.ndarray], np.ndarray]:
    data = load_breast_cancer()
    x = data.data
    return {"mean": x[:, :10], "error": x[:, 10:20], "worst": x[:, 20:]}, data.target


def _wine_views() -> tuple[dict[str, np.ndarray], np.ndarray]:
    data = load_wine()
    x = data.data
    return {"acidity": x[:, :5], "phenols": x[:, 5:9], "colour": x[:, 9:]}, data.target


#: The linear-Gaussian model: latent size, widths of the three views, noise sd of each.
LINEAR_GAUSSIAN = {"k": 5, "dims": (20, 15, 10), "noise_sds": (0.4, 0.6, 0.8)}


def _linear_gaussian_draws(n: int, seed: int):
    """x = W z + b + noise, z ~ N(0, I_k), for n rows: (x, z, exact mean b, exact covariance)."""
    rng = np.random.default_rng(seed)
    k, dims, noise_sds = LINEAR_GAUSSIAN["k"], LINEAR_GAUSSIAN["dims"], LINEAR_GAUSSIAN["noise_sds"]
    W = rng.normal(size=(sum(dims), k))
    b = rng.normal(size=sum(dims))
    noise = np.concatenate([np.full(d, s) for d, s in zip(dims, noise_sds)])
    z = rng.normal(size=(n, k))
    x = z @ W.T + b + rng.normal(size=(n, sum(dims))) * noise
    return x, z, b, W @ W.T + np.diag(noise**2)


def linear_gaussian(n_train: int = 1500, n_test: int = 500, seed: int = 0) -> Table:
    """The linear-Gaussian table (module docstring); labels are the sign of the first latent."""
    x, z, b, covariance = _linear_gaussian_draws(n_train + n_test, seed)
    std = np.sqrt(np.diag(covariance))
    x = (x - b) / std
    views = _cut(x.astype(np.float32), LINEAR_GAUSSIAN["dims"], "abc")
    y = (z[:, 0] > 0).astype(int)
    return Table(
        "linear-gaussian",
        {m: v[:n_train] for m, v in views.items()},
        {m: v[n_train:] for m, v in views.items()},
        y[:n_train],
        y[n_train:],
        covariance / np.outer(std, std),
    )


def _cut(x: np.ndarray, dims, names) -> dict[str, np.ndarray]:
    """Columns of x cut into consecutive views of widths ``dims``."""
    bounds = np.cumsum([0, *dims])
    return {m: x[:, lo:hi] for m, lo, hi in zip(names, bounds[:-1], bounds[1:])}


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
    return _cut(x, dims, names), (z[:, 0] > 0).astype(int), W @ W.T + noise_sd**2 * np.eye(sum(dims))


def _few_rows(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """40 rows, 120 'genes' and 21 'lipids' driven by 5 latent factors and a 5-class label (nutrimouse-like)."""
    rng = np.random.default_rng(seed + 7)
    y = np.repeat(np.arange(5), 8)
    z = rng.normal(size=(40, 5)) + 1.5 * rng.normal(size=(5, 5))[y]
    genes = z @ rng.normal(size=(5, 120)) + rng.normal(size=(40, 120))
    lipids = np.tanh(z @ rng.normal(size=(5, 21)) / 2) + 0.3 * rng.normal(size=(40, 21))
    return {"genes": genes, "lipids": lipids}, y


def bayes_predict(table: Table, X: dict[str, np.ndarray], cond: list[str]) -> dict[str, np.ndarray]:
    """E[x_m | x_S] for every modality m not in S, from the exact mean and covariance (linear tables)."""
    columns = _cut(np.arange(sum(table.dims))[None, :], table.dims, table.names)
    columns = {m: c[0] for m, c in columns.items()}
    given = np.concatenate([columns[m] for m in cond])
    cov = table.covariance
    mean = np.zeros(len(cov)) if table.mean is None else table.mean
    x_s = np.concatenate([X[m] for m in cond], axis=1).astype(np.float64)
    solved = np.linalg.solve(cov[np.ix_(given, given)], (x_s - mean[given]).T)
    targets = [m for m in table.names if m not in cond]
    return {m: (mean[columns[m]][:, None] + cov[np.ix_(columns[m], given)] @ solved).T for m in targets}


def gaussian_log_likelihood(table: Table, X: dict[str, np.ndarray]) -> np.ndarray:
    """Exact log p(x) per row (linear tables)."""
    x = np.concatenate([X[m] for m in table.names], axis=1).astype(np.float64)
    cov = table.covariance
    mean = np.zeros(len(cov)) if table.mean is None else table.mean
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (x - mean).T)
    logdet = 2 * np.log(np.diag(chol)).sum()
    return -0.5 * ((sol**2).sum(0) + logdet + len(mean) * np.log(2 * np.pi))


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
            "mfeat-like": _mfeat_like_views,
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


# ------------------------------------------------------------------- unit-range sets (run.py)
UNIT_RANGE_SETS = ("linear-gaussian", "nonlinear", "digits")


def _unit_range(x: np.ndarray, n_train: int):
    """Scale every feature on the first ``n_train`` rows (module docstring): (scaled x, lo, width)."""
    lo, hi = x[:n_train].min(0), x[:n_train].max(0)
    margin = 0.1 * (hi - lo)
    lo, width = lo - margin, (hi - lo) + 2 * margin
    width = np.where(width > 0, width, 1.0)
    return (x - lo) / width, lo, width


def _unit_range_table(name: str, description: str, x: np.ndarray, dims, n_train: int, scale: bool = True, **exact):
    if scale:
        x = _unit_range(x, n_train)[0]
    views = _cut(x.astype(np.float32), dims, "abc")
    train = {m: v[:n_train] for m, v in views.items()}
    test = {m: v[n_train:] for m, v in views.items()}
    return Table(name, train, test, description=description, **exact)


def linear_gaussian_unit_range(n_train: int, n_test: int, seed: int = 0) -> Table:
    """The linear-Gaussian model (``LINEAR_GAUSSIAN``) in [0, 1], with its exact scaled mean and covariance."""
    x, _, b, covariance = _linear_gaussian_draws(n_train + n_test, seed)
    dims = LINEAR_GAUSSIAN["dims"]
    x, lo, width = _unit_range(x, n_train)
    exact = {"mean": (b - lo) / width, "covariance": covariance / np.outer(width, width)}
    description = (
        f"x_m = W_m z + b_m + noise, z ~ N(0, I_{LINEAR_GAUSSIAN['k']}), widths {dims}, "
        f"noise sd {LINEAR_GAUSSIAN['noise_sds']}"
    )
    return _unit_range_table("linear-gaussian", description, x, dims, n_train, scale=False, **exact)


def nonlinear(n_train: int, n_test: int, seed: int = 1) -> Table:
    """z ~ N(0, I_4); a = sin(1.5 z A), b = tanh(z B) C, c = (z D)^2 / 2; Gaussian noise 0.1."""
    rng = np.random.default_rng(seed)
    k, dims = 4, (20, 16, 12)
    n = n_train + n_test
    z = rng.normal(size=(n, k))
    A = rng.normal(size=(k, dims[0])) / np.sqrt(k)
    B, C = rng.normal(size=(k, 32)), rng.normal(size=(32, dims[1])) / np.sqrt(32)
    D = rng.normal(size=(k, dims[2])) / np.sqrt(k)
    views = [np.sin(1.5 * z @ A), np.tanh(z @ B) @ C, 0.5 * (z @ D) ** 2]
    x = np.concatenate([v + 0.1 * rng.normal(size=v.shape) for v in views], axis=1)
    description = f"sin / tanh-MLP / square views of z ~ N(0, I_{k}), widths {dims}"
    return _unit_range_table("nonlinear", description, x, dims, n_train)


def digit_rows(n_test: int, seed: int = 0) -> Table:
    """scikit-learn's 8x8 digits (1,797 images): rows 0-2 / 3-4 / 5-7 of the image, pixels / 16."""
    images = load_digits().images.astype(np.float64) / 16.0
    images = images[np.random.default_rng(seed).permutation(len(images))]
    x = images.reshape(len(images), -1)  # image rows 0-2, 3-4 and 5-7 are consecutive columns
    description = "sklearn digits, image rows 0-2 / 3-4 / 5-7 (24 / 16 / 24 pixels, /16)"
    return _unit_range_table("digits", description, x, (24, 16, 24), len(images) - n_test, scale=False)


def unit_range_sets(n_train: int, n_test: int, which=UNIT_RANGE_SETS) -> list[Table]:
    """The sets ``run.py`` compares both implementations on (module docstring)."""
    makers = {
        "linear-gaussian": lambda: linear_gaussian_unit_range(n_train, n_test),
        "nonlinear": lambda: nonlinear(n_train, n_test),
        "digits": lambda: digit_rows(n_test),
    }
    return [makers[name]() for name in which]
