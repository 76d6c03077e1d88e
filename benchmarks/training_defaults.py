"""Training settings measured on standardised real tables: fit time against quality.

Each configuration (a JSON dict of JNFEstimator parameters, ``{}`` = the current defaults) is
fitted on every table of ``_tables.py`` and scored on its test rows:

* ``fit_s``: wall seconds of ``fit`` (run with ``--threads 1`` on an otherwise idle machine);
* ``loglik``: mean held-out log-likelihood per row (``score``, K = 100);
* ``probe``: accuracy of a logistic regression trained on the joint latent of the training rows,
  scored on the test rows' joint latent;
* ``mse_one``: mean per-feature MSE of predicting each view from each other single view;
* ``mse_rest``: mean per-feature MSE of predicting each view from all the other views;
* ``best``: the kept epochs of stage 1 and stage 2 (the latest part), and the epochs run.

``--baseline DIR`` runs the first configuration with the skjnf found in DIR (e.g. a git worktree
of an older commit) to compare against earlier defaults in the same run.

Usage::

    python benchmarks/training_defaults.py --threads 1 --configs '{}' '{"batch_size": 256}'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def measure(table_name: str, params: dict, seed: int) -> dict:
    from _tables import load_table
    from sklearn.linear_model import LogisticRegression

    from skjnf import JNFEstimator

    table = load_table(table_name)
    estimator = JNFEstimator(random_state=seed, **params)
    start = time.perf_counter()
    estimator.fit(table.train)
    fit_seconds = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        probe = LogisticRegression(max_iter=3000).fit(estimator.transform(table.train), table.y_train)
        accuracy = probe.score(estimator.transform(table.test), table.y_test)
        names = table.names
        one = [
            np.mean((estimator.predict(table.test, cond_mod=j)[m] - table.test[m]) ** 2)
            for j in names
            for m in names
            if m != j
        ]
        rest = [
            np.mean((estimator.predict(table.test, cond_mod=[j for j in names if j != m])[m] - table.test[m]) ** 2)
            for m in names
        ]
        loglik = estimator.score(table.test)
    history = estimator.history_
    return {
        "table": table_name,
        "fit_s": fit_seconds,
        "loglik": float(loglik),
        "probe": float(accuracy),
        "mse_one": float(np.mean(one)),
        "mse_rest": float(np.mean(rest)),
        "best": [history["joint"]["best_epoch"], history["flows"]["best_epoch"]],
        "epochs": [len(history["joint"]["epochs"]), len(history["flows"]["epochs"])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", default=["digits6", "digits3", "cancer", "wine", "linear-gaussian"])
    parser.add_argument("--configs", nargs="+", default=["{}"])
    parser.add_argument("--baseline", default=None, help="folder holding an older skjnf for the first config")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "training_defaults.json"))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:  # one (table, config) in this process
        print(json.dumps(measure(args.worker[0], json.loads(args.worker[1]), args.seed)))
        return
    results = []
    for index, config in enumerate(args.configs):
        for table in args.tables:
            env = None
            if index == 0 and args.baseline:
                import os

                env = {**os.environ, "PYTHONPATH": str(Path(args.baseline).resolve())}
            command = [
                sys.executable,
                __file__,
                "--worker",
                table,
                config,
                "--threads",
                str(args.threads),
                "--seed",
                str(args.seed),
            ]
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
            row = {"config": ("baseline " if env else "") + config, **json.loads(out.strip().splitlines()[-1])}
            results.append(row)
            print(
                f"{row['config'][:60]:60s} {table:16s} fit {row['fit_s']:6.1f} s  loglik {row['loglik']:9.2f}  "
                f"probe {row['probe']:.3f}  mse one {row['mse_one']:.3f} rest {row['mse_rest']:.3f}  "
                f"best {row['best']} of {row['epochs']}",
                flush=True,
            )
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
