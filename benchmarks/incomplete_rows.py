"""Training on incomplete rows: drop them, or use them, as the fraction of incomplete rows grows.

For each table of ``_tables.py`` (standardised views; three views each) a fraction f of the
training rows (0, 30, 60, 85 %) is made incomplete at random (MCAR): each such row misses one or
two of its three views, chosen uniformly. Then, at ``JNFEstimator``'s defaults:

* ``drop``: fit on the complete training rows only (what 0.1 did, and the reference JNF requires);
* ``use``: fit on every training row (skjnf >= 0.2).

Both are scored on the complete test rows: held-out log-likelihood (``score``; for
linear-gaussian also its gap to the exact log p(x)), cross-modal MSE of each view from the two
others and from each single other view (per feature, standardised units: the training mean
scores about 1; for linear-gaussian the Bayes-optimal MSE too), and whether the pair predicts
each view at least as well as its best single view (the subset posterior stays monotone when
its experts learned from incomplete rows). ``IterativeImputer`` fitted on the same incomplete
table is the baseline a user would reach for.

Usage::

    python benchmarks/incomplete_rows.py --threads 1                 # seeds 0 and 1, averaged
    python benchmarks/incomplete_rows.py --tables cancer --fractions 0 0.6 --seeds 0

Results go to ``benchmarks/results/incomplete_rows.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _tables import bayes_predict, load_table  # noqa: E402

TABLES = ("linear-gaussian", "digits3", "cancer")
FRACTIONS = (0.0, 0.3, 0.6, 0.85)


def make_incomplete(X: dict[str, np.ndarray], fraction: float, seed: int) -> tuple[dict, np.ndarray]:
    """A copy of X where ``fraction`` of the rows miss one or two views (MCAR); returns (X, complete)."""
    rng = np.random.default_rng(seed)
    names, n = list(X), len(next(iter(X.values())))
    X = {m: x.astype(np.float64, copy=True) for m, x in X.items()}
    incomplete = rng.random(n) < fraction
    for i in np.flatnonzero(incomplete):
        for j in rng.choice(len(names), size=rng.integers(1, len(names)), replace=False):
            X[names[j]][i] = np.nan
    return X, ~incomplete


def mse(pred, truth) -> float:
    return float(np.mean((np.asarray(pred, np.float64) - truth) ** 2))


def cross_modal(predict, table) -> dict:
    """MSE of each view from the others, and from each single other view; pair-vs-single check."""
    names, test = table.names, table.test
    from_others, from_one, monotone = {}, {}, True
    for m in names:
        others = [o for o in names if o != m]
        from_others[m] = mse(predict(others, m), test[m])
        singles = [mse(predict([o], m), test[m]) for o in others]
        from_one[m] = float(np.mean(singles))
        monotone &= from_others[m] <= 1.02 * min(singles)
    return {
        "mse_from_others": float(np.mean(list(from_others.values()))),
        "mse_from_one": float(np.mean(list(from_one.values()))),
        "pair_beats_best_single": bool(monotone),
    }


def jnf_predictor(est, table):
    def predict(cond, target):
        return est.predict({m: table.test[m] for m in cond})[target]

    return predict


def imputer_predictor(imputer, table):
    names = table.names
    widths = np.cumsum([0] + [table.test[m].shape[1] for m in names])

    def predict(cond, target):
        x = np.hstack([table.test[m] if m in cond else np.full_like(table.test[m], np.nan) for m in names])
        j = names.index(target)
        return imputer.transform(x)[:, widths[j] : widths[j + 1]]

    return predict


def bayes_row(table) -> dict:
    from scipy.stats import multivariate_normal

    x = np.hstack([table.test[m] for m in table.names]).astype(np.float64)
    exact = float(multivariate_normal(np.zeros(len(table.covariance)), table.covariance).logpdf(x).mean())

    def predict(cond, target):
        return bayes_predict(table, table.test, cond)[target]

    return {"exact_log_likelihood": exact, **cross_modal(predict, table)}


def run(tables, fractions, seeds) -> list[dict]:
    """Every (table, fraction, strategy) for each seed (it draws the missing rows and seeds the fits)."""
    return [dict(row, seed=seed) for seed in seeds for row in run_seed(tables, fractions, seed)]


def run_seed(tables, fractions, seed) -> list[dict]:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    from skjnf import JNFEstimator

    rows = []
    for name in tables:
        table = load_table(name)
        exact = bayes_row(table) if table.covariance is not None else None
        if exact:
            rows.append({"table": name, "fraction": None, "strategy": "exact", **exact})
            print(rows[-1], flush=True)
        for fraction in fractions:
            X, complete = make_incomplete(table.train, fraction, seed)
            strategies = ("use",) if fraction == 0 else ("drop", "use")
            for strategy in strategies:
                train = X if strategy == "use" else {m: x[complete] for m, x in X.items()}
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    est = JNFEstimator(random_state=seed).fit(train)
                fit_s = time.perf_counter() - start
                row = {
                    "table": name,
                    "fraction": fraction,
                    "strategy": "both" if fraction == 0 else strategy,
                    "n_train_rows": int(len(next(iter(train.values())))),
                    "n_complete_rows": int(complete.sum()),
                    "fit_s": fit_s,
                    "log_likelihood": float(est.score(table.test)),
                    **cross_modal(jnf_predictor(est, table), table),
                }
                if exact:
                    row["log_likelihood_gap"] = exact["exact_log_likelihood"] - row["log_likelihood"]
                rows.append(row)
                print(row, flush=True)
            start = time.perf_counter()
            imputer = IterativeImputer(max_iter=10, random_state=seed).fit(np.hstack(list(X.values())))
            rows.append(
                {
                    "table": name,
                    "fraction": fraction,
                    "strategy": "IterativeImputer",
                    "fit_s": time.perf_counter() - start,
                    **cross_modal(imputer_predictor(imputer, table), table),
                }
            )
            print(rows[-1], flush=True)
    return rows


def averaged(rows) -> list[dict]:
    """Rows of the same (table, fraction, strategy) averaged over seeds (numbers only)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["table"], row["fraction"], row["strategy"]), []).append(row)
    out = []
    for (table, fraction, strategy), group in groups.items():
        merged = {"table": table, "fraction": fraction, "strategy": strategy, "n_seeds": len(group)}
        for key, value in group[0].items():
            if isinstance(value, bool):
                merged[key] = all(r[key] for r in group)
            elif isinstance(value, (int, float)) and key not in ("fraction", "seed"):
                merged[key] = float(np.mean([r[key] for r in group]))
        out.append(merged)
    return out


def markdown(rows) -> str:
    lines = [
        "| table | incomplete | strategy | fit s | log-lik | MSE from 2 others | MSE from 1 other | pair <= best one |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fraction = "" if r["fraction"] is None else f"{100 * r['fraction']:.0f} %"
        ll = r.get("log_likelihood", r.get("exact_log_likelihood"))
        lines.append(
            f"| {r['table']} | {fraction} | {r['strategy']} | {r.get('fit_s', 0):.1f} | "
            + ("" if ll is None else f"{ll:.2f}")
            + f" | {r['mse_from_others']:.3f} | {r['mse_from_one']:.3f} | "
            + ("yes |" if r["pair_beats_best_single"] else "no |")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=list(TABLES))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 for reproducible timings)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "incomplete_rows")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.tables, args.fractions, args.seeds)
    meta = {"torch_threads": torch.get_num_threads(), "seeds": args.seeds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    report = f"Means over seeds {args.seeds} (pair <= best one: yes only if it held for every seed).\n\n"
    args.out.with_suffix(".md").write_text(report + markdown(averaged(rows)))
    print(report + markdown(averaged(rows)))


if __name__ == "__main__":
    main()
