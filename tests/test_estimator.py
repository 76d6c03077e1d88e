"""End-to-end behaviour of JNFEstimator: inputs, outputs, sklearn integration, persistence."""

import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from _helpers import make_views, small_jnf
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline

from skjnf import SliceDict


def _as_frame(X):
    columns = [f"{m}_{i}" for m, block in X.items() for i in range(block.shape[1])]
    return pd.DataFrame(np.hstack(list(X.values())), columns=columns)


def test_dict_dataframe_and_array_inputs_agree(views):
    X, _, _ = views
    frame = _as_frame(X)
    by_names = {m: [c for c in frame.columns if c.startswith(m + "_")] for m in X}
    by_width = {m: block.shape[1] for m, block in X.items()}
    by_index = {m: list(range(s, s + w)) for m, s, w in zip(X, np.cumsum([0, 6, 4]), by_width.values())}
    reference = small_jnf(joint_epochs=3, flow_epochs=3).fit(X).transform(X)
    for data, modalities in [(frame, by_names), (frame.to_numpy(), by_width), (frame.to_numpy(), by_index)]:
        jnf = small_jnf(joint_epochs=3, flow_epochs=3, modalities=modalities).fit(data)
        np.testing.assert_array_equal(jnf.transform(data), reference)
        assert jnf.modality_names_ == ["a", "b", "c"]
        assert jnf.modality_dims_ == {"a": 6, "b": 4, "c": 3}
    assert list(jnf.feature_names_in_) if hasattr(jnf, "feature_names_in_") else True


def test_fitted_attributes_and_history(fitted, views):
    X, _, _ = views
    assert fitted.n_features_in_ == 13
    n = len(X["a"])
    assert fitted.n_training_rows_ == {"joint": n, "experts": {"a": n, "b": n, "c": n}, "subset": n}
    assert not hasattr(fitted, "hmc_acceptance_")  # diagnostics come from sample_latent, not attributes
    epochs = fitted.history_["joint"]["epochs"]
    assert len(epochs) == 40
    losses = [e["valid_loss"] for e in epochs]
    assert losses[fitted.history_["joint"]["best_epoch"] - 1] == min(losses)
    # Stage 2: every part (each expert, then the subset posterior) keeps its own best epoch.
    flows = fitted.history_["flows"]
    kept = [*flows["expert_best_epoch"].values(), flows["subset_best_epoch"]]
    held_out = [*flows["expert_valid_loss"].values(), flows["subset_valid_loss"]]
    for i, (epoch, loss) in enumerate(zip(kept, held_out)):
        part = [e["part_losses"][i] for e in flows["epochs"]]
        evaluated = [value for value in part if value is not None]  # None once the part stopped
        assert part[epoch - 1] == min(evaluated) == loss
    assert flows["best_epoch"] == max(kept)
    # the losses of the parts still training add up to the stage's validation loss
    for row in flows["epochs"]:
        parts = [value for value in row["part_losses"] if value is not None]
        assert sum(parts) == pytest.approx(row["valid_loss"], rel=1e-5)
    # training improved the joint ELBO
    joint = fitted.history_["joint"]["epochs"]
    assert joint[-1]["train_loss"] < joint[0]["train_loss"]


def test_output_shapes_and_containers(fitted, views):
    X, _, _ = views
    n = len(X["a"])
    assert fitted.transform(X).shape == (n, 2)
    assert fitted.transform(X, cond_mod="a").shape == (n, 2)
    assert fitted.sample_latent(X, n_samples=3, cond_mod=["a", "b"]).shape == (3, n, 2)
    pred = fitted.predict({"a": X["a"]})
    assert isinstance(pred, dict) and {k: v.shape for k, v in pred.items()} == {k: v.shape for k, v in X.items()}
    pred = fitted.predict(SliceDict(**X))
    assert isinstance(pred, SliceDict)
    prior = fitted.sample(5)
    assert {k: v.shape for k, v in prior.items()} == {"a": (5, 6), "b": (5, 4), "c": (5, 3)}
    cross = fitted.sample(4, X={"b": X["b"][:7]})
    assert cross["a"].shape == (4, 7, 6)
    assert fitted.score_samples(X).shape == (n,)
    np.testing.assert_array_equal(fitted.get_feature_names_out(), ["jnf0", "jnf1"])


def test_array_layout_outputs(views):
    X, _, _ = views
    frame = _as_frame(X)
    jnf = small_jnf(joint_epochs=3, flow_epochs=3, modalities={"a": 6, "b": 4, "c": 3}).fit(frame)
    pred = jnf.predict(frame)
    assert isinstance(pred, pd.DataFrame) and list(pred.columns) == list(frame.columns)
    assert jnf.predict(frame.to_numpy()).shape == (len(frame), 13)
    assert jnf.sample(3).shape == (3, 13)
    assert jnf.sample(2, X=frame.to_numpy()[:5]).shape == (2, 5, 13)
    out = jnf.set_output(transform="pandas").transform(frame)
    assert list(out.columns) == ["jnf0", "jnf1"]


