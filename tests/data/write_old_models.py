"""Write a small fitted JNFEstimator, pickled and as a skops file, with the outputs it gives.

Run with an earlier version of skjnf on the path: ``git worktree add /tmp/old <commit>``, then
``PYTHONPATH=/tmp/old python tests/data/write_old_models.py tests/data/<prefix>`` (without
PYTHONPATH an editable install imports this checkout instead). ``tests/test_persistence.py``
loads the files with this version and expects the same outputs. ``jnf_0_1``: commit e520ea0^
(0.1: no subset posterior of its own yet); ``jnf_unreleased_b42bf53``: the last commit before
``decoder``/``decoder_scale`` became ``likelihood``/``likelihood_scale``.
"""

import pickle
import sys

import numpy as np
import torch

from skjnf import JNFEstimator


def main(prefix: str) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 2))
    X = {m: z @ rng.normal(size=(2, d)) + 0.1 * rng.normal(size=(60, d)) for m, d in (("a", 3), ("b", 4), ("c", 2))}
    est = JNFEstimator(
        latent_dim=2,
        hidden_sizes=(8,),
        flow_hidden_sizes=(8,),
        n_flow_blocks=1,
        joint_epochs=3,
        flow_epochs=3,
        random_state=0,
    ).fit(X)
    est.set_params(**{"decoder_scale" if "decoder_scale" in est.get_params() else "likelihood_scale": 0.7})
    with open(prefix + ".pkl", "wb") as f:
        pickle.dump(est, f)
    try:
        import skops.io

        skops.io.dump(est, prefix + ".skops")
    except ImportError:
        pass
    outputs = {"transform": est.transform(X), "transform_a": est.transform(X, cond_mod="a")}
    outputs.update({f"predict_{m}": x for m, x in est.predict({"a": X["a"], "b": X["b"]}).items()})
    np.savez(prefix + "_outputs.npz", **X, **outputs)


if __name__ == "__main__":
    main(sys.argv[1])
