"""Cross-modal prediction and latent features against what a user tries first (issue 27).

On every table of ``_tables.py`` (real and built), ``JNFEstimator`` at the given parameters is
fitted once on the training rows; on the test rows it predicts each view from each other single
view and (three or more views) from all the other views. Beside it, from the same views and the
same training rows: ``RidgeCV``, ``PLSRegression`` (components chosen by 3-fold CV), KNN
(neighbours chosen by 3-fold CV), the training mean, and on the linear tables the Bayes predictor.
Features: a logistic regression on the joint latent against one on PCA of the same size.

Figures are mean per-feature MSE over the (conditioning set, target) pairs of a kind; ``ratio``
is skjnf's MSE over the best baseline's, per pair, then averaged.

Usage::

    python benchmarks/cross_modal.py --threads 1 --tables spectra small-wide --params '{}'
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


def baselines(x_train, y_train, x_test) -> dict[str, np.ndarray]:
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KNeighborsRegressor

    n_max = min(x_train.shape[1], len(x_train) * 2 // 3 - 1, 20)
    pls = GridSearchCV(PLSRegression(scale=False), {"n_components": list(range(1, n_max + 1))}, cv=3)
    knn = GridSearchCV(
        KNeighborsRegressor(), {"n_neighbors": [k for k in (1, 3, 5, 10, 20) if k < len(x_train) // 2]}, cv=3
    )
    models = {"ridge": RidgeCV(alphas=np.logspace(-4, 4, 17)), "pls": pls, "knn": knn}
    out = {name: model.fit(x_train, y_train).predict(x_test) for name, model in models.items()}
    out["mean"] = np.broadcast_to(y_train.mean(0), (len(x_test), y_train.shape[1]))
    return out


def measure(table_name: str, params: dict, seed: int) -> dict:
    from _tables import bayes_predict, load_table
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from skjnf import JNFEstimator

    table = load_table(table_name, seed=0)
    names = table.names
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = JNFEstimator(random_state=seed, **params).fit(table.train)
    fit_s = time.perf_counter() - start
    sets = [[s] for s in names] + ([[m for m in names if m != t] for t in names] if len(names) >= 3 else [])
    pairs = []
    for cond in sets:
        targets = [t for t in names if t not in cond]
        if len(cond) > 1:
            targets = targets[:1]  # "all the others": one target per set
        predicted = model.predict({m: table.test[m] for m in cond})
        x_train = np.hstack([table.train[m] for m in cond])
        x_test = np.hstack([table.test[m] for m in cond])
        bayes = bayes_predict(table, table.test, cond) if table.covariance is not None else {}
        for t in targets:
            truth = table.test[t]
            row = {"cond": "+".join(cond), "target": t, "kind": "one" if len(cond) == 1 else "rest"}
            row["skjnf"] = float(((predicted[t] - truth) ** 2).mean())
            for name, guess in baselines(x_train, table.train[t], x_test).items():
                row[name] = float(((guess - truth) ** 2).mean())
            if t in bayes:
                row["bayes"] = float(((bayes[t] - truth) ** 2).mean())
            row["ratio"] = row["skjnf"] / min(row[b] for b in ("ridge", "pls", "knn", "mean"))
            pairs.append(row)
    latent_dim = model.latent_dim
    probe = LogisticRegression(max_iter=2000)
    z_train, z_test = model.transform(table.train), model.transform(table.test)
    acc_latent = probe.fit(z_train, table.y_train).score(z_test, table.y_test)
    all_train, all_test = (np.hstack([X[m] for m in names]) for X in (table.train, table.test))
    pca = PCA(latent_dim, random_state=0).fit(all_train)
    acc_pca = probe.fit(pca.transform(all_train), table.y_train).score(pca.transform(all_test), table.y_test)
    kl = model.active_dims_ if hasattr(model, "active_dims_") else None
    return {
        "table": table_name,
        "params": params,
        "seed": seed,
        "fit_s": round(fit_s, 1),
        "pairs": pairs,
        "probe_latent": acc_latent,
        "probe_pca": acc_pca,
        "active_dims": None if kl is None else int(kl),
    }


def summary(result: dict) -> str:
    lines = []
    for kind in ("one", "rest"):
        rows = [p for p in result["pairs"] if p["kind"] == kind]
        if not rows:
            continue
        mean = {k: np.mean([p[k] for p in rows]) for k in ("skjnf", "ridge", "pls", "knn", "mean", "ratio")}
        bayes = f" | {np.mean([p['bayes'] for p in rows]):.3f}" if "bayes" in rows[0] else " | -"
        worst = max(p["ratio"] for p in rows)
        lines.append(
            f"| {result['table']} | {kind} ({len(rows)}) | **{mean['skjnf']:.3f}** | {mean['ridge']:.3f} | "
            f"{mean['pls']:.3f} | {mean['knn']:.3f} | {mean['mean']:.3f}{bayes} | {mean['ratio']:.2f} / {worst:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    from _tables import BUILT_TABLES, TABLES

    parser = benchmark_parser(__doc__, "cross_modal.json")
    parser.add_argument("--tables", nargs="+", default=list(BUILT_TABLES + TABLES))
    parser.add_argument("--params", default="{}", help="JNFEstimator parameters, JSON")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    set_threads(args.threads)
    results = []
    print("| table | from | skjnf | RidgeCV | PLS | KNN | mean | Bayes | ratio mean / worst |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.tables:
        for seed in args.seeds:
            result = measure(name, json.loads(args.params), seed)
            results.append(result)
            print(summary(result), flush=True)
            print(
                f"|   | probe {result['probe_latent']:.3f} vs PCA {result['probe_pca']:.3f}; fit {result['fit_s']} s;"
                f" active dims {result['active_dims']} | | | | | | | |",
                flush=True,
            )
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