def test_inverse_transform_decodes_latents_as_predict_does(fitted, views):
    X, _, _ = views
    decoded = fitted.inverse_transform(fitted.transform(X))
    predicted = fitted.predict(X)
    assert set(decoded) == set(X)
    for m in X:
        np.testing.assert_array_equal(decoded[m], predicted[m])
    with pytest.raises(ValueError, match="Z has 3 columns; JNFEstimator's latent_dim is 2"):
        fitted.inverse_transform(np.zeros((4, 3)))
    reversed_rows = fitted.inverse_transform(fitted.transform(X)[::-1])  # a view with negative strides
    np.testing.assert_array_equal(reversed_rows["a"], decoded["a"][::-1])
    array = np.hstack([X[m] for m in "abc"])
    jnf = small_jnf(joint_epochs=2, flow_epochs=2, modalities={"a": 6, "b": 4, "c": 3}).fit(array)
    np.testing.assert_array_equal(jnf.inverse_transform(jnf.transform(array)), jnf.predict(array))
    draws = jnf.sample(2, X=array[:5], add_noise=False)  # (draws, rows, features): columns in fit's order
    latents = jnf.sample_latent(array[:5], n_samples=2, random_state=None)
    np.testing.assert_allclose(draws[1], jnf.inverse_transform(latents[1]), rtol=1e-6, atol=1e-6)


def test_cross_modal_prediction_beats_the_mean(fitted, views):
    X, _, _ = views
    for cond in ["b", ["b", "c"]]:
        pred = fitted.predict(X, cond_mod=cond)
        mse = np.mean((pred["a"] - X["a"]) ** 2)
        baseline = np.mean((X["a"] - X["a"].mean(0)) ** 2)
        assert mse < 0.3 * baseline, (cond, mse, baseline)


def test_pipeline_to_classifier_beats_chance(views):
    X, labels, _ = views
    pipe = make_pipeline(small_jnf(joint_epochs=20, flow_epochs=2), LogisticRegression())
    scores = cross_val_score(pipe, SliceDict(**X), labels, cv=3)
    assert scores.mean() > 0.8  # chance is 1/3


def test_grid_search_over_slicedict_selects_by_likelihood(views):
    X, _, _ = views
    jnf = small_jnf(joint_epochs=60, flow_epochs=1, lr=1e-2, hidden_sizes=(32,))
    search = GridSearchCV(jnf, {"latent_dim": [1, 2]}, cv=2)
    search.fit(SliceDict(**X))
    # the data are two-dimensional: a 2-D latent has the higher held-out likelihood
    assert search.best_params_ == {"latent_dim": 2}
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()


def test_clone_keeps_params_and_drops_fit(fitted):
    twin = clone(fitted)
    assert twin.get_params() == fitted.get_params()
    assert not hasattr(twin, "module_")


@pytest.mark.parametrize("dump", ["pickle", "joblib"])
def test_persistence_round_trip(fitted, views, tmp_path, dump):
    X, _, _ = views
    path = tmp_path / "model"
    if dump == "pickle":
        path.write_bytes(pickle.dumps(fitted))
        loaded = pickle.loads(path.read_bytes())
    else:
        joblib.dump(fitted, path)
        loaded = joblib.load(path)
    assert all(isinstance(v, np.ndarray) for v in fitted.__getstate__()["module_"].values())
    for method in ("transform", "score_samples"):
        np.testing.assert_array_equal(getattr(loaded, method)(X), getattr(fitted, method)(X))
    np.testing.assert_array_equal(loaded.transform(X, cond_mod="b"), fitted.transform(X, cond_mod="b"))
    np.testing.assert_array_equal(
        loaded.predict(X, cond_mod=["a", "c"])["b"], fitted.predict(X, cond_mod=["a", "c"])["b"]
    )


def test_skops_round_trip_trusts_only_our_type(fitted, views, tmp_path):
    skops_io = pytest.importorskip("skops.io")
    X, _, _ = views
    path = tmp_path / "model.skops"
    skops_io.dump(fitted, path)
    untrusted = skops_io.get_untrusted_types(file=path)
    assert untrusted == ["skjnf._estimator.JNFEstimator"]
    loaded = skops_io.load(path, trusted=untrusted)
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))


def test_latent_dim_one_with_three_modalities(views):
    X, _, _ = views
    jnf = small_jnf(latent_dim=1, joint_epochs=3, flow_epochs=3).fit(X)
    for cond in (None, "a", ["a", "b"]):
        z = jnf.transform(X, cond_mod=cond)
        assert z.shape == (len(X["a"]), 1) and np.isfinite(z).all()


