"""Imputing and encoding a table of a million rows, partition by partition, with dask
==================================================================================

Once fitted, ``JNFImputer.transform`` and ``JNFEstimator.transform`` treat every row on its
own, so a table larger than one machine's memory can go through them one partition at a time.
Here a dask DataFrame of 10^6 rows (10^5 in quick mode) is generated lazily, partition by
partition on the workers of a ``LocalCluster``; in every 20th row the second modality is
missing. ``map_partitions`` runs the fitted imputer and encoder on each partition (their
``meta``: the output's columns); no worker ever holds more than a partition. On a real cluster
only the ``Client`` line changes.

``examples/output/dask_imputation.png`` plots, on one partition, the imputed values of a
hidden column against the true ones.
"""

import os

import dask
import dask.dataframe as dd
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from _digits import output_dir
from dask.distributed import Client, LocalCluster

from skjnf import JNFEstimator, JNFImputer

QUICK = os.environ.get("SKJNF_EXAMPLE_QUICK") == "1"  # a few seconds, for CI
OUTPUT = output_dir()
N_ROWS, N_PARTITIONS = (100_000 if QUICK else 1_000_000), 10
COLUMNS = [f"a__{k}" for k in range(5)] + [f"b__{k}" for k in range(4)]
W = np.random.default_rng(0).normal(size=(3, len(COLUMNS)))


# %%
# The data: ``make_table``.
def make_table(n_rows, seed, hide=True):
    """Two views of a 3-D latent through a non-linear map; modality b missing in every 20th row."""
    rng = np.random.default_rng(seed)
    x = np.tanh(rng.normal(size=(n_rows, 3)) @ W) + 0.1 * rng.normal(size=(n_rows, len(COLUMNS)))
    table = pd.DataFrame(x, columns=COLUMNS)
    if hide:
        table.iloc[::20, 5:] = np.nan
    return table


# %%
# Fit, run on the cluster, plot.
def main():
    epochs = 3 if QUICK else 40
    estimator = JNFEstimator(latent_dim=3, hidden_sizes=(64, 64), joint_epochs=epochs, flow_epochs=epochs)
    imputer = JNFImputer("prefix", estimator=estimator, random_state=0).fit(make_table(3000, seed=4321))
    encoder = JNFEstimator(latent_dim=3, hidden_sizes=(64, 64), joint_epochs=epochs, flow_epochs=epochs)
    encoder.set_params(modalities="prefix", random_state=0).fit(make_table(3000, seed=1234))
    encoder.set_output(transform="pandas")

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="2GiB", dashboard_address=None)
    with cluster, Client(cluster):
        parts = [dask.delayed(make_table)(N_ROWS // N_PARTITIONS, seed) for seed in range(N_PARTITIONS)]
        frame = dd.from_delayed(parts, meta=make_table(0, 0))
        filled = frame.map_partitions(imputer.transform, meta=frame._meta)
        latent = frame.map_partitions(
            encoder.transform, meta=pd.DataFrame(columns=["jnf0", "jnf1", "jnf2"], dtype=float)
        )
        n_missing, latent_mean = dd.compute(filled.isna().sum().sum(), latent.mean())
        print(f"imputed and encoded {N_ROWS:,} rows in {N_PARTITIONS} partitions on 2 workers")
        print(f"NaN left after imputation: {int(n_missing)}; mean latent: {latent_mean.round(3).tolist()}")
        sample = filled.get_partition(0).compute()

    truth = make_table(N_ROWS // N_PARTITIONS, 0, hide=False)
    rows = np.arange(0, len(truth), 20)
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    ax.scatter(truth["b__0"].iloc[rows], sample["b__0"].iloc[rows], s=4, alpha=0.3)
    ax.plot([-1, 1], [-1, 1], color="gray", linestyle="--")
    ax.set(title="hidden column b__0, one partition", xlabel="true value", ylabel="imputed from modality a")
    fig.savefig(OUTPUT / "dask_imputation.png", dpi=100)
    print(f"figure saved to {OUTPUT / 'dask_imputation.png'}")


if __name__ == "__main__":  # the workers import this file: build the cluster only when run
    main()
