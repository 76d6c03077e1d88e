"""Inference on one fitted estimator from several threads: the same results as serial calls, and
nothing written on the model (its parameters stay frozen, as fit left them)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def test_inference_from_eight_threads_matches_serial_calls(fitted, views):
    """Catches inference that writes on the shared module (e.g. flipping ``requires_grad`` per call,
    which overlapping calls left wrong) or on the estimator: 40 calls of five kinds from 8 threads
    give the serial results bit for bit, and every parameter is still frozen afterwards."""
    X, _, _ = views
    X = {m: x[:60] for m, x in X.items()}
    calls = [
        lambda: fitted.transform(X),
        lambda: fitted.transform(X, cond_mod="a"),
        lambda: fitted.transform(X, cond_mod=["a", "b"]),
        lambda: fitted.predict(X, cond_mod="b")["c"],
        lambda: fitted.score_samples(X),
    ]
    assert not any(p.requires_grad for p in fitted.module_.parameters())  # fit froze it once
    state = {k: v.clone() for k, v in fitted.module_.state_dict().items()}
    serial = [call() for call in calls]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(calls[i % len(calls)]) for i in range(40)]
        results = [future.result() for future in futures]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, serial[i % len(calls)])
    assert not any(p.requires_grad for p in fitted.module_.parameters())
    assert not fitted.module_.training
    assert all(torch.equal(state[k], v) for k, v in fitted.module_.state_dict().items())