def test_large_mean_data_is_reconstructed():
    """No output sigmoid: features around 50 are reconstructed (docs/algorithm.md §1.3)."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 1))
    X = {"a": 50 + z @ rng.normal(size=(1, 3)), "b": 50 + z @ rng.normal(size=(1, 2))}
    jnf = small_jnf(latent_dim=1, joint_epochs=60, flow_epochs=1, hidden_sizes=(32,)).fit(X)
    error = np.abs(jnf.predict(X)["a"] - X["a"]).mean()
    assert error < 0.5 < 0.5 * np.abs(X["a"] - X["a"].mean(0)).mean()


def test_bernoulli_modality_predicts_both_values():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(300, 1))
    X = {"x": z @ np.ones((1, 3)) + 0.1 * rng.normal(size=(300, 3)), "bits": (z > 0).astype(float) @ np.ones((1, 2))}
    jnf = small_jnf(latent_dim=1, likelihood={"bits": "bernoulli"}, joint_epochs=40, flow_epochs=1, lr=1e-2).fit(X)
    pred = jnf.predict(X)["bits"]
    assert ((pred > 0.5) == (X["bits"] > 0.5)).mean() > 0.9


def test_default_decoder_scale_gives_a_useful_latent_on_unit_range_data():
    """With likelihood_scale='auto' (default), [0, 1] features do not collapse the latent."""
    X, labels, _ = make_views(n=300, seed=3)
    X = {m: (b - b.min(0)) / (b.max(0) - b.min(0)) for m, b in X.items()}

    def probe(z):
        return LogisticRegression().fit(z, labels).score(z, labels)

    auto = small_jnf(joint_epochs=30, flow_epochs=1).fit(X)
    collapsed = small_jnf(joint_epochs=30, flow_epochs=1, likelihood_scale=1.0).fit(X).transform(X)
    pca = PCA(2).fit_transform(np.hstack(list(X.values())))
    z = auto.transform(X)
    assert probe(z) > probe(pca) - 0.03  # as informative as the best linear 2-D view
    assert probe(z) > probe(collapsed) + 0.05
    assert collapsed.std() < 0.1 < z.std()
    # fit calibrates the scale it trained with (half the RMS feature std) on the validation rows
    calibrated = auto.history_["joint"]["calibrated_scales"]["a"]
    np.testing.assert_allclose(auto.module_.likelihoods[0].scale.numpy(), calibrated)


def test_learned_scales_start_at_the_feature_std_and_train():
    X, _, _ = make_views(n=200)
    jnf = small_jnf(joint_epochs=5, flow_epochs=1, likelihood_scale={"a": "learn"}).fit(X)
    scale = jnf.module_.likelihoods[0].scale.detach().numpy()
    assert scale.shape == (6,) and np.all(scale > 0)
    assert not np.allclose(scale, X["a"].std(0), rtol=1e-3)  # trained in stage 1
    assert list(jnf.module_.likelihoods[1].parameters()) == []  # "auto" elsewhere: fixed


def test_device_cpu_tensors(fitted):
    assert all(p.device.type == "cpu" for p in fitted.module_.parameters())
    assert torch.get_num_threads() == 1


def test_column_transformer_output_split_by_prefix(views):
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import StandardScaler

    from skjnf import modalities_from_prefix

    X, labels, _ = views
    frame = _as_frame(X)
    columns = {m: [c for c in frame.columns if c.startswith(m + "_")] for m in X}
    scale = ColumnTransformer([(m, StandardScaler(), cols) for m, cols in columns.items()])
    pipe = make_pipeline(
        scale.set_output(transform="pandas"), small_jnf(modalities="prefix", joint_epochs=20, flow_epochs=1)
    )
    pipe.fit(frame)
    jnf = pipe[-1]
    assert jnf.modality_names_ == ["a", "b", "c"] and jnf.modality_dims_ == {"a": 6, "b": 4, "c": 3}
    z = pipe.transform(frame)
    assert LogisticRegression().fit(z, labels).score(z, labels) > 0.8
    assert modalities_from_prefix(["x__1", "y__2", "x__3"]) == {"x": ["x__1", "x__3"], "y": ["y__2"]}
    with pytest.raises(ValueError, match="'plain' has no 'modality__' prefix"):
        modalities_from_prefix(["x__1", "plain"])


def test_decoder_widths_mirror_the_encoder_unless_given(views):
    X, _, _ = views

    def linear_widths(net):  # the MLP's layers; a decoder's linear path from z is checked apart
        return [m.out_features for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n != "skip"]

    mirrored = small_jnf(hidden_sizes=(16, 8), joint_epochs=1, flow_epochs=1).fit(X)
    assert linear_widths(mirrored.module_.decoders[0]) == [8, 16, 6]
    assert mirrored.module_.decoders[0].skip.weight.shape == (6, 2)  # beside the MLP: z -> x
    light = small_jnf(hidden_sizes=(16, 8), decoder_hidden_sizes=(32,), joint_epochs=1, flow_epochs=1).fit(X)
    assert linear_widths(light.module_.decoders[0]) == [32, 6]
    assert linear_widths(light.module_.joint_encoder.trunks[0]) == [16, 8]
    affine = small_jnf(decoder_hidden_sizes=(), joint_epochs=1, flow_epochs=1).fit(X)
    assert linear_widths(affine.module_.decoders[1]) == [4]
    assert affine.module_.decoders[1].skip is None  # already linear
    with pytest.raises(ValueError, match="decoder_hidden_sizes must be a sequence of positive ints"):
        small_jnf(decoder_hidden_sizes=(4, 0)).fit(X)
