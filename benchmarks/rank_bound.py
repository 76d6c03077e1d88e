"""The best linear prediction of each view from the others through a rank-k bottleneck.

A prediction through a k-dimensional latent is, for linear maps, a rank-k regression. On a table
whose views are linear functions of each other (digits6: halves, gradients and block means of the
same 64 pixels) RidgeCV's full-rank map reaches what no small latent can; this prints, for each
view predicted from all the others, RidgeCV's test MSE with its fitted values cut to their k
leading directions (reduced-rank ridge), beside the full-rank figure, so that a latent model's
error there can be read against its size (``benchmarks/results/cross_modal.md``).

Usage::

    python benchmarks/rank_bound.py --table digits6 --ranks 5 10 20 32 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rank_k_errors(table, rank: int | None) -> list[float]:
    from sklearn.linear_model import RidgeCV

    errors = []
    for target in table.names:
        others = [m for m in table.names if m != target]
        x_train = np.hstack([table.train[m] for m in others])
        x_test = np.hstack([table.test[m] for m in others])
        y_train, y_test = table.train[target], table.test[target]
        ridge = RidgeCV(alphas=np.logspace(-4, 4, 17)).fit(x_train, y_train)
        centre = y_train.mean(0)
        fitted, guess = ridge.predict(x_train) - centre, ridge.predict(x_test) - centre
        if rank is not None and rank < y_train.shape[1]:
            directions = np.linalg.svd(fitted, full_matrices=False)[2][:rank].T
            guess = guess @ directions @ directions.T
        errors.append(float(((guess + centre - y_test) ** 2).mean()))
    return errors


def main() -> None:
    from _tables import load_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="digits6")
    parser.add_argument("--ranks", nargs="+", type=int, default=[5, 10, 20, 32, 64])
    args = parser.parse_args()
    table = load_table(args.table)
    print(f"| rank | {' | '.join(table.names)} | mean |")
    print("|---|" + "---|" * (len(table.names) + 1))
    for rank in [*args.ranks, None]:
        errors = rank_k_errors(table, rank)
        cells = " | ".join(f"{e:.3f}" for e in errors)
        print(f"| {rank or 'full'} | {cells} | {np.mean(errors):.3f} |")


if __name__ == "__main__":
    main()
