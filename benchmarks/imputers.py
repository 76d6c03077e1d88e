"""JNFImputer against scikit-learn's imputers on real tables with whole modality blocks missing.

Each table of ``_tables.py`` becomes one 2-D array (its views side by side, standardised on the
training rows). In a fraction of the training and test rows (``--fractions``) one or more views
(each with probability 1/2, at least one, never all) are set to NaN. Every imputer is fitted
on the incomplete training rows and fills the test rows; reported:

* ``mse``: mean squared error of the filled test values (standardised units), over hidden cells;
* ``acc``: accuracy on the test rows of a logistic regression trained on the filled training rows;
* ``cover``: for ``JNFImputer(sample_posterior=True)``, how often the true value falls inside the
  central 90 % of 50 draws per hidden cell (0.90 is calibrated).

Usage::

    python benchmarks/imputers.py --threads 1 --tables digits3 cancer wine --fractions 0.3 0.6
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _cli import benchmark_parser, set_threads  # noqa: E402


def hide_blocks(X: np.ndarray, bounds, fraction: float, rng) -> np.ndarray:
    """A copy of X with, in ``fraction`` of the rows, a random non-empty proper set of views NaN."""
    X = X.copy()
    n_views = len(bounds) - 1
    for row in np.flatnonzero(rng.random(len(X)) < fraction):
        hidden = rng.random(n_views) < 0.5
        if not hidden.any():
            hidden[rng.integers(n_views)] = True
        if hidden.all():
            hidden[rng.integers(n_views)] = False
        for j in np.flatnonzero(hidden):
            X[row, bounds[j] : bounds[j + 1]] = np.nan
    return X


def imputers(widths: dict, seed: int) -> dict:
    from sklearn.ensemble import ExtraTreesRegressor
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer
    from sklearn.linear_model import BayesianRidge

    from skjnf import JNFImputer

    trees = ExtraTreesRegressor(n_estimators=20, min_samples_leaf=3, n_jobs=1, random_state=seed)
    return {
        "JNFImputer": JNFImputer(widths, random_state=seed),
        "Iterative(BayesianRidge)": IterativeImputer(BayesianRidge(), max_iter=10, random_state=seed),
        "Iterative(ExtraTrees)": IterativeImputer(trees, max_iter=5, random_state=seed),
        "KNNImputer": KNNImputer(n_neighbors=5),
        "SimpleImputer": SimpleImputer(),
    }


def measure(table_name: str, fraction: float, seed: int) -> dict:
    from _tables import load_table
    from sklearn.linear_model import LogisticRegression

    table = load_table(table_name, seed=0)
    widths = {m: x.shape[1] for m, x in table.train.items()}
    bounds = np.cumsum([0, *widths.values()])
    train = np.hstack(list(table.train.values())).astype(np.float64)
    test = np.hstack(list(table.test.values())).astype(np.float64)
    rng = np.random.default_rng(seed)
    train_missing, test_missing = hide_blocks(train, bounds, fraction, rng), hide_blocks(test, bounds, fraction, rng)
    hidden = np.isnan(test_missing)
    result = {"table": table_name, "fraction": fraction, "seed": seed, "imputers": {}}
    for name, imputer in imputers(widths, seed).items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            filled_train = imputer.fit_transform(train_missing)
            filled_test = imputer.transform(test_missing)
        seconds = time.perf_counter() - start
        probe = LogisticRegression(max_iter=2000).fit(filled_train, table.y_train)
        row = {
            "mse": float(((filled_test[hidden] - test[hidden]) ** 2).mean()),
            "acc": float(probe.score(filled_test, table.y_test)),
            "seconds": round(seconds, 1),
        }
        if name == "JNFImputer":
            imputer.set_params(sample_posterior=True)
            draws = np.stack([imputer.transform(test_missing)[hidden] for _ in range(50)])
            low, high = np.quantile(draws, [0.05, 0.95], axis=0)
            row["cover"] = float(((test[hidden] >= low) & (test[hidden] <= high)).mean())
        result["imputers"][name] = row
    return result


def main() -> None:
    parser = benchmark_parser(__doc__, "imputers.json")
    parser.add_argument("--tables", nargs="+", default=["digits3", "cancer", "wine", "linear-gaussian"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.6])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(args.threads)
    results = []
    print("| table | rows missing | imputer | MSE of hidden cells | downstream accuracy | 90 % coverage | s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.tables:
        for fraction in args.fractions:
            result = measure(name, fraction, args.seed)
            results.append(result)
            for imputer, row in result["imputers"].items():
                cover = f"{row['cover']:.2f}" if "cover" in row else ""
                print(
                    f"| {name} | {fraction:.0%} | {imputer} | {row['mse']:.3f} | {row['acc']:.3f} | {cover} |"
                    f" {row['seconds']} |",
                    flush=True,
                )
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
