"""Distributing an unsupervised GridSearchCV over a dask cluster
=============================================================

Three views of the same samples are generated from a 3-D clustered latent variable
(``make_blobs``), each through its own random non-linear map plus noise. Without labels,
``GridSearchCV`` compares latent dimensions by ``JNFEstimator.score``, the importance-weighted
log-likelihood of the held-out fold: no scorer is needed. The input is a ``SliceDict`` so
that scikit-learn can split the dict of modalities into folds.

The fits run in parallel on a ``dask.distributed`` cluster through joblib's dask backend.
Here the cluster is a ``LocalCluster`` of two worker processes; on a real cluster only the
``Client`` line changes. ``examples/output/dask_search.png`` plots the held-out
log-likelihood against the latent dimension: it should stop improving at the true
dimension, 3.
"""

import os

import joblib
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _digits import output_dir
from dask.distributed import Client, LocalCluster, get_task_stream
from sklearn.datasets import make_blobs
from sklearn.model_selection import GridSearchCV

from skjnf import JNFEstimator, SliceDict

QUICK = os.environ.get("SKJNF_EXAMPLE_QUICK") == "1"  # a few seconds, for CI
OUTPUT = output_dir()


# %%
# The data: ``make_views``.
def make_views(n_samples, random_state=0):
    """Three noisy non-linear views (widths 10, 8 and 6) of a 3-D latent with four clusters."""
    rng = np.random.default_rng(random_state)
    latent, _ = make_blobs(n_samples, n_features=3, centers=4, cluster_std=1.5, random_state=random_state)
    latent = (latent - latent.mean(axis=0)) / latent.std(axis=0)
    views = {}
    for name, width in {"a": 10, "b": 8, "c": 6}.items():
        signal = np.tanh(latent @ rng.normal(size=(3, width)))
        views[name] = signal + 0.1 * rng.normal(size=(n_samples, width))
    return SliceDict(**views)


# %%
# Fit, run on the cluster, plot.
def main():
    X = make_views(300 if QUICK else 1000)
    latent_dims = [1, 3] if QUICK else [1, 2, 3, 4, 6]
    # Small networks, large batches: the search takes under a minute on two CPU cores.
    jnf = JNFEstimator(
        hidden_sizes=(64, 64),
        flow_hidden_sizes=(32, 32),
        joint_epochs=2 if QUICK else 30,
        flow_epochs=1 if QUICK else 5,  # score uses the joint model (stage 1) only
        batch_size=128,
        lr=2e-3,
        random_state=0,
    )
    # refit=False: only the scores are needed here, not a final model on all the rows.
    search = GridSearchCV(jnf, {"latent_dim": latent_dims}, cv=3, n_jobs=-1, refit=False)

    # On a real cluster, connect to its scheduler instead: `with Client("tcp://scheduler:8786"):`
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
        Client(cluster),
        joblib.parallel_backend("dask"),
        get_task_stream() as tasks,
    ):
        search.fit(X)
    results = search.cv_results_
    workers = {task["worker"] for task in tasks.data}
    n_fits = len(results["params"]) * search.n_splits_
    print(f"the {n_fits} fits ran as {len(tasks.data)} dask tasks on {len(workers)} workers")
    for dim, mean, std in zip(latent_dims, results["mean_test_score"], results["std_test_score"]):
        print(f"latent_dim={dim}: held-out log-likelihood {mean:8.2f} +/- {std:.2f}")
    print(f"best latent_dim: {search.best_params_['latent_dim']} (true latent dimension: 3)")

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.errorbar(latent_dims, results["mean_test_score"], results["std_test_score"], marker="o", capsize=4)
    ax.axvline(3, color="gray", linestyle="--", label="true latent dimension")
    ax.set(
        title="GridSearchCV on a dask cluster (unsupervised)",
        xlabel="latent_dim",
        ylabel="held-out log-likelihood per row",
    )
    ax.legend(loc="lower right")
    fig.savefig(OUTPUT / "dask_search.png", dpi=100)
    print(f"figure saved to {OUTPUT / 'dask_search.png'}")


if __name__ == "__main__":  # worker processes import this file: build the cluster only once
    main()
