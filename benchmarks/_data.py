"""The three benchmark datasets, each split into three modalities and scaled to [0, 1].

Every dataset is returned as a :class:`Dataset`: train / test dicts of float32 blocks, plus (for
the linear-Gaussian one) the exact model in the scaled space, from which the Bayes-optimal
cross-modal predictor E[x_T | x_S] and the exact log-likelihood follow in closed form.

Scaling: per feature x' = (x - lo) / (hi - lo) with lo, hi the training min / max widened by 10 %
of the range on each side, so training values lie in [1/12, 11/12] and test values almost always
in [0, 1] (the reference's decoders end in a sigmoid). The same arrays go to both implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODALITIES = ("a", "b", "c")


@dataclass
class Dataset:
    name: str
    description: str
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    #: Linear-Gaussian only: mean (d,) and covariance (d, d) of the stacked scaled features.
    gaussian: dict | None = field(default=None)

    @property
    def names(self) -> list[str]:
        return list(self.train)

    @property
    def dims(self) -> list[int]:
        return [x.shape[1] for x in self.train.values()]


def _scale(train: np.ndarray, test: np.ndarray):
    lo, hi = train.min(0), train.max(0)
    margin = 0.1 * (hi - lo)
    lo, width = lo - margin, (hi - lo) + 2 * margin
    width = np.where(width > 0, width, 1.0)
    return (train - lo) / width, (test - lo) / width, lo, width


def _split(full: np.ndarray, dims, n_train: int):
    """Scale every feature on the training rows, then cut into modality blocks."""
    train, test, lo, width = _scale(full[:n_train], full[n_train:])
    bounds = np.cumsum([0, *dims])
    blocks_tr = {m: train[:, s:e].astype(np.float32) for m, s, e in zip(MODALITIES, bounds[:-1], bounds[1:])}
    blocks_te = {m: test[:, s:e].astype(np.float32) for m, s, e in zip(MODALITIES, bounds[:-1], bounds[1:])}
    return blocks_tr, blocks_te, lo, width


def linear_gaussian(n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """z ~ N(0, I_5); x_m = W_m z + b_m + N(0, psi_m^2 I); widths (20, 15, 10), psi (0.4, 0.6, 0.8)."""
    rng = np.random.default_rng(seed)
    k, dims, psis = 5, (20, 15, 10), (0.4, 0.6, 0.8)
    W = np.concatenate([rng.normal(size=(d, k)) for d in dims])
    b = rng.normal(size=sum(dims))
    noise_sd = np.concatenate([np.full(d, p) for d, p in zip(dims, psis)])
    n = n_train + n_test
    z = rng.normal(size=(n, k))
    full = z @ W.T + b + rng.normal(size=(n, sum(dims))) * noise_sd
    train, test, lo, width = _split(full, dims, n_train)
    cov = W @ W.T + np.diag(noise_sd**2)
    mean_s = (b - lo) / width
    cov_s = cov / np.outer(width, width)
    return Dataset(
        "linear-gaussian",
        f"x_m = W_m z + b_m + noise, z ~ N(0, I_{k}), widths {dims}, noise sd {psis}",
        train,
        test,
        gaussian={"mean": mean_s, "cov": cov_s, "dims": dims},
    )


def nonlinear(n_train: int, n_test: int, seed: int = 1) -> Dataset:
    """z ~ N(0, I_4); a = sin(1.5 z A), b = tanh(z B) C, c = (z D)^2 / 2; Gaussian noise 0.1."""
    rng = np.random.default_rng(seed)
    k, dims = 4, (20, 16, 12)
    n = n_train + n_test
    z = rng.normal(size=(n, k))
    A = rng.normal(size=(k, dims[0])) / np.sqrt(k)
    B, C = rng.normal(size=(k, 32)), rng.normal(size=(32, dims[1])) / np.sqrt(32)
    D = rng.normal(size=(k, dims[2])) / np.sqrt(k)
    views = [np.sin(1.5 * z @ A), np.tanh(z @ B) @ C, 0.5 * (z @ D) ** 2]
    full = np.concatenate([v + 0.1 * rng.normal(size=v.shape) for v in views], axis=1)
    train, test, _, _ = _split(full, dims, n_train)
    return Dataset("nonlinear", f"sin / tanh-MLP / square views of z ~ N(0, I_{k}), widths {dims}", train, test)


def digits(n_test: int, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images): rows 0-2 / 3-4 / 5-7 of the image, pixels / 16."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float64) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    images = images[order]
    n_train = len(images) - n_test
    parts = [
        images[:, 0:3].reshape(len(images), -1),
        images[:, 3:5].reshape(len(images), -1),
        images[:, 5:8].reshape(len(images), -1),
    ]
    train = {m: p[:n_train].astype(np.float32) for m, p in zip(MODALITIES, parts)}
    test = {m: p[n_train:].astype(np.float32) for m, p in zip(MODALITIES, parts)}
    return Dataset("digits", "sklearn digits, image rows 0-2 / 3-4 / 5-7 (24 / 16 / 24 pixels, /16)", train, test)


def make_datasets(n_train: int, n_test: int, which=("linear-gaussian", "nonlinear", "digits")) -> list[Dataset]:
    makers = {
        "linear-gaussian": lambda: linear_gaussian(n_train, n_test),
        "nonlinear": lambda: nonlinear(n_train, n_test),
        "digits": lambda: digits(n_test),
    }
    return [makers[name]() for name in which]


# -------------------------------------------------------------------- closed-form limits
def gaussian_log_likelihood(ds: Dataset, X: dict[str, np.ndarray]) -> np.ndarray:
    """Exact log p(x) per row under the linear-Gaussian model (scaled space)."""
    x = np.concatenate([X[m] for m in ds.names], axis=1).astype(np.float64)
    mean, cov = ds.gaussian["mean"], ds.gaussian["cov"]
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (x - mean).T)
    logdet = 2 * np.log(np.diag(chol)).sum()
    return -0.5 * ((sol**2).sum(0) + logdet + len(mean) * np.log(2 * np.pi))


def gaussian_predict(ds: Dataset, X: dict[str, np.ndarray], cond: list[str]) -> dict[str, np.ndarray]:
    """Bayes-optimal E[x_m | x_S] for every m not in S (linear-Gaussian model)."""
    bounds = np.cumsum([0, *ds.dims])
    cols = {m: np.arange(s, e) for m, s, e in zip(ds.names, bounds[:-1], bounds[1:])}
    s_idx = np.concatenate([cols[m] for m in cond])
    mean, cov = ds.gaussian["mean"], ds.gaussian["cov"]
    x_s = np.concatenate([X[m] for m in cond], axis=1).astype(np.float64)
    solved = np.linalg.solve(cov[np.ix_(s_idx, s_idx)], (x_s - mean[s_idx]).T)
    out = {}
    for m in ds.names:
        if m in cond:
            continue
        t_idx = cols[m]
        out[m] = (mean[t_idx][:, None] + cov[np.ix_(t_idx, s_idx)] @ solved).T
    return out
