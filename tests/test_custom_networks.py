"""User networks per modality: images with conv nets, custom flows, and the contract checks."""

import pickle

import numpy as np
import pytest
import torch
from _helpers import small_jnf
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from torch import nn

from skjnf import SliceDict
from skjnf._flows import RealNVP


class ConvEncoder(nn.Module):
    def __init__(self, in_shape, latent_dim, channels=8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_shape[0], channels, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * in_shape[1] * in_shape[2], 2 * latent_dim),
        )

    def forward(self, x):
        mean, log_var = self.body(x).chunk(2, dim=-1)
        return mean, log_var


class ConvTrunk(nn.Module):
    def __init__(self, in_shape, channels=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_shape[0], channels, 3, padding=1), nn.ReLU(), nn.Flatten())

    def forward(self, x):
        return self.body(x)


class ConvDecoder(nn.Module):
    def __init__(self, latent_dim, out_shape, channels=8):
        super().__init__()
        self.out_shape, self.channels = out_shape, channels
        self.linear = nn.Linear(latent_dim, channels * out_shape[1] * out_shape[2])
        self.conv = nn.Conv2d(channels, out_shape[0], 3, padding=1)

    def forward(self, z):
        lead = z.shape[:-1]
        h = torch.relu(self.linear(z)).reshape(-1, self.channels, *self.out_shape[1:])
        return self.conv(h).reshape(*lead, *self.out_shape)


class WrongDecoder(nn.Module):
    def __init__(self, latent_dim, out_shape):
        super().__init__()
        self.linear = nn.Linear(latent_dim, 3)

    def forward(self, z):
        return self.linear(z)


class NoInverseFlow(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()

    def forward(self, z):
        return z, torch.zeros(z.shape[:-1])


def _images(n=300):
    digits = load_digits()
    images = (digits.images[:n] / 16.0)[:, None]  # (n, 1, 8, 8) in [0, 1]
    summary = np.c_[images.mean(axis=(1, 2)), images.mean(axis=(1, 3))]  # column and row means
    return {"image": images, "summary": summary}, digits.target[:n]


CONV = {"image": {"encoder": ConvEncoder, "decoder": (ConvDecoder, {"channels": 8}), "trunk": ConvTrunk}}


def test_conv_networks_on_images_beat_the_mean_image():
    X, _ = _images()
    jnf = small_jnf(latent_dim=4, networks=CONV, hidden_sizes=(32,), lr=3e-3, joint_epochs=30, flow_epochs=2).fit(X)
    assert jnf.modality_dims_ == {"image": 64, "summary": 16}
    reconstruction = jnf.predict(X)["image"]
    assert reconstruction.shape == (300, 1, 8, 8)
    mse = np.mean((reconstruction - X["image"]) ** 2)
    baseline = np.mean((X["image"] - X["image"].mean(0)) ** 2)
    assert mse < 0.6 * baseline, (mse, baseline)
    generated = jnf.sample(3, X={"summary": X["summary"][:5]})
    assert generated["image"].shape == (3, 5, 1, 8, 8)
    assert jnf.sample(2)["image"].shape == (2, 1, 8, 8)
    with pytest.raises(
        ValueError, match=r"Modality 'image' has rows of shape \(64,\), but JNFEstimator is expecting \(1, 8, 8\)"
    ):
        jnf.transform({"image": X["image"].reshape(300, 64)})


def test_custom_parts_survive_clone_pickle_and_grid_search():
    X, _ = _images(120)
    realnvp = (RealNVP, {"n_blocks": 1, "hidden_sizes": (8,)})
    jnf = small_jnf(latent_dim=2, networks=CONV, flow={"summary": realnvp}, joint_epochs=2, flow_epochs=2)
    twin = clone(jnf)
    assert twin.networks == CONV and twin.flow == {"summary": realnvp}
    jnf.fit(X)
    assert isinstance(jnf.module_.encoders[0].encoder, ConvEncoder)
    assert isinstance(jnf.module_.flows[1], RealNVP)
    loaded = pickle.loads(pickle.dumps(jnf))
    np.testing.assert_array_equal(loaded.transform(X), jnf.transform(X))
    np.testing.assert_array_equal(
        loaded.predict({"summary": X["summary"]})["image"], jnf.predict({"summary": X["summary"]})["image"]
    )
    small = {"image": {"encoder": (ConvEncoder, {"channels": 2})}}
    search = GridSearchCV(jnf, {"networks": [CONV, small]}, cv=2).fit(SliceDict(**X))
    assert search.best_params_["networks"] in (CONV, small)


@pytest.mark.parametrize(
    "params, match",
    [
        (
            {"networks": {"image": {"decoder": WrongDecoder}}},
            r"Modality 'image': the decoder must return natural parameters with 64 values",
        ),
        ({"flow": {"summary": NoInverseFlow}}, r"Modality 'summary': the flow has no inverse"),
        (
            {"networks": {"image": {"encoder": ConvTrunk}}},
            r"Modality 'image': the encoder: its factory failed when called with \['in_shape', 'latent_dim'\]",
        ),
        ({"networks": {"photo": {"encoder": ConvEncoder}}}, r"networks names unknown modality 'photo'"),
        ({"networks": {"image": {"head": ConvEncoder}}}, r"unknown part 'head'"),
        ({"networks": {"image": {"encoder": "conv"}}}, r"must be a callable"),
        ({"flow": {"summary": "glow"}}, r"Unknown flow 'glow'"),
    ],
)
def test_broken_contracts_fail_before_training(params, match):
    X, _ = _images(20)
    params = {"networks": CONV, **params} if "networks" not in params else params
    estimator = small_jnf(latent_dim=2, **params)
    with pytest.raises((ValueError, TypeError), match=match):
        estimator.fit(X)
    assert not hasattr(estimator, "module_")


def test_image_example_runs(tmp_path):
    """examples/plot_images.py (quick mode) writes its figure."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "plot_images.py"
    env = {**os.environ, "SKJNF_EXAMPLE_QUICK": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figure = script.parent / "output" / "images_generation.png"
    assert figure.exists() and figure.stat().st_size > 10_000


class CountingTrunk(ConvTrunk):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_the_subset_posterior_reads_a_custom_trunk():
    """With three modalities, the subset encoder reads the image through the user's conv trunk
    (frozen after stage 1), not through a flat MLP of its own."""
    X, _ = _images()
    X["half"] = X["summary"][:, :8]
    X["summary"] = X["summary"][:, 8:]
    networks = {"image": {**CONV["image"], "trunk": CountingTrunk}}
    jnf = small_jnf(latent_dim=4, networks=networks, hidden_sizes=(16,), joint_epochs=2, flow_epochs=2).fit(X)
    assert not hasattr(jnf.module_.subset_encoder, "trunks")  # no networks of its own on the inputs
    jnf.module_.subset_routes.copy_(torch.arange(8))  # {image, half} through the subset encoder
    CountingTrunk.calls = 0
    z = jnf.transform(X, cond_mod=["image", "half"])
    assert CountingTrunk.calls > 0 and np.isfinite(z).all()
    CountingTrunk.calls = 0
    jnf.transform(X, cond_mod=["image"])  # the image's expert is a user encoder: no trunk
    assert CountingTrunk.calls == 0
