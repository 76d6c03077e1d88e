"""Does the latent grow with ``latent_dim``? Reconstruction from every view against PCA.

For each table and latent size k, JNFEstimator (defaults otherwise) is fitted on the training
rows; each view of the test rows is reconstructed from all views (``predict``) and its mean
per-feature MSE is compared with PCA(k) of all views (standardised), reconstructing the same
view. Also reported: ``active_dims_``. Issue 27: reconstruction <= PCA(k) per view up to a
quarter of the features.

Usage::

    python benchmarks/latent_size.py --threads 1 --tables cancer digits3 --sizes 2 5 10 20
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _cli import benchmark_parser, set_threads  # noqa: E402


def measure(table_name: str, k: int, params: dict) -> dict:
    from _tables import load_table
    from sklearn.decomposition import PCA

    from skjnf import JNFEstimator

    table = load_table(table_name, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = JNFEstimator(latent_dim=k, random_state=0, **params).fit(table.train)
    predicted = model.predict(table.test)
    train, test = (np.hstack(list(X.values())) for X in (table.train, table.test))
    pca = PCA(k, random_state=0).fit(train)
    rebuilt = pca.inverse_transform(pca.transform(test))
    bounds = np.cumsum([0, *(x.shape[1] for x in table.train.values())])
    views = {}
    for (name, x), lo, hi in zip(table.test.items(), bounds[:-1], bounds[1:]):
        views[name] = {
            "skjnf": float(((predicted[name] - x) ** 2).mean()),
            "pca": float(((rebuilt[:, lo:hi] - x) ** 2).mean()),
        }
    return {"table": table_name, "k": k, "active_dims": model.active_dims_, "views": views}


def main() -> None:
    parser = benchmark_parser(__doc__, "latent_size.json")
    parser.add_argument("--tables", nargs="+", default=["cancer", "digits3"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[2, 5, 10, 20])
    parser.add_argument("--params", default="{}")
    args = parser.parse_args()
    set_threads(args.threads)
    results = []
    print("| table | latent_dim | active dims | mean MSE skjnf | mean MSE PCA(k) | views where skjnf <= PCA |")
    print("|---|---|---|---|---|---|")
    for name in args.tables:
        for k in args.sizes:
            result = measure(name, k, json.loads(args.params))
            results.append(result)
            views = result["views"].values()
            better = sum(v["skjnf"] <= v["pca"] for v in views)
            print(
                f"| {name} | {k} | {result['active_dims']} | {np.mean([v['skjnf'] for v in views]):.3f} |"
                f" {np.mean([v['pca'] for v in views]):.3f} | {better} of {len(views)} |",
                flush=True,
            )
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
