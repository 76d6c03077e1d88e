"""Inference on a dask DataFrame larger than we would hold at once: a fitted JNFEstimator and
JNFImputer run partition by partition (``map_partitions`` with the output's ``meta``) on a
``LocalCluster``, and give what the in-memory calls give on the same rows."""

import numpy as np
import pandas as pd
import pytest

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from skjnf import JNFEstimator, JNFImputer  # noqa: E402

N_ROWS, N_PARTITIONS = 1_000_000, 10
COLUMNS = [f"a__{k}" for k in range(4)] + [f"b__{k}" for k in range(3)]
SMALL = dict(latent_dim=2, hidden_sizes=(16,), flow_hidden_sizes=(8,), n_flow_blocks=1, n_posterior_samples=4)


def table(n, seed):
    """Two linear views of a 2-D latent; modality b missing (NaN) in every 20th row."""
    rng = np.random.default_rng(seed)
    W = np.random.default_rng(0).normal(size=(2, 7))
    x = rng.normal(size=(n, 2)) @ W + 0.3 * rng.normal(size=(n, 7))
    x[::20, 4:] = np.nan
    return pd.DataFrame(x, columns=COLUMNS)


@pytest.fixture(scope="module")
def cluster_client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, memory_limit="2GiB", dashboard_address=None, processes=True
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def frame():
    """A lazy dask DataFrame of 1e6 rows, each partition generated on its worker."""
    meta = table(0, 0)
    parts = [dask_delayed(table)(N_ROWS // N_PARTITIONS, seed) for seed in range(N_PARTITIONS)]
    return dd.from_delayed(parts, meta=meta)


def dask_delayed(function):
    import dask

    return dask.delayed(function)


def test_transform_and_impute_partitions_on_a_cluster_match_in_memory_calls(cluster_client, frame):
    train = table(600, 99)
    imputer = JNFImputer("prefix", estimator=JNFEstimator(**SMALL, joint_epochs=5, flow_epochs=5), random_state=0)
    imputer.fit(train)
    encoder = JNFEstimator(**SMALL, modalities="prefix", joint_epochs=5, flow_epochs=5, random_state=0)
    encoder.fit(train).set_output(transform="pandas")

    filled = frame.map_partitions(imputer.transform, meta=frame._meta)
    latent = frame.map_partitions(encoder.transform, meta=pd.DataFrame(columns=["jnf0", "jnf1"], dtype=np.float64))
    n_missing, means = dd.compute(filled.isna().sum().sum(), filled.mean())  # one pass over 1e6 rows
    assert int(n_missing) == 0 and np.isfinite(means.to_numpy()).all()
    assert len(latent) == N_ROWS

    sample = frame.get_partition(3).compute()  # the same rows, in memory
    np.testing.assert_allclose(filled.get_partition(3).compute().to_numpy(), imputer.transform(sample).to_numpy())
    np.testing.assert_allclose(latent.get_partition(3).compute().to_numpy(), encoder.transform(sample).to_numpy())
    # each worker held a partition (1e5 rows) at a time: far below the 2 GiB limit it was given
    rss = cluster_client.run(lambda: __import__("psutil").Process().memory_info().rss)
    assert max(rss.values()) < 2**30, rss
