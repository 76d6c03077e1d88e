"""Contracts that one-line bugs broke unnoticed before (each test names the mutation it catches)."""

import math
import pickle

import numpy as np
import torch
from _helpers import small_jnf

import skjnf._fitting as fitting
from skjnf._hmc import _RunningVariance
from skjnf._inference import pattern_generator
from skjnf._posteriors import HMCSettings


def test_validation_rows_are_never_trained_on(monkeypatch):
    """Mutation caught: the validation rows also used for training."""
    X = {"a": np.arange(60, dtype=float)[:, None] * [1.0, -1.0], "b": np.ones((60, 2))}  # row ids in "a"
    seen, original = [], fitting.train_stage

    def spy(stage, train, valid, **kwargs):
        seen.append((set(train.blocks["a"][:, 0].tolist()), set(valid.blocks["a"][:, 0].tolist())))
        return original(stage, train, valid, **kwargs)

    monkeypatch.setattr(fitting, "train_stage", spy)
    small_jnf(joint_epochs=1, flow_epochs=1, validation_fraction=0.2).fit(X)
    for train_ids, valid_ids in seen:
        assert not train_ids & valid_ids
        assert train_ids | valid_ids == set(range(60)) and len(valid_ids) == 12


def test_auto_scale_is_half_the_rms_of_the_feature_stds(monkeypatch):
    """Mutation caught: the "auto" scale computed from the mean instead of the RMS of the stds.

    This is the scale stage 1 trains with; fit calibrates it afterwards (switched off here)."""
    monkeypatch.setattr(fitting, "calibrate_auto_scales", lambda *args: {})
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3)) * [0.1, 1.0, 5.0]  # mean of stds 2.03, RMS 2.98
    jnf = small_jnf(joint_epochs=1, flow_epochs=1, validation_fraction=0.0).fit(
        {"a": a, "b": rng.normal(size=(400, 2))}
    )
    expected = 0.5 * math.sqrt(np.mean(a.std(0) ** 2))
    np.testing.assert_allclose(jnf.module_.likelihoods[0].scale.numpy(), expected, rtol=1e-5)


def test_pickle_round_trip_keeps_every_buffer(views):
    """Mutation caught: a round trip that drops a buffer (likelihood scale, aggregate posterior,
    subset routes) — score_samples and the subset posterior would change."""
    X, _, _ = views
    jnf = small_jnf(joint_epochs=3, flow_epochs=3).fit(X)
    loaded = pickle.loads(pickle.dumps(jnf))
    np.testing.assert_array_equal(loaded.score_samples(X), jnf.score_samples(X))
    np.testing.assert_array_equal(loaded.transform(X, cond_mod=["a", "b"]), jnf.transform(X, cond_mod=["a", "b"]))
    for name, buffer in jnf.module_.named_buffers():
        torch.testing.assert_close(dict(loaded.module_.named_buffers())[name], buffer, rtol=0, atol=0)


def test_running_variance_pools_batches_exactly():
    """Mutation caught: the mass-matrix variance dropping its between-batch term."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(7, 3, 2, generator=g) + shift for shift in (0.0, 5.0, -3.0)]  # batch means differ
    running = _RunningVariance(batches[0][0])
    for batch in batches:
        running.add(batch)
    pooled = torch.cat(batches).double()
    torch.testing.assert_close(running.mean, pooled.mean(0))
    torch.testing.assert_close(running.sum_sq / (running.count - 1), pooled.var(0))


def test_posterior_mean_uses_enough_chains_for_n_posterior_samples():
    """Mutation caught: the number of HMC chains of a posterior mean (kept positions per row)."""
    for samples, steps in ((20, 20), (8, 10), (1, 1), (33, 7)):
        settings = HMCSettings.for_mean(samples, steps, 5, "auto")
        kept = steps - steps // 2
        assert settings.n_chains == math.ceil(samples / kept)
        assert settings.n_chains * kept >= samples > (settings.n_chains - 1) * kept


def test_each_pattern_has_its_own_noise_stream():
    """Mutation caught: two patterns sharing one noise stream."""
    device = torch.device("cpu")
    draws = {
        tuple(p): torch.randn(5, generator=pattern_generator(7, np.array(p), device))
        for p in ([1, 1, 0], [1, 0, 1], [0, 1, 1])
    }
    values = list(draws.values())
    assert all(not torch.equal(values[i], values[j]) for i in range(3) for j in range(i + 1, 3))
    again = torch.randn(5, generator=pattern_generator(7, np.array([1, 0, 1]), device))
    assert torch.equal(again, draws[(1, 0, 1)])  # and each stream is reproducible
