"""Semi-supervised rows: does training on rows missing the target help or hurt its prediction?

On the spectra table (``_tables.py``: every row has its spectrum; the composition is known for a
fraction of them), 5-fold CV: JNFEstimator fitted on every training row ("use": rows without
the composition are incomplete rows) against one fitted on the labelled rows only ("drop");
both predict the composition of the test rows from their spectrum. RidgeCV on the labelled rows
beside them. Issue 27: using the rows must not be worse than dropping them, beyond noise.

Usage::

    python benchmarks/semi_supervised.py --threads 1 --labelled 0.5 0.8 [--params '{...}']
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


def measure(labelled: float, params: dict) -> dict:
    from _tables import _spectra
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    from skjnf import JNFEstimator

    views, _ = _spectra()
    X, Y = views["spectrum"], views["composition"]
    errors = {"use": [], "drop": [], "ridge": []}
    for fold, (train, test) in enumerate(KFold(5, shuffle=True, random_state=0).split(X)):
        sx, sy = StandardScaler().fit(X[train]), StandardScaler().fit(Y[train])
        x_train, x_test, y_train, y_test = (
            sx.transform(X[train]),
            sx.transform(X[test]),
            sy.transform(Y[train]),
            sy.transform(Y[test]),
        )
        known = np.random.default_rng(fold).random(len(train)) < labelled
        hidden = np.where(known[:, None], y_train, np.nan)
        fits = {
            "use": {"spectrum": x_train, "composition": hidden},
            "drop": {"spectrum": x_train[known], "composition": y_train[known]},
        }
        for name, data in fits.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = JNFEstimator(random_state=fold, **params).fit(data)
            predicted = model.predict({"spectrum": x_test})["composition"]
            errors[name].append(float(((predicted - y_test) ** 2).mean()))
        ridge = RidgeCV(alphas=np.logspace(-6, 3, 20)).fit(x_train[known], y_train[known])
        errors["ridge"].append(float(((ridge.predict(x_test) - y_test) ** 2).mean()))
    worse = int(np.sum(np.array(errors["use"]) > np.array(errors["drop"])))
    return {"labelled": labelled, "params": params, "folds": errors, "use_worse_in": worse}


def main() -> None:
    parser = benchmark_parser(__doc__, "semi_supervised.json")
    parser.add_argument("--labelled", nargs="+", type=float, default=[0.5, 0.8])
    parser.add_argument("--params", default="{}")
    args = parser.parse_args()
    set_threads(args.threads)
    results = []
    print("| composition known for | use every row | drop unlabelled rows | use worse in | RidgeCV (labelled) |")
    print("|---|---|---|---|---|")
    for labelled in args.labelled:
        result = measure(labelled, json.loads(args.params))
        results.append(result)
        mean = {k: np.mean(v) for k, v in result["folds"].items()}
        print(
            f"| {labelled:.0%} | {mean['use']:.3f} | {mean['drop']:.3f} | {result['use_worse_in']} of 5 folds |"
            f" {mean['ridge']:.3f} |",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
